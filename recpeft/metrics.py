"""Click and ranking metrics, computed in float64, returned as Python floats (means over rows).

Click metrics (B impressions, logits s_b, labels y_b ∈ [0, 1]):

- ``log_loss``: mean binary cross-entropy of σ(s) against y,
  ℓ_b = softplus(s_b) − y_b·s_b  (= −y·log σ(s) − (1−y)·log(1−σ(s)), stable for any finite s).
- ``auc``: P(score of a random positive > score of a random negative), ties count one half.
- ``auc_standard_error``: DeLong's (1988) standard error of the AUC, from the same scores: with
  V₁₀(i) = P(negative < positive i) and V₀₁(j) = P(negative j < positive) (ties one half),
  SE² = Var(V₁₀)/n₊ + Var(V₀₁)/n₋ (sample variances): how far a validation AUC moves by chance.
- ``per_segment`` / ``segment_auc`` / ``segment_log_loss``: a metric per segment value;
  ``segment_counts`` the impressions per segment; ``weighted_auc`` their impression-weighted mean
  Σ_g n_g·AUC_g / Σ_g n_g over the segments whose AUC is defined; ``undefined_auc_reason``
  says why an AUC is NaN (no rows, or one label only).

Ranking over the full item set (B users, N items, scores [B, N], one target item t_b per row):

- ``rank_of_targets``: the 0-based rank of the target among the candidate items,
  rank_b = #{j ≠ t_b candidate : s_bj ≥ s_bt}. Ties count **pessimistically** (every item tied
  with the target ranks above it), so a model that scores everything equal gets the worst rank,
  not the best. Candidates are all items not marked in ``exclude`` (e.g. the user's training
  history); the target itself is always a candidate, even where ``exclude`` marks it (a repeat
  purchase stays rankable).
- ``hit_rate_at_k``: mean of [rank < k].  ``ndcg_at_k``: mean of [rank < k]/log2(rank + 2)
  (one relevant item, so the ideal DCG is 1).  ``ranking_metrics``: both for several K at once.
- ``recall_at_k`` for several relevant items per row (mask R_b): |top-k ∩ R_b| / |R_b|. The
  denominator is |R_b|, not min(k, |R_b|), so a row with more than k relevant items cannot reach
  1. An item j is in the top-k when #{i ≠ j candidate : s_bi ≥ s_bj} < k, the same pessimistic
  tie rule (without ties this is exactly ``torch.topk``).

Sampled ranking (labelled "sampled_" in every key; for comparison beside the full-set metrics
only, since sampled metrics can order models differently from full ones):
``sampled_ranking_metrics(pos [B], neg [B, n], k)`` ranks each positive among its n negatives,
rank_b = #{j : neg_bj ≥ pos_b}, and reports sampled HR@K, NDCG@K and the per-row AUC
mean_b (#{neg < pos} + ½·#{neg = pos}) / n.

Every function checks its inputs: non-finite scores, mismatched shapes, out-of-range targets raise
ValueError naming the argument (and the row where one is at fault).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence

import torch

from recpeft.utils.validation import check_positive_number, is_int

# ---------------------------------------------------------------------------------------------
# input checks


def _finite(name: str, values: torch.Tensor, double: bool = True) -> torch.Tensor:
    """``values`` (as float64 when ``double``); ValueError naming ``name`` and the first bad row
    when not finite."""
    if not isinstance(values, torch.Tensor):
        values = torch.as_tensor(values)
    values = values.detach()
    values = values.double() if double else values
    bad = ~torch.isfinite(values)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        where = f"row {first[0]}" if len(first) == 1 else f"index {first}"
        raise ValueError(f"{name} holds non-finite values (first at {where})")
    return values


def _as_tensor(values) -> torch.Tensor:
    return values.detach() if isinstance(values, torch.Tensor) else torch.as_tensor(values)


def _labels(labels, like: torch.Tensor, name: str = "labels") -> torch.Tensor:
    labels = _finite(name, labels).flatten()
    if labels.shape != like.shape:
        raise ValueError(f"{name} has {labels.numel()} values but the scores have {like.numel()}")
    outside = (labels < 0) | (labels > 1)
    if outside.any():
        row = int(outside.nonzero()[0, 0])
        raise ValueError(f"{name} must lie in [0, 1]; row {row} holds {float(labels[row])}")
    return labels


def _score_matrix(scores, name: str = "scores") -> torch.Tensor:
    """[B, N] scores in their own dtype: ranks only compare them, which is exact in any dtype."""
    scores = _finite(name, scores, double=False)
    scores = scores if scores.is_floating_point() else scores.double()
    if scores.dim() != 2:
        raise ValueError(f"{name} must be [B, N] (users × items), got shape {tuple(scores.shape)}")
    return scores


def _mask(mask, scores: torch.Tensor, name: str) -> torch.Tensor:
    mask = _as_tensor(mask)
    if mask.shape != scores.shape:
        raise ValueError(f"{name} must have the scores' shape {tuple(scores.shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {mask.dtype}")
    return mask


def _targets(targets, scores: torch.Tensor) -> torch.Tensor:
    targets = _as_tensor(targets)
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.dim() != 1:
        raise ValueError(f"targets must be a 1-D integer tensor, got {targets.dtype} of shape {tuple(targets.shape)}")
    if targets.numel() != scores.shape[0]:
        raise ValueError(f"targets has {targets.numel()} rows but scores has {scores.shape[0]}")
    outside = (targets < 0) | (targets >= scores.shape[1])
    if outside.any():
        row = int(outside.nonzero()[0, 0])
        raise ValueError(f"targets[{row}] = {int(targets[row])} is not an item id in [0, {scores.shape[1]})")
    return targets.long()


def _ks(k: int | Iterable[int]) -> list[int]:
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or any(not is_int(v) or v < 1 for v in ks):
        raise ValueError(f"k must be a positive integer or a list of them, got {k!r}")
    return ks


# ---------------------------------------------------------------------------------------------
# click metrics


def log_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy of sigmoid(logits) against labels in [0, 1], in float64:
    mean_b softplus(s_b) − y_b·s_b. Takes **logits**, not probabilities. NaN for no rows."""
    logits = _finite("logits", logits).flatten()
    labels = _labels(labels, logits)
    if logits.numel() == 0:
        return float("nan")
    return float((torch.nn.functional.softplus(logits) - labels * logits).mean())


