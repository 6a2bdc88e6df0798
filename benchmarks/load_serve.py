"""Load test of the scoring server (``recpeft serve``): QPS and latency with 0 (the base alone), 1,
64 and 256 adapters, at one batch policy, on localhost only; it stops by itself.

Setup (in a temporary folder): ``recpeft pretrain`` a base on the embedded shop (1 epoch,
``--embedding-dim`` 64 by default: the demo's model), ``recpeft finetune`` one LoRA adapter on
its DE market (1 epoch, r=4). The many adapters are **synthetic**: copies of that one trained
adapter with every parameter multiplied elementwise by (1 + 0.25·ε), ε ~ N(0, 1) drawn per copy
(seeded), saved as adapter folders of their own (each with the base's fingerprint record), so
each is a different adapter of the trained one's shapes and sparsity. The 64 and 1 cases serve
the first 64 and the first one of the 256.

Requests: the same shop rows in every case (``ROWS_PER_REQUEST`` rows a request, drawn at random
from the shop's rows, seeded); only their segment column differs: with N adapters each row's
segment is one of the N served names, uniform at random (so every row is routed, to N adapters
at once); with none, a name no adapter serves (every row through the base alone).

Per case, one server process (``recpeft serve --threads 1``, the default batch policy of
:class:`~recpeft.serve.ServeLimits`); before anything is timed, the first requests, sent one at a
time, are checked to score exactly what an in-process AdapterBank of the same folders scores on
the same rows (a lone request is one bank call on the same rows: the same float32 ops). Then
``ROUNDS`` rounds, interleaved over the cases (base, 1, 64, 256, base, ...), each a warm-up of
``WARMUP`` requests and then ``REQUESTS`` requests from ``CLIENTS`` concurrent clients (threads
of this process, one keep-alive connection each, ``REQUESTS / CLIENTS`` requests each, one after
another). QPS = REQUESTS / the round's wall time (the median over rounds is reported); latency =
one request's send-to-last-byte time, p50 and p99 over every round's requests.

Target (issue 16, reported, not asserted): QPS at 256 adapters ≥ 0.8x the base alone.

    python benchmarks/load_serve.py [--rounds 3] [--embedding-dim 64] [--output benchmarks/results]

Writes ``serve_load.json`` and ``serve_load.png`` there and prints the table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from recpeft.apps.base_checkpoint import base_fingerprint_files, load_base
from recpeft.apps.demo_report import save_figure
from recpeft.apps.scoring import scoring_schema
from recpeft.datasets.synthetic import load_shop
from recpeft.peft.model import PeftModel
from recpeft.serve import ServeLimits, load_bank
from recpeft.utils.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
CASES = (0, 1, 64, 256)
REQUESTS, CLIENTS, WARMUP, ROWS_PER_REQUEST = 400, 8, 40, 32
CHECKED_REQUESTS = 3
PERTURBATION = 0.25
TRAINED_SEGMENT = "DE"
BASE_ALONE = "no-adapter"  # the segment of every row in the base-alone case
TARGET = 0.8  # QPS at 256 adapters / QPS of the base alone
START_TIMEOUT_S = 180.0


def recpeft(*argv: str, cwd: Path) -> None:
    """Run ``recpeft argv`` (outside the repository root: see scripts/bootstrap.sh)."""
    subprocess.run([sys.executable, "-m", "recpeft.cli", *argv, "--quiet"], cwd=cwd, check=True)


def synthetic_adapters(base: Path, trained: Path, out: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` adapter folders under ``out``, seg000, seg001, ...: ``trained`` with every
    parameter p replaced by p ⊙ (1 + PERTURBATION·ε), ε ~ N(0, 1) per copy."""
    model = PeftModel.from_pretrained(load_base(base)[0], trained)
    params = [p for h in model.adapter_holders().values() for p in h.adapter_parameters("default")]
    originals = [p.detach().clone() for p in params]
    record, generator, names = base_fingerprint_files(base), torch.Generator().manual_seed(seed), []
    for k in range(count):
        with torch.no_grad():
            for p, p0 in zip(params, originals):
                p.copy_(p0 * (1 + PERTURBATION * torch.randn(p0.shape, generator=generator)))
        names.append(f"seg{k:03d}")
        model.save_pretrained(out / names[-1], extra_files=record)
    return names


def case_folder(root: Path, names: list[str], n: int) -> Path:
    """A folder of links to the first ``n`` adapter folders."""
    folder = root / f"adapters_{n}"
    folder.mkdir()
    for name in names[:n]:
        (folder / name).symlink_to(root / "all" / name)
    return folder


def request_rows(base: Path, count: int, seed: int = 1) -> tuple[list[list[dict]], str]:
    """``count`` requests of ROWS_PER_REQUEST shop rows each (the base's scoring columns), and
    the name of the segment column."""
    schema = scoring_schema(load_base(base)[1].schema)
    shop = load_shop()
    rng = np.random.default_rng(seed)
    picked = shop.iloc[rng.choice(len(shop), count * ROWS_PER_REQUEST, replace=False)]
    records = picked[list(schema.columns)].astype({schema.segment: str}).to_dict("records")
    return [records[k * ROWS_PER_REQUEST : (k + 1) * ROWS_PER_REQUEST] for k in range(count)], schema.segment


