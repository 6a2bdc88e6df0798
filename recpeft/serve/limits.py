"""ServeLimits: the bounds the scoring server holds every request to, and its micro-batch policy.

A request over a bound is refused at once with a 4xx naming the bound (413 for size, 503 when the
queue is full or the answer is late), so no request can take the server's memory or its worker
with it.

Example::

    limits = ServeLimits(max_rows=256, batch_wait_ms=1.0)
"""

from __future__ import annotations

from dataclasses import dataclass

from recpeft.utils.validation import check_int, check_positive_number


@dataclass(frozen=True)
class ServeLimits:
    """Bounds of one scoring server.

    Args:
        max_rows: rows one ``POST /score`` may carry (more: 413).
        max_body_bytes: bytes of one request body (more: 413, refused before it is read whole).
        batch_rows: rows one micro-batch gathers at most (≥ ``max_rows``, so every request fits
            one batch): requests join a batch whole, in arrival order, until the next would pass it.
        batch_wait_ms: how long the first request of a batch waits for others to join it (≥ 0;
            0: a batch is whatever is queued when the worker is free).
        max_pending: requests queued for scoring at most (more: 503, try again).
        timeout_s: seconds a request waits for its scores before it is answered 503 (the worker
            goes on; a late result is dropped).

    Raises ValueError naming the field when a value is out of range.
    """

    max_rows: int = 1024
    max_body_bytes: int = 1 << 20
    batch_rows: int = 4096
    batch_wait_ms: float = 2.0
    max_pending: int = 256
    timeout_s: float = 30.0

    def __post_init__(self):
        for field in ("max_rows", "max_body_bytes", "batch_rows", "max_pending"):
            check_int(f"ServeLimits.{field}", getattr(self, field))
        check_positive_number("ServeLimits.batch_wait_ms", self.batch_wait_ms, allow_zero=True)
        check_positive_number("ServeLimits.timeout_s", self.timeout_s)
        if self.batch_rows < self.max_rows:
            raise ValueError(
                f"ServeLimits.batch_rows ({self.batch_rows}) must be ≥ max_rows ({self.max_rows}): "
                "a request joins one batch whole"
            )
