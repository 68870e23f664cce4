"""Adaptive micro-batching: concurrent requests share one forward pass.

Requests wait in a list on the event loop; one worker thread runs the model, so inference
never blocks the loop. When the worker frees up it takes every waiting request, up to
``max_batch_size`` texts, as one batch (under load, batches fill by themselves while the
previous one runs). A request larger than the room left in a batch is split: one slice
goes now and the rest waits at the back of the queue, so a big request shares the worker
with the requests that arrive while it runs (round robin, one batch at a time) instead of
holding it for its whole length. When the worker is idle and traffic is concurrent (the last batch
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
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

BatchFn = Callable[[Sequence[str]], np.ndarray]
# (requests, texts, seconds, probabilities) once per forward pass, in the worker thread.
BatchHook = Callable[[int, int, float, np.ndarray], None]


@dataclass
class _Item:
    """One request: its texts, its future, and the parts of its answer computed so far."""

    texts: Sequence[str]
    future: asyncio.Future[np.ndarray]
    sent: int = 0  # texts handed to the worker so far
    parts: list[np.ndarray] = field(default_factory=list)


# (request, start, end): the texts[start:end] of one request inside a batch.
_Slice = tuple[_Item, int, int]


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

    def _take(self) -> list[_Slice]:
        """Up to ``max_batch_size`` texts: whole requests oldest first, the last one sliced.

        A request that does not fit whole gives a slice and goes to the back of the queue,
        so small requests behind it wait for one batch, not for all of its texts.
        """
        pending = self._pending
        room = self.max_batch_size
        batch: list[_Slice] = []
        while pending and room > 0:
            item = pending[0]
            take = min(room, len(item.texts) - item.sent)
            batch.append((item, item.sent, item.sent + take))
            item.sent += take
            room -= take
            pending.pop(0)
            if item.sent < len(item.texts):  # the rest waits its turn behind the others
                pending.append(item)
                break
        return batch

    def _dispatch(self) -> None:
        if not self._pending:
            self._busy = False
            return
        batch = self._take()
        self._concurrent = len(batch) > 1 or bool(self._pending)
        item, start, end = batch[0]
        if len(batch) == 1 and start == 0 and end == len(item.texts):
            texts = item.texts
        else:
            texts = [t for item, start, end in batch for t in item.texts[start:end]]
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

    def _finished(self, batch: list[_Slice], done: Future[np.ndarray]) -> None:
        exc = done.exception()
        if exc is not None:
            if len(batch) == 1:
                self._fail(batch[0][0], exc)
            else:
                # A merged batch failed: rerun its slices one by one, off the loop.
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
            offset = 0
            for item, start, end in batch:
                self._add(item, proba[offset : offset + end - start])
                offset += end - start
        self._dispatch()

    def _add(self, item: _Item, part: np.ndarray) -> None:
        """One slice's answer; the request is answered with its last slice."""
        if item.future.done():  # failed by another slice, or the caller went away
            return
        item.parts.append(part)
        answered = sum(p.shape[0] for p in item.parts)
        if answered < len(item.texts):
            return
        self.stats.requests += 1
        self.stats.texts += answered
        parts = item.parts
        _resolve(item.future, parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))

    def _fail(self, item: _Item, exc: BaseException) -> None:
        if item in self._pending:  # its other slices need not run
            self._pending.remove(item)
        _resolve(item.future, exc)

    def _isolate(self, batch: list[_Slice]) -> list[np.ndarray | BaseException]:
        results: list[np.ndarray | BaseException] = []
        for item, start, end in batch:
            try:
                results.append(self._run(item.texts[start:end], 1))
            except Exception as exc:  # each failure goes to its own caller
                results.append(exc)
        return results

    def _isolated(self, batch: list[_Slice], results: list[np.ndarray | BaseException]) -> None:
        for (item, _start, _end), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                self._fail(item, result)
            else:
                self._add(item, result)
        self._dispatch()

    def _forward(self, texts: Sequence[str]) -> np.ndarray:
        """Splits a batch larger than ``max_batch_size`` into max-size chunks (defensive)."""
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
