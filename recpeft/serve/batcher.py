"""MicroBatcher: concurrent requests scored together, in one call of a scoring function.

Each request is a table of rows (a DataFrame). The batcher queues requests (at most
``max_pending``; one more is refused with :class:`QueueFull`) and runs one loop on the event loop:
take the oldest request, wait up to ``wait_s`` for others to join it while the batch stays within
``batch_rows`` rows (a request that would pass it opens the next batch), concatenate the batch's
rows in arrival order, call ``score`` on them once in the worker thread (``executor``, which the
caller shares with everything else that touches the scored model, so the model is used by one
thread at a time), and cut its output back into each request's rows: request k of a batch whose
requests hold n_0, n_1, ... rows gets rows [o_k, o_k + n_k) of every output column,
o_k = n_0 + ... + n_{k−1}. While the worker scores a batch, the next one gathers.

Failures stay with the request that caused them: when a batch's call raises, every request of it is
scored again alone (in the same worker call), so a bad request gets its own exception and the
others their scores. An exception never stops the loop, and a request whose caller gave up
(cancelled) is skipped.

Example::

    batcher = MicroBatcher(lambda frame: (model_scores(frame),), executor, batch_rows=4096, wait_s=0.002)
    batcher.start()                       # inside the running event loop
    (scores,) = await batcher.submit(frame)
    await batcher.stop()
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import pandas as pd

#: what ``score`` returns for a table of N rows: columns (lists, arrays), each of N values
Columns = Sequence[Sequence]


class QueueFull(RuntimeError):
    """The batcher already holds ``max_pending`` requests."""


@dataclass
class BatchStats:
    """What the batcher has done: calls of ``score`` (``batches``), the requests and rows they
    scored, and the most requests one batch held."""

    batches: int = 0
    requests: int = 0
    rows: int = 0
    largest_batch: int = 0


@dataclass
class _Pending:
    frame: pd.DataFrame
    future: asyncio.Future


class MicroBatcher:
    """Gathers requests (DataFrames) into batches of at most ``batch_rows`` rows, waiting at most
    ``wait_s`` seconds for a batch to fill, and scores each batch with one ``score`` call on
    ``executor``; at most ``max_pending`` requests wait (see the module docstring)."""

    def __init__(
        self,
        score: Callable[[pd.DataFrame], Columns],
        executor: Executor,
        *,
        batch_rows: int,
        wait_s: float,
        max_pending: int,
    ):
        self._score, self._executor = score, executor
        self.batch_rows, self.wait_s, self.max_pending = batch_rows, wait_s, max_pending
        self.stats = BatchStats()
        self._pending: collections.deque[_Pending] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # ---- the caller's side --------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop on the running event loop."""
        if self._task is not None:
            raise RuntimeError("MicroBatcher.start: already started")
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="recpeft-micro-batcher")

    async def stop(self) -> None:
        """Stop the loop; requests still queued get a RuntimeError."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        while self._pending:
            pending = self._pending.popleft()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the server is shutting down"))

    async def submit(self, frame: pd.DataFrame) -> Columns:
        """The output columns of ``score`` for ``frame``'s rows (scored with whatever else is
        queued); QueueFull when ``max_pending`` requests already wait; the exception ``score``
        raised for these rows otherwise."""
        if self._task is None:
            raise RuntimeError("MicroBatcher.submit: the batcher is not running (call start() first)")
        if len(self._pending) >= self.max_pending:
            raise QueueFull(f"{len(self._pending)} requests are waiting to be scored (at most {self.max_pending})")
        pending = _Pending(frame, asyncio.get_running_loop().create_future())
        self._pending.append(pending)
        self._arrived.set()
        return await pending.future

    # ---- the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather(loop)
            try:
                outcomes = await loop.run_in_executor(self._executor, self._score_batch, [p.frame for p in batch])
            except Exception as exc:  # the executor itself failed (shut down): every request hears of it
                outcomes = [exc] * len(batch)
            for pending, outcome in zip(batch, outcomes):
                if pending.future.done():  # its caller gave up waiting
                    continue
                if isinstance(outcome, BaseException):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)

    async def _wait_for_arrival(self, timeout: float | None) -> bool:
        """Wait until a request is queued (at most ``timeout`` seconds); whether one is."""
        if not self._pending:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                pass
        return bool(self._pending)

    async def _gather(self, loop) -> list[_Pending]:
        """The next batch: the oldest live request and those that join it in time."""
        while True:
            await self._wait_for_arrival(None)
            first = self._pending.popleft()
            if not first.future.done():
                break
        batch, rows = [first], len(first.frame)
        deadline = loop.time() + self.wait_s
        while rows < self.batch_rows:
            if not self._pending and not await self._wait_for_arrival(max(0.0, deadline - loop.time())):
                break
            nxt = self._pending[0]
            if nxt.future.done():
                self._pending.popleft()
                continue
            if rows + len(nxt.frame) > self.batch_rows:  # it opens the next batch
                break
            batch.append(self._pending.popleft())
            rows += len(nxt.frame)
        return batch

    def _score_batch(self, frames: list[pd.DataFrame]) -> list[Columns | Exception]:
        """(worker thread) One ``score`` call over every frame's rows, cut back per frame; when it
        raises, each frame alone, so that each gets its own outcome."""
        try:
            whole = self._call(frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True))
        except Exception as exc:
            if len(frames) == 1:
                return [exc]
            return [self._score_one(frame) for frame in frames]
        outcomes, start = [], 0
        for frame in frames:
            stop = start + len(frame)
            outcomes.append(tuple(column[start:stop] for column in whole))
            start = stop
        self._count(frames)
        return outcomes

    def _call(self, frame: pd.DataFrame) -> Columns:
        """``score(frame)``, checked to give every column one value per row."""
        columns = self._score(frame)
        lengths = [len(column) for column in columns]
        if any(n != len(frame) for n in lengths):
            raise RuntimeError(f"the scoring function returned columns of {lengths} values for {len(frame)} rows")
        return columns

    def _score_one(self, frame: pd.DataFrame) -> Columns | Exception:
        try:
            out = self._call(frame)
        except Exception as exc:
            return exc
        self._count([frame])
        return out

    def _count(self, frames: list[pd.DataFrame]) -> None:
        stats = self.stats
        stats.batches += 1
        stats.requests += len(frames)
        stats.rows += sum(len(f) for f in frames)
        stats.largest_batch = max(stats.largest_batch, len(frames))
