"""MicroBatcher on its own (no HTTP): requests are gathered whole, in order, into batches of at
most ``batch_rows`` rows, and each gets exactly its own rows of the one scoring call back; a
failing request fails alone; a full queue is refused at once. ServeLimits refuses bad bounds."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

from recpeft.serve import MicroBatcher, ServeLimits
from recpeft.serve.batcher import QueueFull


def frames(sizes, seed=0):
    """One frame per size, of fresh random values, each row tagged with its frame."""
    rng = np.random.default_rng(seed)
    return [pd.DataFrame({"x": rng.normal(size=n), "tag": k}) for k, n in enumerate(sizes)]


def run(coroutine_fn, score, **settings):
    """``coroutine_fn(batcher)`` on a fresh event loop, with a batcher of ``score``."""

    async def main():
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(score, executor, **{"batch_rows": 64, "wait_s": 0.05, "max_pending": 64, **settings})
            batcher.start()
            try:
                return await coroutine_fn(batcher)
            finally:
                await batcher.stop()

    return asyncio.run(main())


def test_requests_join_whole_batches_in_order_and_get_their_own_rows():
    sizes = [5, 30, 1, 29, 40, 64, 2, 3]
    requests, batches = frames(sizes), []

    def score(frame):
        batches.append(frame["tag"].tolist())
        return (frame["x"].to_numpy() * 3 + 1, frame["tag"].tolist())

    async def submit_all(batcher):
        return await asyncio.gather(*(batcher.submit(f) for f in requests))

    answers = run(submit_all, score, batch_rows=64)
    for frame, (values, tags) in zip(requests, answers):
        np.testing.assert_array_equal(values, frame["x"].to_numpy() * 3 + 1)  # the same float64 ops
        assert tags == frame["tag"].tolist()
    assert [t for batch in batches for t in dict.fromkeys(batch)] == list(range(len(sizes)))  # arrival order
    assert all(len(batch) <= 64 for batch in batches) and len(batches) < len(sizes)
    for batch in batches:  # whole requests only
        assert all(batch.count(tag) == sizes[tag] for tag in set(batch))


def test_a_failing_request_fails_alone():
    requests = frames([4, 6, 5])
    requests[1]["x"] = np.nan

    def score(frame):
        if frame["x"].isna().any():
            raise ValueError("x: NaN")
        return (frame["x"].to_numpy(),)

    async def submit_all(batcher):
        return await asyncio.gather(*(batcher.submit(f) for f in requests), return_exceptions=True)

    answers = run(submit_all, score)
    assert isinstance(answers[1], ValueError) and str(answers[1]) == "x: NaN"
    for k in (0, 2):
        np.testing.assert_array_equal(answers[k][0], requests[k]["x"].to_numpy())


def test_a_full_queue_is_refused_at_once_and_the_rest_is_scored():
    entered, release = threading.Event(), threading.Event()
    requests = frames([2] * 4)

    def score(frame):
        entered.set()
        release.wait(10)
        return (frame["x"].to_numpy(),)

    async def overfill(batcher):
        first = asyncio.ensure_future(batcher.submit(requests[0]))
        while not entered.is_set():  # until the worker is busy with the first request
            await asyncio.sleep(0.005)
        queued = [asyncio.ensure_future(batcher.submit(f)) for f in requests[1:3]]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="at most 2"):
            await batcher.submit(requests[3])
        release.set()
        return await asyncio.gather(first, *queued)

    answers = run(overfill, score, max_pending=2, wait_s=0.0)
    for frame, (values,) in zip(requests, answers):
        np.testing.assert_array_equal(values, frame["x"].to_numpy())


def test_a_score_function_of_the_wrong_length_is_an_error_not_a_misaligned_answer():
    async def submit(batcher):
        return await asyncio.gather(*(batcher.submit(f) for f in frames([3, 4])), return_exceptions=True)

    answers = run(submit, lambda frame: (frame["x"].to_numpy()[:-1],))
    assert all(isinstance(a, RuntimeError) and "columns of [" in str(a) for a in answers)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_rows": 0}, "ServeLimits.max_rows must be a positive integer"),
        ({"max_body_bytes": 1.5}, "ServeLimits.max_body_bytes must be a positive integer"),
        ({"batch_wait_ms": -1.0}, "ServeLimits.batch_wait_ms must be a finite number ≥ 0"),
        ({"timeout_s": 0}, "ServeLimits.timeout_s must be a positive finite number"),
        ({"max_rows": 100, "batch_rows": 99}, r"ServeLimits.batch_rows \(99\) must be ≥ max_rows \(100\)"),
    ],
)
def test_bad_limits_are_refused_naming_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        ServeLimits(**settings)
