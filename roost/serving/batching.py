"""Adaptive micro-batching: concurrent requests share one forward pass.

Requests wait in a list on the event loop; one worker thread runs the model, so inference
never blocks the loop. When the worker frees up it takes every waiting request, up to
``max_batch_size`` texts, as one batch (under load, batches fill by themselves while the
previous one runs). When the worker is idle and traffic is concurrent (the last batch
merged several requests), a new request waits up to ``max_wait_s`` for company, which
pays only where a forward pass has a fixed cost worth sharing; a lone request never waits.

If a merged batch fails, its requests are rerun one by one so that only the bad ones fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

BatchFn = Callable[[Sequence[str]], np.ndarray]
# (requests, texts, seconds, probabilities) once per forward pass, in the worker thread.
BatchHook = Callable[[int, int, float, np.ndarray], None]


@dataclass
class _Item:
    texts: Sequence[str]
    future: asyncio.Future[np.ndarray]


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    texts: int = 0


class MicroBatcher:
    """Run ``fn`` (texts -> probabilities [n, classes]) over merged concurrent requests."""

    def __init__(
        self,
        fn: BatchFn,
        max_batch_size: int,
        max_wait_s: float,
        on_batch: BatchHook | None = None,
    ) -> None:
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roost-infer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Item] = []
        self._busy = False  # a batch is in the worker (or scheduled to go there)
        self._concurrent = False  # the last batch merged several requests

    async def submit(self, texts: Sequence[str]) -> np.ndarray:
        """Probabilities for ``texts``, computed in a batch with whatever else is waiting."""
        return await self.enqueue(texts)

    def enqueue(self, texts: Sequence[str]) -> asyncio.Future[np.ndarray]:
        """:meth:`submit` without a coroutine: a future of the event loop (call it there)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or a new loop (tests): start clean
            self._loop, self._pending, self._busy = loop, [], False
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append(_Item(texts, future))
        if not self._busy:
            self._busy = True
            if self._concurrent and self.max_wait_s > 0:
                # Give requests already on their way one loop turn (or the wait) to join.
                if self.max_wait_s < 0.001:
                    loop.call_soon(self._dispatch)
                else:
                    loop.call_later(self.max_wait_s, self._dispatch)
            else:
                self._dispatch()
        return future

    def _take(self) -> list[_Item]:
        """Whole requests, oldest first, up to ``max_batch_size`` texts (at least one)."""
        pending = self._pending
        size = len(pending[0].texts)
        n = 1
        while n < len(pending) and size + len(pending[n].texts) <= self.max_batch_size:
            size += len(pending[n].texts)
            n += 1
        batch = pending[:n]
        del pending[:n]
        return batch

    def _dispatch(self) -> None:
        if not self._pending:
            self._busy = False
            return
        batch = self._take()
        self._concurrent = len(batch) > 1 or bool(self._pending)
        texts = batch[0].texts if len(batch) == 1 else [t for item in batch for t in item.texts]
        work = self._executor.submit(self._run, texts, len(batch))
        loop = self._loop
        assert loop is not None
        work.add_done_callback(lambda done: loop.call_soon_threadsafe(self._finished, batch, done))

    def _run(self, texts: Sequence[str], requests: int) -> np.ndarray:
        """In the worker thread: the forward pass and the per-batch bookkeeping."""
        started = time.perf_counter()
        proba = self._forward(texts)
        elapsed = time.perf_counter() - started
        if self.on_batch is not None:
            try:
                self.on_batch(requests, len(texts), elapsed, proba)
            except Exception:  # bookkeeping must never fail the answer it measured
                log.exception("per-batch metrics failed (the batch was answered)")
        return proba

    def _finished(self, batch: list[_Item], done: Future[np.ndarray]) -> None:
        exc = done.exception()
        if exc is not None:
            if len(batch) == 1:
                _resolve(batch[0].future, exc)
            else:
                # A merged batch failed: rerun its requests one by one, off the loop.
                isolate = self._executor.submit(self._isolate, batch)
                loop = self._loop
                assert loop is not None
                isolate.add_done_callback(
                    lambda results: loop.call_soon_threadsafe(
                        self._isolated, batch, results.result()
                    )
                )
                return
        else:
            proba = done.result()
            self.stats.batches += 1
            self.stats.requests += len(batch)
            if len(batch) == 1:
                self.stats.texts += proba.shape[0]
                _resolve(batch[0].future, proba)
            else:
                offset = 0
                for item in batch:
                    n = len(item.texts)
                    _resolve(item.future, proba[offset : offset + n])
                    offset += n
                self.stats.texts += offset
        self._dispatch()

    def _isolate(self, batch: list[_Item]) -> list[np.ndarray | BaseException]:
        results: list[np.ndarray | BaseException] = []
        for item in batch:
            try:
                results.append(self._run(item.texts, 1))
            except Exception as exc:  # each failure goes to its own caller
                results.append(exc)
        return results

    def _isolated(self, batch: list[_Item], results: list[np.ndarray | BaseException]) -> None:
        for item, result in zip(batch, results, strict=True):
            _resolve(item.future, result)
        self._dispatch()

    def _forward(self, texts: Sequence[str]) -> np.ndarray:
        """Splits a single request larger than ``max_batch_size`` into max-size chunks."""
        if len(texts) <= self.max_batch_size:
            return self.fn(texts)
        parts = [
            self.fn(texts[i : i + self.max_batch_size])
            for i in range(0, len(texts), self.max_batch_size)
        ]
        return np.concatenate(parts, axis=0)


def _resolve(future: asyncio.Future[np.ndarray], result: np.ndarray | BaseException) -> None:
    if future.done():  # the caller went away (cancelled)
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