def _midranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values``, tied values sharing their average rank (float64)."""
    order = torch.argsort(values)
    _, inverse, counts = torch.unique(values[order], return_inverse=True, return_counts=True)
    average = torch.cumsum(counts, 0).double() - (counts.double() - 1) / 2
    ranks = torch.empty(values.shape, dtype=torch.float64, device=values.device)
    ranks[order] = average[inverse]
    return ranks


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative),
    ties counting one half (Mann-Whitney U over average ranks). Labels are 0/1 (> 0.5 counts as
    positive). NaN when a class is absent."""
    scores = _finite("scores", scores).flatten()
    labels = _labels(labels, scores) > 0.5
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _midranks(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def auc_standard_error(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """DeLong's standard error of ``auc(scores, labels)`` (module docstring); NaN unless there
    are at least two positives and two negatives."""
    scores = _finite("scores", scores).flatten()
    labels = _labels(labels, scores) > 0.5
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives < 2 or negatives < 2:
        return float("nan")
    every = _midranks(scores)
    below_positive = (every[labels] - _midranks(scores[labels])) / negatives  # V10 per positive
    above_negative = 1 - (every[~labels] - _midranks(scores[~labels])) / positives  # V01 per negative
    return math.sqrt(float(below_positive.var() / positives + above_negative.var() / negatives))


def undefined_auc_reason(labels) -> str | None:
    """Why ``auc`` over rows with these labels is NaN, or None when it is defined.

    AUC compares positives with negatives, so it needs both: the reason is "there are no rows" or
    "the rows hold only one label (all N are 0)" / "... (all N are 1)", with the same > 0.5 rule as
    ``auc``. ``auc`` itself keeps returning NaN; callers print the reason beside it, e.g.
    ``f"AUC undefined: {reason}"``.
    """
    labels = _finite("labels", labels).flatten()
    if labels.numel() == 0:
        return "there are no rows"
    positives = int((labels > 0.5).sum())
    if 0 < positives < labels.numel():
        return None
    return f"the rows hold only one label (all {labels.numel():,} are {1 if positives else 0})"


def _segment_keys(segments, rows: int) -> tuple[list[Hashable], torch.Tensor]:
    """The distinct segment values (in first-seen order for sequences, sorted for tensors) and
    each row's index into them."""
    if isinstance(segments, torch.Tensor):
        if segments.dim() != 1 or segments.is_floating_point():
            raise ValueError(
                f"segments must be a 1-D integer tensor or a sequence, got {segments.dtype} "
                f"of shape {tuple(segments.shape)}"
            )
        values, index = torch.unique(segments.detach(), return_inverse=True)
        keys = [v.item() for v in values]
    else:
        segments = list(segments)
        positions: dict[Hashable, int] = {}
        index = torch.tensor([positions.setdefault(s, len(positions)) for s in segments], dtype=torch.long)
        keys = list(positions)
    if index.numel() != rows:
        raise ValueError(f"segments has {index.numel()} values but the scores have {rows}")
    return keys, index


def per_segment(
    metric: Callable[[torch.Tensor, torch.Tensor], float],
    scores: torch.Tensor,
    labels: torch.Tensor,
    segments: torch.Tensor | Sequence[Hashable],
) -> dict[Hashable, float]:
    """``metric(scores[g], labels[g])`` for the rows g of each segment value.

    Args: scores [B], labels [B], segments [B] (an integer tensor or any sequence of hashable
    values: market codes, strings). Returns {segment: value}."""
    scores = _as_tensor(scores).flatten()
    labels = _as_tensor(labels).flatten()
    keys, index = _segment_keys(segments, scores.numel())
    return {key: metric(scores[index == g], labels[index == g]) for g, key in enumerate(keys)}


def segment_auc(scores, labels, segments) -> dict[Hashable, float]:
    """AUC per segment (NaN for a segment holding one class only); see ``per_segment``."""
    return per_segment(auc, scores, labels, segments)


def segment_log_loss(logits, labels, segments) -> dict[Hashable, float]:
    """Mean log loss per segment; see ``per_segment`` and ``log_loss``."""
    return per_segment(log_loss, logits, labels, segments)


def segment_counts(segments) -> dict[Hashable, int]:
    """Impressions (rows) per segment value, keyed as ``per_segment`` keys them."""
    keys, index = _segment_keys(segments, len(segments))
    counts = torch.bincount(index, minlength=len(keys))
    return {key: int(counts[g]) for g, key in enumerate(keys)}


def weighted_auc(per_segment_auc: dict[Hashable, float], counts: dict[Hashable, int]) -> float:
    """Impression-weighted mean Σ_g n_g·AUC_g / Σ_g n_g over the segments with a defined (non-NaN)
    AUC. ``counts`` must give a non-negative count for every segment. NaN if none is defined."""
    missing = [g for g in per_segment_auc if g not in counts]
    if missing:
        raise ValueError(f"counts has no entry for segment(s) {missing}")
    total = weighted = 0.0
    for g, value in per_segment_auc.items():
        n = counts[g]
        check_positive_number(f"counts[{g!r}]", n, allow_zero=True)
        if not math.isnan(value):
            total += n
            weighted += n * value
    return weighted / total if total > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# ranking over the full item set


def _count_at_or_above(scores: torch.Tensor, candidate: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """For each row b and query value q_bm: #{j candidate : s_bj ≥ q_bm}. scores, candidate
    [B, N]; queries [B, M] → [B, M] int64. Non-candidates are set to −inf (queries are finite)."""
    masked = scores.masked_fill(~candidate, -math.inf)
    ascending, _ = torch.sort(masked, dim=1)
    below = torch.searchsorted(ascending, queries.contiguous(), right=False)
    return scores.shape[1] - below


def rank_of_targets(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each row's target item among its candidates, ties pessimistic:
    rank_b = #{j ≠ t_b, not exclude[b, j] : scores[b, j] ≥ scores[b, t_b]}.

    Args: scores [B, N] float, targets [B] int in [0, N), exclude [B, N] bool or None (the target
    is a candidate even where exclude marks it). Returns ranks [B] int64."""
    scores = _score_matrix(scores)
    targets = _targets(targets, scores)
    exclude = None if exclude is None else _mask(exclude, scores, "exclude")
    rows = torch.arange(scores.shape[0], device=scores.device)
    at_or_above = scores >= scores[rows, targets].unsqueeze(1)  # [B, N], O(B·N), no sort
    if exclude is not None:
        at_or_above &= ~exclude
    at_or_above[rows, targets] = False  # the target itself
    return at_or_above.sum(1)


def _hits_and_gains(ranks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    hit = ranks < k
    gain = torch.where(hit, 1.0 / torch.log2(ranks.double() + 2), torch.zeros((), dtype=torch.float64))
    return hit.double(), gain


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else float("nan")


def hit_rate_at_k(scores, targets, k: int, exclude=None) -> float:
    """HR@K = mean_b [rank_b < K] (see ``rank_of_targets``). NaN for no rows."""
    (k,) = _ks(k)
    return _mean(_hits_and_gains(rank_of_targets(scores, targets, exclude), k)[0])


def ndcg_at_k(scores, targets, k: int, exclude=None) -> float:
    """NDCG@K with one relevant item per row = mean_b [rank_b < K] / log2(rank_b + 2)."""
    (k,) = _ks(k)
    return _mean(_hits_and_gains(rank_of_targets(scores, targets, exclude), k)[1])


def ranking_metrics(scores, targets, ks: int | Iterable[int] = (10,), exclude=None) -> dict[str, float]:
    """{"hr@K": …, "ndcg@K": …} for every K, from one ranking pass."""
    ks = _ks(ks)
    ranks = rank_of_targets(scores, targets, exclude)
    out: dict[str, float] = {}
    for k in ks:
        hit, gain = _hits_and_gains(ranks, k)
        out[f"hr@{k}"], out[f"ndcg@{k}"] = _mean(hit), _mean(gain)
    return out


def recall_at_k(scores: torch.Tensor, target_mask: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> float:
    """Recall@K = mean_b |top-K_b ∩ R_b| / |R_b| with R_b = target_mask[b] (every row needs at least
    one relevant item). Relevant items are candidates even where ``exclude`` marks them; ties are
    pessimistic (see the module docstring).

    Args: scores [B, N], target_mask [B, N] bool, k, exclude [B, N] bool or None."""
    (k,) = _ks(k)
    scores = _score_matrix(scores)
    relevant = _mask(target_mask, scores, "target_mask")
    empty = ~relevant.any(dim=1)
    if empty.any():
        raise ValueError(f"target_mask row {int(empty.nonzero()[0, 0])} marks no relevant item")
    candidate = torch.ones_like(relevant) if exclude is None else ~_mask(exclude, scores, "exclude")
    candidate = candidate | relevant
    # an item is in the top-K when at most K candidates (itself included) score ≥ it
    in_top = (_count_at_or_above(scores, candidate, scores) <= k) & relevant
    return _mean(in_top.sum(1).double() / relevant.sum(1).double())


def sampled_ranking_metrics(
    pos_scores: torch.Tensor, neg_scores: torch.Tensor, k: int | Iterable[int] = 10
) -> dict[str, float]:
    """Rank each positive among its own sampled negatives (pessimistic ties):
    rank_b = #{j : neg_bj ≥ pos_b}. Returns {"sampled_hr@K", "sampled_ndcg@K"} for every K and
    "sampled_auc" = mean_b (#{neg_bj < pos_b} + ½·#{neg_bj = pos_b}) / n.

    Args: pos_scores [B], neg_scores [B, n] with n ≥ 1."""
    ks = _ks(k)
    pos = _finite("pos_scores", pos_scores)
    neg = _finite("neg_scores", neg_scores)
    if pos.dim() != 1 or neg.dim() != 2 or neg.shape[0] != pos.shape[0] or neg.shape[1] < 1:
        raise ValueError(
            f"pos_scores must be [B] and neg_scores [B, n ≥ 1]; got {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    above = neg > pos.unsqueeze(1)
    tied = neg == pos.unsqueeze(1)
    ranks = (above | tied).sum(1)
    out = {"sampled_auc": _mean(1.0 - (above.double().sum(1) + 0.5 * tied.double().sum(1)) / neg.shape[1])}
    for kk in ks:
        hit, gain = _hits_and_gains(ranks, kk)
        out[f"sampled_hr@{kk}"], out[f"sampled_ndcg@{kk}"] = _mean(hit), _mean(gain)
    return out
