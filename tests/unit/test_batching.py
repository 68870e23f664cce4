"""Micro-batching: concurrent requests share forward passes; failures stay with their request."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from roost.config import ServingSettings
from roost.serving.batching import MicroBatcher
from roost.serving.predictor import intra_op_threads, plan_batching

pytestmark = pytest.mark.unit


class FakeModel:
    """texts -> one row per text: [len(text), batch size]; records every forward pass."""

    def __init__(self, delay_s: float = 0.0, bad: str = "bad") -> None:
        self.delay_s = delay_s
        self.bad = bad
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        with self.lock:
            self.calls.append(list(texts))
        time.sleep(self.delay_s)
        if self.bad in texts:
            raise ValueError(f"cannot classify {self.bad!r}")
        return np.array([[len(t), len(texts)] for t in texts], dtype=np.float32)


class GatedModel(FakeModel):
    """A FakeModel whose first forward pass waits for ``gate`` (at most 30 s)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__(delay_s)
        self.gate = threading.Event()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        first = not self.calls
        result = super().__call__(texts)
        if first:
            self.gate.wait(30)
        return result


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_concurrent_requests_share_a_forward_pass() -> None:
    model = FakeModel(delay_s=0.02)
    batcher = MicroBatcher(model, max_batch_size=64, max_wait_s=0.0)

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(batcher.submit(["x" * 2 * (i + 1)]) for i in range(20)))

    results = run(main())
    assert isinstance(results, list)
    # Every caller gets its own row back, in order.
    assert [int(r[0, 0]) for r in results] == [2 * (i + 1) for i in range(20)]
    # The first request went alone; the other 19 queued behind it and shared one pass.
    assert [len(c) for c in model.calls] == [1, 19]
    assert batcher.stats.batches == 2 and batcher.stats.requests == 20
    assert batcher.stats.texts == 20


def test_a_lone_request_does_not_wait() -> None:
    """An idle batcher runs a lone request at once: with a 10-minute batch window, it is
    answered well inside a minute (asyncio.wait_for fails the test otherwise)."""
    model = FakeModel()
    batcher = MicroBatcher(model, max_batch_size=8, max_wait_s=600.0)

    async def main() -> np.ndarray:
        return await asyncio.wait_for(batcher.submit(["alone"]), timeout=60)

    result = run(main())
    assert int(result[0, 0]) == len("alone") and [len(c) for c in model.calls] == [1]


def test_batches_respect_max_batch_size_and_split_large_requests() -> None:
    model = FakeModel(delay_s=0.01)
    batcher = MicroBatcher(model, max_batch_size=4, max_wait_s=0.0)

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(
            batcher.submit(["a"]),  # goes alone
            batcher.submit(["b", "c"]),
            batcher.submit(["d", "e"]),  # 2 + 2 = 4: same batch as the one above
            batcher.submit(["f"] * 10),  # bigger than a batch: its own, in chunks of 4
        )

    results = run(main())
    assert isinstance(results, list)
    assert [r.shape[0] for r in results] == [1, 2, 2, 10]
    assert all(len(call) <= 4 for call in model.calls)
    assert ["b", "c", "d", "e"] in model.calls


def test_a_failing_request_fails_alone() -> None:
    model = FakeModel(delay_s=0.02)
    batcher = MicroBatcher(model, max_batch_size=64, max_wait_s=0.0)

    async def main() -> list[object]:
        first = asyncio.ensure_future(batcher.submit(["warm"]))
        await asyncio.sleep(0)  # the worker is busy with it; the next ones queue and merge
        rest = [batcher.submit(["good1"]), batcher.submit(["bad"]), batcher.submit(["good2"])]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = run(main())
    assert isinstance(results, list)
    ok1, bad, ok2 = results[1], results[2], results[3]
    assert isinstance(bad, ValueError) and "bad" in str(bad)
    assert isinstance(ok1, np.ndarray) and isinstance(ok2, np.ndarray)
    # The merged pass failed, then each request ran on its own.
    assert ["good1", "bad", "good2"] in model.calls and ["good1"] in model.calls


def test_batch_hook_sees_every_forward_pass() -> None:
    seen: list[tuple[int, int]] = []
    batcher = MicroBatcher(
        FakeModel(delay_s=0.01), 64, 0.0, on_batch=lambda r, t, s, p: seen.append((r, t))
    )

    async def main() -> None:
        await asyncio.gather(*(batcher.submit(["x", "y"]) for _ in range(5)))

    run(main())
    assert sum(r for r, _ in seen) == 5 and sum(t for _, t in seen) == 10