def bodies_for(requests: list[list[dict]], segment: str, names: list[str], seed: int) -> list[bytes]:
    """The request bodies with each row's segment drawn from ``names`` (none: BASE_ALONE)."""
    rng = np.random.default_rng(seed)
    out = []
    for rows in requests:
        picks = rng.integers(0, len(names), len(rows)) if names else None
        rows = [{**row, segment: names[int(picks[i])] if names else BASE_ALONE} for i, row in enumerate(rows)]
        out.append(json.dumps({"rows": rows}).encode())
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(port: int, path: str) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        body = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"GET {path}: {answer.status} {body[:300]!r}")
        return json.loads(body)
    finally:
        connection.close()


def post(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    connection.request("POST", "/score", body=body, headers={"content-type": "application/json"})
    answer = connection.getresponse()
    return answer.status, answer.read()


class Server:
    """``recpeft serve`` of ``base`` and the adapters in ``folder`` (None: none) on a free port."""

    def __init__(self, base: Path, folder: Path | None, workdir: Path, log: Path):
        self.port = free_port()
        argv = ["serve", "--base", str(base), "--port", str(self.port), "--threads", "1", "--quiet"]
        argv += ["--adapters", str(folder)] if folder else []
        started = time.perf_counter()
        self._log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "recpeft.cli", *argv], cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT
        )
        while True:
            try:
                self.health = get(self.port, "/health")
                break
            except OSError:
                if self.process.poll() is not None or time.perf_counter() - started > START_TIMEOUT_S:
                    self.stop()
                    raise RuntimeError(f"recpeft serve did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        self.start_s = time.perf_counter() - started

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(2)  # SIGINT: uvicorn's graceful shutdown
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


def check(server: Server, bodies: list[bytes], bank) -> None:
    """The first CHECKED_REQUESTS answers, sent one at a time, are the bank's scores exactly."""
    import pandas as pd

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    for body in bodies[:CHECKED_REQUESTS]:
        status, answer = post(connection, body)
        if status != 200:
            raise RuntimeError(f"POST /score: {status} {answer[:300]!r}")
        got = torch.tensor(json.loads(answer)["scores"], dtype=torch.float32)
        expected = bank.score(pd.DataFrame(json.loads(body)["rows"]))
        if not torch.equal(got, expected):
            raise AssertionError(f"the server's scores differ from the bank's by {float((got - expected).abs().max())}")
    connection.close()


def load_round(port: int, bodies: list[bytes]) -> tuple[float, list[float], int]:
    """(wall seconds, per-request latencies, non-200 answers) of ``bodies`` sent by CLIENTS
    concurrent clients, each its share in order on one keep-alive connection."""
    shares = [bodies[c::CLIENTS] for c in range(CLIENTS)]
    latencies: list[list[float]] = [[] for _ in range(CLIENTS)]
    failures = [0] * CLIENTS
    start = threading.Barrier(CLIENTS + 1)

    def client(c: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.connect()
        start.wait()
        for body in shares[c]:
            t0 = time.perf_counter()
            status, _ = post(connection, body)
            latencies[c].append(time.perf_counter() - t0)
            failures[c] += status != 200
        connection.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - t0, [x for per in latencies for x in per], sum(failures)


def measure(servers: dict[int, Server], bodies: dict[int, list[bytes]], rounds: int) -> dict[int, dict]:
    """Interleaved rounds over the cases; per case the figures of the module docstring."""
    walls = {n: [] for n in servers}
    latencies = {n: [] for n in servers}
    failures = dict.fromkeys(servers, 0)
    before = {n: get(s.port, "/health") for n, s in servers.items()}
    warm = {n: 0 for n in servers}
    for _ in range(rounds):
        for n, server in servers.items():
            warmup = bodies[n][REQUESTS : REQUESTS + WARMUP]
            load_round(server.port, warmup)
            warm[n] += len(warmup)
            wall, lat, failed = load_round(server.port, bodies[n][:REQUESTS])
            walls[n].append(wall)
            latencies[n] += lat
            failures[n] += failed
    out = {}
    for n, server in servers.items():
        after = get(server.port, "/health")
        requests = after["requests"] - before[n]["requests"]
        batches = after["batches"] - before[n]["batches"]
        ms = np.array(latencies[n]) * 1000
        qps = [REQUESTS / w for w in walls[n]]
        memory = sum(a["memory_bytes"] for a in get(server.port, "/adapters")["adapters"])
        out[n] = {
            "adapters": n,
            "qps": statistics.median(qps),
            "qps_rounds": qps,
            "rows_per_s": statistics.median(qps) * ROWS_PER_REQUEST,
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()),
            "max_ms": float(ms.max()),
            "requests_per_batch": requests / batches if batches else None,  # warm-up requests included
            "failed_requests": failures[n],
            "server_start_s": server.start_s,
            "adapter_memory_bytes": memory,
            "warmup_requests": warm[n],
        }
    return out


def table(cases: dict[int, dict]) -> str:
    base = cases[0]["qps"]
    lines = [
        f"{'adapters':>8} {'QPS':>8} {'vs base':>8} {'rows/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'req/batch':>9} "
        f"{'start s':>8} {'adapter MB':>10}"
    ]
    for n, c in cases.items():
        per_batch = f"{c['requests_per_batch']:.2f}" if c["requests_per_batch"] else "—"
        lines.append(
            f"{n if n else 'base':>8} {c['qps']:8.1f} {c['qps'] / base:7.2f}x {c['rows_per_s']:9.0f} "
            f"{c['p50_ms']:8.2f} {c['p99_ms']:8.2f} {per_batch:>9} {c['server_start_s']:8.1f} "
            f"{c['adapter_memory_bytes'] / 2**20:10.2f}"
        )
    return "\n".join(lines)


def plot(cases: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(n) if n else "base" for n in cases]
    x = np.arange(len(labels))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.bar(x, [c["qps"] for c in cases.values()], color="tab:blue")
    left.axhline(TARGET * cases[0]["qps"], color="gray", linestyle="--", linewidth=0.8, label=f"{TARGET}x base")
    left.set_xticks(x, labels)
    left.set_xlabel("adapters")
    left.set_title(f"QPS ({CLIENTS} clients, {ROWS_PER_REQUEST} rows/request)")
    left.legend(fontsize=8)
    for offset, key in ((-0.2, "p50_ms"), (0.2, "p99_ms")):
        right.bar(x + offset, [c[key] for c in cases.values()], width=0.4, label=key.split("_")[0])
    right.set_xticks(x, labels)
    right.set_xlabel("adapters")
    right.set_title("latency (ms)")
    right.legend(fontsize=8)
    fig.suptitle("recpeft serve on localhost, 2-core CPU, torch 1 thread")
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0, load = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, trained = work / "base", work / "trained"
        pretrain = ["pretrain", "--output", str(base), "--epochs", "1", "--embedding-dim", str(args.embedding_dim)]
        recpeft(*pretrain, cwd=work)
        finetune = ["finetune", "--base", str(base), "--segment", TRAINED_SEGMENT, "--epochs", "1"]
        recpeft(*finetune, "--output", str(trained), cwd=work)
        names = synthetic_adapters(base, trained, work / "all", max(CASES))
        requests, segment = request_rows(base, REQUESTS + WARMUP)
        bodies = {n: bodies_for(requests, segment, names[:n], seed=n) for n in CASES}
        servers: dict[int, Server] = {}
        try:
            for n in CASES:
                folder = case_folder(work, names, n) if n else None
                servers[n] = Server(base, folder, work, work / f"serve_{n}.log")
                bank, refused = load_bank(base, folder, device="cpu")
                assert not refused and len(bank.names) == n == servers[n].health["adapters"], refused
                check(servers[n], bodies[n], bank)
                del bank
            setup_s = time.perf_counter() - t0
            cases = measure(servers, bodies, args.rounds)
        finally:
            for server in servers.values():
                server.stop()
    ratio = cases[max(CASES)]["qps"] / cases[0]["qps"]
    report = {
        "benchmark": "serve_load",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "load_average_at_start": load},
        "torch": torch.__version__,
        "server": "recpeft serve (FastAPI + uvicorn, one process), torch threads 1, device cpu",
        "model": f"DLRM of `recpeft pretrain` on the embedded shop, 1 epoch, embedding dim {args.embedding_dim}",
        "adapters": f"synthetic: the {TRAINED_SEGMENT} LoRA adapter (r=4, 1 epoch) with each parameter "
        f"multiplied by (1 + {PERTURBATION}·N(0,1)) per copy",
        "batch_policy": ServeLimits().__dict__,
        "load": {
            "requests_per_round": REQUESTS,
            "clients": CLIENTS,
            "rows_per_request": ROWS_PER_REQUEST,
            "warmup_requests_per_round": WARMUP,
            "rounds": args.rounds,
            "localhost": True,
        },
        "cases": {str(n): c for n, c in cases.items()},
        "target": {"qps_256_vs_base": TARGET, "measured": ratio, "met": ratio >= TARGET},
        "setup_s": setup_s,
        "seconds": time.perf_counter() - t0,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output / "serve_load.json", json.dumps(report, indent=1) + "\n")
    plot(cases, args.output / "serve_load.png")
    print(table(cases))
    verdict = "MET" if ratio >= TARGET else "NOT MET"
    print(f"QPS at {max(CASES)} adapters / base alone: {ratio:.2f}x (target ≥ {TARGET}x: {verdict})")
    print(f"{report['seconds']:.0f} s; wrote {args.output / 'serve_load.json'} and .png")
    return report


if __name__ == "__main__":
    main()
