"""Adaptive micro-batching: concurrent requests share one forward pass.

Requests queue on the event loop; one worker thread runs the model. When the worker frees
up it takes everything queued, up to ``max_batch_size`` texts. It waits up to
``max_wait_s`` for more only while traffic is concurrent (the last batch merged several
requests), so a lone request never pays the wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

BatchFn = Callable[[Sequence[str]], np.ndarray]


@dataclass
class _Item:
    texts: Sequence[str]
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)


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
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch  # (requests, texts, seconds) per forward pass
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roost-infer")
        self._concurrent = False
        self._carry: _Item | None = None

    async def submit(self, texts: Sequence[str]) -> np.ndarray:
        if self._queue is None or self._task is None or self._task.done():
            self._start()
        assert self._queue is not None
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(texts, future))
        return await future

    def _start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="roost-batcher")

    async def _collect(self, first: _Item) -> list[_Item]:
        assert self._queue is not None
        batch, size = [first], len(first.texts)
        deadline = time.perf_counter() + (self.max_wait_s if self._concurrent else 0.0)
        while size < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if size + len(item.texts) > self.max_batch_size:
                # Too big to merge: put it back in front by processing it next round.
                self._carry = item
                break
            batch.append(item)
            size += len(item.texts)
        return batch

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = self._carry or await self._queue.get()
            self._carry = None
            batch = await self._collect(first)
            self._concurrent = len(batch) > 1 or not self._queue.empty()
            texts = [t for item in batch for t in item.texts]
            started = time.perf_counter()
            try:
                proba = await loop.run_in_executor(self._executor, self._forward, texts)
            except Exception as exc:  # noqa: BLE001 - the model's failure goes to its callers
                await self._isolate(batch, exc)
                continue
            elapsed = time.perf_counter() - started
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.texts += len(texts)
            if self.on_batch is not None:
                self.on_batch(len(batch), len(texts), elapsed)
            offset = 0
            for item in batch:
                n = len(item.texts)
                if not item.future.done():
                    item.future.set_result(proba[offset : offset + n])
                offset += n

    async def _isolate(self, batch: list[_Item], exc: Exception) -> None:
        """A merged batch failed: rerun its requests one by one so only the bad ones fail."""
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        loop = asyncio.get_running_loop()
        for item in batch:
            try:
                result = await loop.run_in_executor(self._executor, self._forward, item.texts)
            except Exception as item_exc:  # noqa: BLE001
                if not item.future.done():
                    item.future.set_exception(item_exc)
            else:
                if not item.future.done():
                    item.future.set_result(result)

    def _forward(self, texts: Sequence[str]) -> np.ndarray:
        """Run in the worker thread; splits oversized single requests into max-size chunks."""
        if len(texts) <= self.max_batch_size:
            return self.fn(texts)
        parts = [
            self.fn(texts[i : i + self.max_batch_size])
            for i in range(0, len(texts), self.max_batch_size)
        ]
        return np.concatenate(parts, axis=0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
