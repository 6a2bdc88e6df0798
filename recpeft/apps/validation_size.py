"""Is a segment's validation slice large enough to decide what fine-tuning keeps?

Early stopping and ``keep_initial`` compare validation AUCs. On a slice of a few hundred rows
that AUC moves by chance more than fine-tuning moves it, and the kept epoch is noise (a small
market's validation AUC rose 0.613 → 0.643 while its test AUC fell). The noise is measured here
as DeLong's standard error of the base's AUC on the slice (:func:`recpeft.metrics.auc_standard_error`):
above :data:`NOISY_VALIDATION_SE` the fine-tune reports say so and what to do.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from recpeft.metrics import auc_standard_error
from recpeft.train.trainer import predict

from .workflow import EncodedSplit

#: a validation AUC whose standard error exceeds this cannot tell most fine-tuning gains
#: (0.002–0.03 AUC in recpeft's benchmarks) from chance
NOISY_VALIDATION_SE = 0.01


@torch.no_grad()
def validation_noise(base: nn.Module, data: EncodedSplit, segment: str) -> dict:
    """``valid_rows``, ``valid_positives`` and ``valid_auc_se`` (NaN when AUC is undefined
    there) of the base on ``segment``'s validation rows."""
    rows = data.segment_rows("valid", segment)
    labels = rows.encoded.labels
    positives = int((labels > 0.5).sum())
    defined = 0 < positives < len(rows)
    se = auc_standard_error(predict(base, rows), labels) if defined else float("nan")
    return {"valid_rows": len(rows), "valid_positives": positives, "valid_auc_se": se}


def noisy_validation_note(segment: str, noise: dict) -> str | None:
    """One line for a segment whose validation slice is too small to decide, else None."""
    se = noise["valid_auc_se"]
    if not math.isfinite(se) or se <= NOISY_VALIDATION_SE:
        return None
    return (
        f"{segment}: its {noise['valid_rows']:,} validation rows ({noise['valid_positives']:,} positive) "
        f"measure AUC only to ±{se:.3f} (one standard error), more than most fine-tuning gains, "
        "so the kept epoch may be chance: give it more rows (--valid-fraction) "
        f"or ask more of an epoch (--min-improvement {se:.3f})"
    )
