"""Metrics against brute-force Python loops over fresh random inputs (with forced ties)."""

import math

import pytest
import torch

from recpeft import metrics


def _tied_scores(*shape, levels=7):
    """Random scores drawn from a few levels, so ties are common."""
    return torch.randint(0, levels, shape).double() / 3 - 1


# --------------------------------------------------------------------------- brute-force oracles


def brute_log_loss(logits, labels):
    total = 0.0
    for s, y in zip(logits.tolist(), labels.tolist()):
        p = 1 / (1 + math.exp(-s))
        total -= y * math.log(p) + (1 - y) * math.log(1 - p)
    return total / len(logits)


def brute_auc(scores, labels):
    pos = [s for s, y in zip(scores.tolist(), labels.tolist()) if y]
    neg = [s for s, y in zip(scores.tolist(), labels.tolist()) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def brute_rank(row, target, excluded):
    """Pessimistic 0-based rank: other candidates scoring at least the target's score."""
    return sum(1 for j, s in enumerate(row) if j != target and j not in excluded and s >= row[target])


def brute_rankings(scores, targets, exclude):
    ranks = []
    for b, t in enumerate(targets.tolist()):
        excluded = set() if exclude is None else {j for j in range(scores.shape[1]) if exclude[b, j]}
        ranks.append(brute_rank(scores[b].tolist(), t, excluded))
    return ranks


# --------------------------------------------------------------------------- click metrics


def test_log_loss_matches_the_formula_and_is_stable():
    logits, labels = torch.randn(300) * 4, torch.rand(300)  # soft labels are allowed
    assert metrics.log_loss(logits, labels) == pytest.approx(brute_log_loss(logits, labels), rel=1e-12)
    # large logits stay finite: softplus(80) − 1·80 ≈ e^−80
    assert metrics.log_loss(torch.tensor([80.0, -80.0]), torch.tensor([1.0, 0.0])) == pytest.approx(0.0, abs=1e-30)
    assert metrics.log_loss(torch.tensor([80.0]), torch.tensor([0.0])) == pytest.approx(80.0)


@pytest.mark.parametrize("tied", [False, True])
def test_auc_matches_pairwise_count(tied):
    scores = _tied_scores(400) if tied else torch.randn(400)
    labels = torch.rand(400) < 0.3
    assert metrics.auc(scores, labels) == pytest.approx(brute_auc(scores, labels), abs=1e-12)
    assert math.isnan(metrics.auc(torch.randn(5), torch.zeros(5)))


def test_segment_and_weighted_auc():
    scores, labels = _tied_scores(600), torch.rand(600) < 0.4
    segments = torch.randint(0, 4, (600,)) * 10
    per = metrics.segment_auc(scores, labels, segments)
    counts = metrics.segment_counts(segments)
    assert sorted(per) == sorted(counts) == sorted(set(segments.tolist()))
    for g in per:
        rows = segments == g
        assert per[g] == pytest.approx(brute_auc(scores[rows], labels[rows]), abs=1e-12)
        assert counts[g] == int(rows.sum())
    expected = sum(counts[g] * per[g] for g in per) / sum(counts.values())
    assert metrics.weighted_auc(per, counts) == pytest.approx(expected, abs=1e-12)
    # string segments, and a one-class segment is left out of the weighted mean
    names = ["DE" if s < 0 else "FR" for s in scores.tolist()] + ["PT"] * 3
    scores2, labels2 = torch.cat([scores, torch.randn(3)]), torch.cat([labels, torch.ones(3, dtype=torch.bool)])
    per2 = metrics.segment_auc(scores2, labels2, names)
    assert math.isnan(per2["PT"])
    counts2 = metrics.segment_counts(names)
    expected2 = (counts2["DE"] * per2["DE"] + counts2["FR"] * per2["FR"]) / (counts2["DE"] + counts2["FR"])
    assert metrics.weighted_auc(per2, counts2) == pytest.approx(expected2, abs=1e-12)
    losses = metrics.segment_log_loss(scores2, labels2.double(), names)
    rows = torch.tensor([n == "FR" for n in names])
    assert losses["FR"] == pytest.approx(brute_log_loss(scores2[rows], labels2[rows].double()), rel=1e-12)


# --------------------------------------------------------------------------- full-set ranking


@pytest.mark.parametrize("with_exclude", [False, True])
def test_ranks_hr_ndcg_against_brute_force(with_exclude):
    B, N = 40, 30
    scores, targets = _tied_scores(B, N), torch.randint(0, N, (B,))
    exclude = (torch.rand(B, N) < 0.3) if with_exclude else None
    if with_exclude:
        exclude[0, targets[0]] = True  # the target stays a candidate even when marked
    ranks = brute_rankings(scores, targets, exclude)
    assert metrics.rank_of_targets(scores, targets, exclude).tolist() == ranks
    for k in (1, 5, 10):
        hr = sum(r < k for r in ranks) / B
        ndcg = sum(1 / math.log2(r + 2) for r in ranks if r < k) / B
        assert metrics.hit_rate_at_k(scores, targets, k, exclude) == pytest.approx(hr, abs=1e-12)
        assert metrics.ndcg_at_k(scores, targets, k, exclude) == pytest.approx(ndcg, abs=1e-12)
        both = metrics.ranking_metrics(scores, targets, [k], exclude)
        assert both == pytest.approx({f"hr@{k}": hr, f"ndcg@{k}": ndcg}, abs=1e-12)


def test_constant_scores_get_the_worst_rank():
    ranks = metrics.rank_of_targets(torch.ones(3, 8), torch.tensor([0, 4, 7]))
    assert ranks.tolist() == [7, 7, 7]


@pytest.mark.parametrize("tied", [False, True])
def test_recall_against_brute_force(tied):
    B, N, k = 30, 25, 6
    scores = _tied_scores(B, N) if tied else torch.randn(B, N)
    relevant = torch.rand(B, N) < 0.2
    relevant[torch.arange(B), torch.randint(0, N, (B,))] = True
    exclude = torch.rand(B, N) < 0.25
    expected = 0.0
    for b in range(B):
        row = scores[b].tolist()
        candidates = [j for j in range(N) if relevant[b, j] or not exclude[b, j]]
        hits = 0
        for j in range(N):
            if relevant[b, j]:
                above = sum(1 for i in candidates if i != j and row[i] >= row[j])
                hits += above < k
        expected += hits / int(relevant[b].sum())
    assert metrics.recall_at_k(scores, relevant, k, exclude) == pytest.approx(expected / B, abs=1e-12)
    if not tied:  # without ties the pessimistic top-K is torch.topk's
        top = torch.topk(scores.masked_fill(exclude & ~relevant, -math.inf), k, dim=1).indices
        hits = relevant.gather(1, top).sum(1).double() / relevant.sum(1)
        assert metrics.recall_at_k(scores, relevant, k, exclude) == pytest.approx(float(hits.mean()), abs=1e-12)


def test_sampled_metrics_against_brute_force():
    B, n = 50, 9
    pos, neg = _tied_scores(B), _tied_scores(B, n)
    out = metrics.sampled_ranking_metrics(pos, neg, k=[1, 5])
    assert set(out) == {"sampled_auc", "sampled_hr@1", "sampled_ndcg@1", "sampled_hr@5", "sampled_ndcg@5"}
    ranks = [sum(1 for v in neg[b].tolist() if v >= pos[b]) for b in range(B)]
    aucs = [sum(1.0 if pos[b] > v else 0.5 if pos[b] == v else 0.0 for v in neg[b].tolist()) / n for b in range(B)]
    assert out["sampled_auc"] == pytest.approx(sum(aucs) / B, abs=1e-12)
    for k in (1, 5):
        assert out[f"sampled_hr@{k}"] == pytest.approx(sum(r < k for r in ranks) / B, abs=1e-12)
        assert out[f"sampled_ndcg@{k}"] == pytest.approx(sum(1 / math.log2(r + 2) for r in ranks if r < k) / B)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_argument():
    scores = torch.randn(4, 6)
    scores[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"scores .*row 2|scores .*\(2, 3\)"):
        metrics.rank_of_targets(scores, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="logits .*row 1"):
        metrics.log_loss(torch.tensor([0.0, float("inf")]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels .*row 1"):
        metrics.log_loss(torch.randn(3), torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"targets\[1\]"):
        metrics.hit_rate_at_k(torch.randn(2, 5), torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="exclude"):
        metrics.ndcg_at_k(torch.randn(2, 5), torch.tensor([0, 1]), 3, exclude=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="target_mask row 1"):
        metrics.recall_at_k(torch.randn(2, 5), torch.tensor([[True] * 5, [False] * 5]), 2)
    with pytest.raises(ValueError, match="k must be"):
        metrics.hit_rate_at_k(torch.randn(2, 5), torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="neg_scores"):
        metrics.sampled_ranking_metrics(torch.randn(3), torch.tensor([[1.0], [float("nan")], [0.0]]))
    with pytest.raises(ValueError, match="segment"):
        metrics.weighted_auc({"DE": 0.7}, {"FR": 10})


@pytest.mark.parametrize("positives,negatives,shift", [(40, 160, 0.95), (150, 30, 1.8), (25, 25, 0.0)])
def test_auc_standard_error_is_the_spread_of_auc_over_fresh_samples(positives, negatives, shift):
    """Binormal scores (positives N(shift, 1), negatives N(0, 1)), rounded to 0.1 so that ties
    occur, 2000 fresh validation sets: the empirical standard deviation of their AUC against the
    mean of DeLong's estimate from each set alone. The Monte Carlo spread of a standard
    deviation over R draws is 1/√(2R) = 1.6% (3σ: 4.7%), and DeLong's variance is unbiased up to
    O(1/n) terms (≤ 1/min(n₊, n₋) = 4% here), so 10% bounds both; a formula off by √2 fails."""
    g = torch.Generator().manual_seed(positives)
    reps = 2000
    labels = torch.cat([torch.ones(positives), torch.zeros(negatives)])
    aucs, estimates = [], []
    for _ in range(reps):
        scores = torch.randn(positives + negatives, generator=g, dtype=torch.float64) + shift * labels
        scores = (scores * 10).round() / 10
        aucs.append(metrics.auc(scores, labels))
        estimates.append(metrics.auc_standard_error(scores, labels))
    spread = float(torch.tensor(aucs).std())
    assert abs(sum(estimates) / reps / spread - 1) < 0.10


def test_auc_standard_error_needs_two_of_each_label():
    assert math.isnan(metrics.auc_standard_error(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 0, 0])))
    exact = metrics.auc_standard_error(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    # V10: positive 0.35 beats 0.1 only (1/2), 0.8 beats both (1); V01: negative 0.1 is below
    # both positives (1), 0.4 below 0.8 only (1/2); each pair's sample variance is 1/8
    assert exact == pytest.approx(math.sqrt(0.125 / 2 + 0.125 / 2), rel=1e-12)
