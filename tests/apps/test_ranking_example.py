"""examples/personalize_ranking.py end to end in --quick mode: the report's structure and ranges,
the saved adapters reloading to the trained scores, and the reported HR@10 / NDCG@10 against a
brute-force recomputation built from the raw shop table in an independent loop over users."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from recpeft import PeftModel
from recpeft.datasets.synthetic import load_shop
from recpeft.models.sasrec import SASRec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "personalize_ranking.py"
METRIC_KEYS = {"hr@10", "ndcg@10", "sampled_hr@10", "sampled_ndcg@10", "sampled_auc"}


def _load_example():
    spec = importlib.util.spec_from_file_location("personalize_ranking", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ranking = _load_example()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranking")
    experiment = ranking.main(["--quick", "--out", str(out), "--no-progress"])
    return out, experiment, json.loads((out / "ranking_report.json").read_text())


def test_report_structure_and_ranges(run):
    out, experiment, report = run
    assert set(report) >= {"protocol", "counts", "pretrain", "markets", "mean", "seconds", "routing_max_abs_diff"}
    largest = max(report["counts"], key=lambda m: report["counts"][m]["click_users"])
    assert sorted(report["markets"]) == sorted(m for m in report["counts"] if m != largest)
    for market, row in report["markets"].items():
        assert row["test_users"] == report["counts"][market]["test_users"] > 0
        for variant in ("base", "lora", "dense", "popularity"):
            metrics = row[variant]["metrics"]
            assert set(metrics) == METRIC_KEYS, (market, variant)
            assert all(0.0 <= v <= 1.0 for v in metrics.values()), (market, variant, metrics)
            assert metrics["ndcg@10"] <= metrics["hr@10"]
            # 100 negatives are a subset of the catalogue: a user's sampled rank ≤ full rank
            assert metrics["sampled_hr@10"] >= metrics["hr@10"]
        assert row["lora"]["train"]["trainable_params"] < row["dense"]["train"]["trainable_params"]
        assert 0 < row["lora"]["adapter_bytes"] < (out / "base_model.pt").stat().st_size
    for variant, metrics in report["mean"].items():
        expected = sum(r[variant]["metrics"]["hr@10"] for r in report["markets"].values()) / len(report["markets"])
        assert metrics["hr@10"] == pytest.approx(expected, abs=1e-12)
    assert report["routing_max_abs_diff"] < 1e-4


def _base_from_disk(out: Path) -> SASRec:
    saved = torch.load(out / "base_model.pt", weights_only=True)
    model = SASRec(**saved["spec"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def test_saved_adapters_reload_to_the_trained_scores(run):
    out, experiment, report = run
    trained_any = False
    for market, trained in experiment.lora.items():
        rows = experiment.data.test.rows(market)
        inputs = rows.inputs[torch.randperm(len(rows.targets))[:8]]
        reloaded = PeftModel.from_pretrained(_base_from_disk(out), out / "adapters" / market).eval()
        with torch.no_grad():
            expected, got = trained.eval().score_all(inputs), reloaded.score_all(inputs)
            base = experiment.base.score_all(inputs)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the saved tensors, the same ops: bit for bit
        if report["markets"][market]["lora"]["train"]["best_epoch"] >= 0:  # the adapter moved off the base
            trained_any = True
            assert (got - base).abs().max() > 1e-4, market
    assert trained_any


def _brute_force(model, shop, market: str, max_len: int) -> tuple[float, float, int]:
    """HR@10 and NDCG@10 of ``model`` on ``market``'s users, one user at a time: the clicks in
    (time, row) order, the last one the target, the rest (last max_len, left-padded with 0) the
    input; rank = #{catalogue items j ≠ target with s_j ≥ s_target}."""
    clicks = shop[shop["label"] == 1]
    per_user: dict[int, list[tuple]] = {}
    for position, (user, when, item, where) in enumerate(
        zip(clicks["user"], clicks["timestamp"], clicks["item"], clicks["market"])
    ):
        per_user.setdefault(int(user), []).append((when, position, int(item) + 1, str(where)))
    hits, gains, users = 0, 0.0, 0
    for events in per_user.values():
        if events[0][3] != market or len(events) < 3:
            continue
        items = [item for _, _, item, _ in sorted(events)]
        history, target = items[:-1][-max_len:], items[-1]
        seq = torch.tensor([[0] * (max_len - len(history)) + history])
        with torch.no_grad():
            scores = model.score_all(seq)[0].double().tolist()
        rank = sum(1 for j in range(1, len(scores)) if j != target and scores[j] >= scores[target])
        users += 1
        if rank < 10:
            hits += 1
            gains += 1.0 / math.log2(rank + 2)
    return hits / users, gains / users, users


def test_reported_hr_matches_brute_force(run):
    out, experiment, report = run
    market = "DE"
    shop = load_shop()
    max_len = report["protocol"]["model"]["max_len"]
    for variant, model in (("lora", experiment.lora[market]), ("base", experiment.base)):
        hr, ndcg, users = _brute_force(model.eval(), shop, market, max_len)
        reported = report["markets"][market][variant]["metrics"]
        assert users == report["markets"][market]["test_users"]
        assert reported["hr@10"] == pytest.approx(hr, abs=1e-12), variant
        assert reported["ndcg@10"] == pytest.approx(ndcg, abs=1e-9), variant


def test_sampled_negatives_are_distinct_and_never_the_target():
    generator = torch.Generator().manual_seed(3)
    num_items = 40
    targets = torch.randint(1, num_items, (200,), generator=generator)
    negatives = ranking.sample_negatives(targets, num_items, 25, generator)
    assert negatives.shape == (200, 25)
    assert int(negatives.min()) >= 1 and int(negatives.max()) <= num_items - 1
    assert not (negatives == targets.unsqueeze(1)).any()
    assert all(len(set(row.tolist())) == 25 for row in negatives)
    # uniform over the 38 non-target items: every non-target id appears, with about equal counts
    counts = torch.bincount(negatives.flatten(), minlength=num_items)[1:].double()
    expected = 200 * 25 / (num_items - 2)
    assert (counts > 0).sum() == num_items - 1 and ((counts - expected).abs() < 0.4 * expected).all()
    with pytest.raises(ValueError, match="negatives"):
        ranking.sample_negatives(targets, num_items, num_items - 1, generator)


def test_next_item_windows_cover_every_target_once():
    items = torch.randint(1, 100, (23,)).tolist()
    windows = ranking.next_item_windows(items, 5)
    assert len(windows) == 5  # ceil(22 / 5)
    for inputs, targets in windows:
        assert len(inputs) == len(targets) == 5
        assert [a == 0 for a in inputs] == [t == 0 for t in targets]  # padding in both, on the left
    oldest_first = list(reversed(windows))
    assert [a for inputs, _ in oldest_first for a in inputs if a] == items[:-1]
    assert [t for _, targets in oldest_first for t in targets if t] == items[1:]
    assert windows[0] == (items[-6:-1], items[-5:])  # the newest window is full and ends at the end


def test_unknown_market_is_named(tmp_path):
    with pytest.raises(ValueError, match="XX"):
        ranking.main(["--quick", "--out", str(tmp_path), "--markets", "XX", "--no-progress"])
