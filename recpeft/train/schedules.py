"""Learning-rate schedules: linear warmup, then constant or cosine decay.

For optimizer step t (0-based: the t-th call of ``optimizer.step()``) of T planned steps, with
W warmup steps and floor ratio m, the learning rate is lr·f(t) with

    warmup   (t < W):   f(t) = (t + 1) / W
    constant (t ≥ W):   f(t) = 1
    cosine   (t ≥ W):   f(t) = m + (1 − m) · ½ · (1 + cos(π · p)),   p = min(1, (t − W) / max(1, T − W))

so the first step already moves (f(0) = 1/W, not 0), warmup reaches the full rate at step W − 1,
and cosine starts at lr at step W and approaches m·lr at step T (the last step, T − 1, is one
increment short of it; past T it stays at m·lr). W = ⌊warmup_fraction · T⌋.

The schedule is a pure function of t: a resumed run only needs the step count to continue it.

Example::

    schedule = LRSchedule(total_steps=100, warmup_steps=5, kind=Schedule.COSINE, min_lr_ratio=0.1)
    schedule(0), schedule(4), schedule(5), schedule(100)   # 0.2, 1.0, 1.0, 0.1
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from recpeft.utils.validation import check_fraction, check_int, is_int


class Schedule(str, Enum):
    """What the learning rate does after warmup."""

    CONSTANT = "constant"
    COSINE = "cosine"


def warmup_steps_for(total_steps: int, warmup_fraction: float) -> int:
    """W = ⌊warmup_fraction · T⌋."""
    return int(math.floor(warmup_fraction * total_steps))


@dataclass(frozen=True)
class LRSchedule:
    """The multiplier f(t) of the base learning rate (see the module docstring).

    Args:
        total_steps: T, the optimizer steps the run plans (≥ 1).
        warmup_steps: W in [0, T].
        kind: constant or cosine after warmup.
        min_lr_ratio: m in [0, 1], the cosine floor as a fraction of the base rate.
    """

    total_steps: int
    warmup_steps: int = 0
    kind: Schedule = Schedule.CONSTANT
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        check_int("total_steps", self.total_steps)
        if not is_int(self.warmup_steps) or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps must be an integer in [0, total_steps={self.total_steps}], got {self.warmup_steps!r}"
            )
        check_fraction("min_lr_ratio", self.min_lr_ratio)
        object.__setattr__(self, "kind", Schedule(self.kind))

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be ≥ 0, got {step}")
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind is Schedule.CONSTANT:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