def test_enqueue_returns_a_future_of_the_running_loop() -> None:
    batcher = MicroBatcher(FakeModel(), 8, 0.0)

    async def main() -> np.ndarray:
        future = batcher.enqueue(["abc"])
        assert isinstance(future, asyncio.Future)
        return await future

    result = run(main())
    assert isinstance(result, np.ndarray) and result.tolist() == [[3.0, 1.0]]
    # A second event loop (a new test, a restarted server) starts clean.
    assert isinstance(run(main()), np.ndarray)


def test_plan_batching_sizes_from_the_measured_cost() -> None:
    cfg = ServingSettings(max_batch_size=64, max_batch_wait_ms=2.0, forward_budget_ms=10.0)
    plan = plan_batching({1: 0.05, 8: 0.15, 64: 1.0}, cfg)
    assert plan.max_batch_size == 64
    # fixed cost = cost(1) - per-text slope: about 0.035 ms, well under the 2 ms cap
    assert 0.0 < plan.max_wait_s < 0.0001
    slow = plan_batching({1: 3.0, 8: 8.0, 64: 40.0}, cfg)
    assert slow.max_batch_size == 8  # 64 texts take 40 ms > the 10 ms budget
    assert slow.max_wait_s == pytest.approx(0.002)  # the fixed cost (~2.4 ms) capped at 2 ms
    tight = plan_batching({1: 20.0, 8: 30.0}, cfg)
    assert tight.max_batch_size == 1  # nothing fits: the smallest measured size


def test_intra_op_threads_leave_a_core_for_the_event_loop() -> None:
    assert intra_op_threads(None, 1) == 1
    assert intra_op_threads(None, 2) == 1
    assert intra_op_threads(None, 8) == 7
    assert intra_op_threads(3, 8) == 3


def test_failing_batch_metrics_do_not_fail_the_answer() -> None:
    def broken_metrics(requests: int, texts: int, seconds: float, proba: np.ndarray) -> None:
        raise IndexError("a metrics bug")

    batcher = MicroBatcher(FakeModel(), max_batch_size=8, max_wait_s=0.0)
    batcher.on_batch = broken_metrics
    result = run(batcher.submit(["abc"]))
    assert isinstance(result, np.ndarray)
    assert result.tolist() == [[3.0, 1.0]]


def test_a_big_request_shares_the_worker_with_small_ones() -> None:
    """Issue 17 #10: a small request waits for one slice of a big one, not all of it."""
    model = GatedModel(delay_s=0.005)
    batcher = MicroBatcher(model, max_batch_size=4, max_wait_s=0.0)
    order: list[str] = []

    async def main() -> list[np.ndarray]:
        big = batcher.enqueue([f"big{i}" for i in range(40)])
        big.add_done_callback(lambda _: order.append("big"))
        # The small request arrives while the first slice of the big one is in the model
        # (held there until then: how far the worker gets on its own depends on scheduling).
        deadline = time.monotonic() + 30
        while not model.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        small = batcher.enqueue(["small"])
        small.add_done_callback(lambda _: order.append("small"))
        model.gate.set()
        return list(await asyncio.gather(big, small))

    results = run(main())
    assert isinstance(results, list)
    big, small = results
    # Answers are whole and in order, however they were sliced.
    assert big.shape == (40, 2) and [int(x) for x in big[:, 0]] == [4] * 10 + [5] * 30
    assert small.shape == (1, 2)
    assert order == ["small", "big"]
    calls_before_small = next(i for i, c in enumerate(model.calls) if "small" in c)
    assert calls_before_small <= 2, model.calls[:4]
    assert all(len(call) <= 4 for call in model.calls)


def test_a_failing_slice_fails_only_its_request() -> None:
    model = FakeModel(delay_s=0.002)
    batcher = MicroBatcher(model, max_batch_size=4, max_wait_s=0.0)

    async def main() -> list[object]:
        bad = batcher.enqueue(["x"] * 6 + ["bad"] + ["y"] * 6)
        good = batcher.enqueue(["fine"] * 9)
        return list(await asyncio.gather(bad, good, return_exceptions=True))

    bad, good = run(main())  # type: ignore[misc]
    assert isinstance(bad, ValueError)
    assert isinstance(good, np.ndarray) and good.shape == (9, 2)
