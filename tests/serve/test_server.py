"""The scoring server over real HTTP: uvicorn on a free localhost port in a background thread, a
base with 'south' and 'north' adapters, requests sent with urllib/http.client. Scores are those of
an AdapterBank of the same folders on the same rows, each row routed by its segment, alone or among
concurrent requests; bad requests get a 4xx naming the problem, a failure inside scoring a 500 for
its request only, a late answer a 503; adapters come and go while requests are in flight."""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from recpeft.apps.adapter_bank import AdapterBank
from recpeft.apps.base_checkpoint import base_fingerprint
from recpeft.cli import main
from recpeft.serve import BackgroundServer, ServeLimits, create_app

from click_logs import pretrained
from reference_math import assert_normwise_close

# A request scored alone is one bank call on the same rows in the same order as the reference
# bank's: the same float32 ops, so the same bits (and JSON carries a float32 exactly). Among
# concurrent requests its rows share a chunk with others, so a request of one segment may be
# routed where alone it ran its adapter unrouted (merged on the fly): the float32 ops of
# x·Wᵀ + s·(x·Aᵀ)·Bᵀ against x·(W + s·B·A)ᵀ, a few roundings of values ≤ O(1) through a 2-layer
# MLP, then a sigmoid that only shrinks differences. 2^-16 ≈ 1.5e-5 is 100× that (as
# tests/apps/test_adapter_bank.py); the base in place of an adapter is off by far more.
REL = 2.0**-16
LIMITS = ServeLimits(max_rows=64, max_body_bytes=32 * 1024, batch_rows=256, batch_wait_ms=20.0)
FEATURES = ["uid", "sku", "cat", "price", "country"]  # the scoring columns of click_logs' base


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A base, adapters of it for 'south' and 'north', and a pool of rows of three segments
    (the third, 'east', has no adapter) with a few ids the base never saw."""
    made = pretrained(tmp_path_factory.mktemp("serve"))
    north = made["root"] / "north"
    assert main([*made["finetune"], "--segment", "north", "--out", str(north)]) == 0
    pool = pd.read_csv(made["log"]).sample(300, random_state=1).reset_index(drop=True)[FEATURES]
    pool.loc[::7, "country"] = "east"
    pool.loc[::11, "uid"] = 10_000 + pool.index[::11]  # unseen users: the out-of-vocabulary row
    return {**made, "north": north, "pool": pool, "folders": {"south": made["adapter"], "north": north}}


def bank_of(made, names=("south", "north")) -> AdapterBank:
    bank = AdapterBank(made["base"], device="cpu")
    assert bank.add_folders({n: made["folders"][n] for n in names}) == {}
    return bank


@contextlib.contextmanager
def serving(made, limits=LIMITS, names=("south", "north")):
    """A server of a bank of ``names``; yields (server, its bank)."""
    bank = bank_of(made, names)
    with BackgroundServer(create_app(bank, limits)) as server:
        yield server, bank


def call(server, method, path, body=None, *, raw: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of one HTTP request."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url + path, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def rows_of(frame: pd.DataFrame) -> list[dict]:
    return frame.to_dict("records")


def expected_adapters(frame: pd.DataFrame, serving=("south", "north")) -> list:
    return [s if s in serving else None for s in frame["country"]]


def score(server, frame) -> dict:
    status, answer = call(server, "POST", "/score", {"rows": rows_of(frame)})
    assert status == 200, answer
    return answer


def test_scores_are_the_banks_each_row_by_its_segments_adapter(made):
    pool, reference = made["pool"], bank_of(made)
    frame = pool.iloc[:60]
    with serving(made) as (server, _):
        answer = score(server, frame)
        status, health = call(server, "GET", "/health")
    assert torch.equal(torch.tensor(answer["scores"], dtype=torch.float32), reference.score(frame))
    assert answer["adapters"] == expected_adapters(frame)
    assert {"south", "north", None} <= set(answer["adapters"])
    routed = torch.tensor([a is not None for a in answer["adapters"]])
    base_alone = bank_of(made, names=()).score(frame)
    assert not torch.allclose(torch.tensor(answer["scores"])[routed], base_alone[routed], rtol=0, atol=1e-6)
    recorded = json.loads((made["adapter"] / "recpeft_base.json").read_text())["sha256"]  # written by finetune
    assert status == 200 and health["status"] == "ok" and health["adapters"] == 2
    assert health["base_fingerprint"] == recorded == base_fingerprint(made["base"])
    assert (health["requests"], health["rows"]) == (1, 60)


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(made):
    pool, reference = made["pool"], bank_of(made)
    rng = np.random.default_rng(0)
    clients, per_client = 8, 4
    draw = lambda: pool.iloc[rng.choice(len(pool), rng.integers(1, 40), replace=False)]
    requests = [[draw() for _ in range(per_client)] for _ in range(clients)]
    answers: dict[tuple[int, int], dict] = {}
    start = threading.Barrier(clients)

    def client(c):
        start.wait()
        for k, frame in enumerate(requests[c]):
            answers[c, k] = score(server, frame)

    with serving(made) as (server, _):
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        _, health = call(server, "GET", "/health")
    assert len(answers) == clients * per_client
    for (c, k), answer in answers.items():
        frame = requests[c][k]
        assert answer["adapters"] == expected_adapters(frame), (c, k)
        got = torch.tensor(answer["scores"], dtype=torch.float32)
        assert_normwise_close(got, reference.score(frame), rel=REL, name=f"client {c} request {k}")
    assert health["requests"] == clients * per_client
    assert health["batches"] < health["requests"]  # requests shared a bank call


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_goes_on(made):
    row = rows_of(made["pool"].iloc[:1])[0]
    too_many = [row] * (LIMITS.max_rows + 1)
    cases = [
        ({"rows": too_many}, 413, f"{LIMITS.max_rows + 1} rows, at most {LIMITS.max_rows}"),
        ({"rows": [{**row, "cat": "x" * LIMITS.max_body_bytes}]}, 413, f"at most {LIMITS.max_body_bytes}"),
        ({"rows": [row, {**row, "colour": "red"}]}, 422, "rows[1]: unknown column 'colour'"),
        ({"rows": [{k: v for k, v in row.items() if k != "price"}]}, 422, "rows[0]: missing column 'price'"),
        ({"rows": [{**row, "price": "cheap"}]}, 422, 'rows[0].price: must be a finite number, got "cheap"'),
        ({"rows": [{**row, "uid": 1.5}]}, 422, "rows[0].uid: must be an integer or string id, got 1.5"),
        ({"rows": [{**row, "uid": True}]}, 422, "rows[0].uid: must be an integer or string id, got true"),
        ({"rows": [{**row, "country": 3}]}, 422, "rows[0].country: must be a string"),
        ({"rows": [{**row, "price": None}]}, 422, "rows[0].price: must be a finite number, got null"),
        ({"rows": [row, 7]}, 422, "rows[1]: a row must be an object"),
        ({"rows": {"uid": 1}}, 422, '"rows" must be a list'),
        ({"row": [row]}, 422, "unknown field 'row'"),
        ({}, 422, 'no "rows" field'),
        ([row], 422, "must be a JSON object"),
    ]
    with serving(made) as (server, _):
        for body, status, fragment in cases:
            got, answer = call(server, "POST", "/score", body)
            assert got == status and fragment in answer["detail"], (got, answer["detail"][:200])
            assert "\n" not in answer["detail"]
        for raw, fragment in [
            (b'{"rows": [', "not valid JSON"),
            (b"\xff\xfe", "not UTF-8"),
            (json.dumps({"rows": [row]}).replace(str(row["price"]), "NaN").encode(), "rows[0].price: must be a finite"),
        ]:
            got, answer = call(server, "POST", "/score", raw=raw)
            assert got == 422 and fragment in answer["detail"], answer
        # a body sent in chunks, without a Content-Length, is cut off once it passes the bound
        connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
        chunks = iter([b'{"rows": ["'] + [b"x" * 4096] * (LIMITS.max_body_bytes // 4096 + 2) + [b'"]}'])
        connection.request("POST", "/score", body=chunks, headers={"content-type": "application/json"})
        answer = connection.getresponse()
        assert answer.status == 413 and f"over {LIMITS.max_body_bytes} bytes" in json.load(answer)["detail"]
        connection.close()
        assert call(server, "POST", "/score", {"rows": []}) == (200, {"scores": [], "adapters": []})
        frame = made["pool"].iloc[:5]
        assert torch.equal(torch.tensor(score(server, frame)["scores"]), bank_of(made).score(frame))


def test_a_failure_inside_scoring_is_a_500_for_its_request_only(made, monkeypatch):
    pool = made["pool"]
    good, bad = pool.iloc[:20], pool.iloc[20:30].assign(country="boom")
    reference = bank_of(made)
    answers = {}
    start = threading.Barrier(4)
    with serving(made) as (server, bank):
        scored = bank.score

        def failing(frame, **kwargs):
            if (frame["country"] == "boom").any():
                raise RuntimeError("the scorer broke on purpose")
            return scored(frame, **kwargs)

        monkeypatch.setattr(bank, "score", failing)

        def client(k):
            start.wait()
            answers[k] = call(server, "POST", "/score", {"rows": rows_of(bad if k == 0 else good)})

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        after = score(server, good)
    status, answer = answers.pop(0)
    assert status == 500 and "RuntimeError: the scorer broke on purpose" in answer["detail"], answer
    for status, answer in [*answers.values(), (200, after)]:
        assert status == 200
        assert_normwise_close(torch.tensor(answer["scores"]), reference.score(good), rel=REL)


def test_a_late_answer_is_a_503_and_the_worker_goes_on(made, monkeypatch):
    pool = made["pool"]
    with serving(made, ServeLimits(max_rows=64, timeout_s=0.3)) as (server, bank):
        scored, release = bank.score, threading.Event()
        monkeypatch.setattr(bank, "score", lambda frame, **k: release.wait(10) and scored(frame, **k))
        status, answer = call(server, "POST", "/score", {"rows": rows_of(pool.iloc[:3])})
        assert status == 503 and "no answer within 0.3 s" in answer["detail"], answer
        release.set()
        assert torch.equal(torch.tensor(score(server, pool.iloc[3:8])["scores"]), scored(pool.iloc[3:8]))


def test_adapters_are_listed_added_and_removed_while_requests_are_in_flight(made, tmp_path):
    pool = made["pool"]
    frame = pool[pool["country"] != "east"].iloc[:30]
    both, south_only = bank_of(made).score(frame), bank_of(made, ("south",)).score(frame)
    stop, answers = threading.Event(), []

    def traffic():
        while not stop.is_set():
            answers.append(call(server, "POST", "/score", {"rows": rows_of(frame)}))

    with serving(made) as (server, bank):
        status, listed = call(server, "GET", "/adapters")
        memory = bank.memory_bytes()
        assert status == 200 and [a["name"] for a in listed["adapters"]] == ["south", "north"]
        assert all(a["memory_bytes"] == memory[a["name"]] > 0 for a in listed["adapters"])
        assert listed["adapters"][1]["folder"] == str(made["north"])
        sender = threading.Thread(target=traffic)
        sender.start()
        for _ in range(3):
            time.sleep(0.05)
            assert call(server, "DELETE", "/adapters/north") == (200, {"removed": "north", "adapters": 1})
            time.sleep(0.05)
            status, added = call(server, "POST", "/adapters", {"name": "north", "path": str(made["north"])})
            assert status == 201 and added["name"] == "north" and added["memory_bytes"] == memory["north"]
        stop.set()
        sender.join(60)
        refusals = [
            (("POST", "/adapters", {"name": "north", "path": str(made["north"])}), 409, "already serving"),
            (("POST", "/adapters", {"name": "west", "path": str(tmp_path / "none")}), 422, str(tmp_path / "none")),
            (("POST", "/adapters", {"name": "west", "path": str(made["base"])}), 422, "adapter 'west'"),
            (("POST", "/adapters", {"name": "a/b", "path": str(made["north"])}), 422, "must not contain '/'"),
            (("POST", "/adapters", {"name": "west"}), 422, '"path" must be a non-empty string'),
            (("POST", "/adapters", {"name": "west", "path": "x", "force": 1}), 422, "unknown field 'force'"),
            (("DELETE", "/adapters/west", None), 404, "no adapter 'west' is serving"),
        ]
        for args, status, fragment in refusals:
            got, answer = call(server, *args)
            assert got == status and fragment in answer["detail"], (args, answer)
        assert call(server, "GET", "/health")[1]["adapters"] == 2
    # every answer in flight came from one bank state, north in or out, whole
    assert len(answers) >= 3 and all(status == 200 for status, _ in answers)
    for _, answer in answers:
        north_served = "north" in answer["adapters"]
        serving_now = ("south", "north") if north_served else ("south",)
        assert answer["adapters"] == expected_adapters(frame, serving_now)
        expected = both if north_served else south_only
        assert_normwise_close(torch.tensor(answer["scores"]), expected, rel=REL)


def test_recpeft_serve_serves_a_folder_of_adapters_until_interrupted(made, tmp_path):
    adapters = tmp_path / "adapters"
    for name, folder in made["folders"].items():
        shutil.copytree(folder, adapters / name)
    shutil.copytree(made["adapter"], adapters / "west")
    (adapters / "west" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with socket.socket() as probe:  # a free port (free again when the server binds it)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["serve", "--base", str(made["base"]), "--adapters", str(adapters), "--port", str(port), "--quiet"]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "recpeft.cli", *argv], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        server = SimpleNamespace(url=f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:
            try:
                status, health = call(server, "GET", "/health")
                break
            except urllib.error.URLError:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert status == 200 and health["adapters"] == 2, health
        frame = made["pool"].iloc[:20]
        assert torch.equal(torch.tensor(score(server, frame)["scores"]), bank_of(made).score(frame))
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
    text = log.read_text()
    assert code == 0, text
    assert "adapter 'west'" in text and str(adapters / "west") in text  # refused, with its reason
    assert "2 adapter(s) serving" in text
