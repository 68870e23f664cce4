"""Measurements around the load: server CPU and memory, start-up time, the raw model.

CPU and memory cover a server's whole process tree (TorchServe is a Java frontend plus
Python workers; roost is one process), read from ``/proc`` through psutil.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np
import psutil

from roost.errors import Timeout


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants so far."""
    total = 0.0
    for p in _tree(pid):
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def tree_rss_mb(pid: int) -> float:
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / (1 << 20)


@dataclass
class RssSampler:
    """Peak RSS (MB) of a process tree, sampled every ``interval`` s in a thread."""

    pid: int
    interval: float = 0.1
    peak_mb: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self.peak_mb = max(self.peak_mb, tree_rss_mb(self.pid))
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, tree_rss_mb(self.pid))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, tree_rss_mb(self.pid))


def wait_ready(
    probe: Callable[[], bool],
    started: float,
    timeout: float,
    alive: Callable[[], bool],
    describe: Callable[[], str],
    interval: float = 0.02,
) -> float:
    """Poll ``probe`` every ``interval`` s; seconds from ``started`` (perf_counter) to ready."""
    deadline = time.perf_counter() + timeout
    while True:
        if probe():
            return time.perf_counter() - started
        if not alive():
            raise Timeout(f"server exited during start-up: {describe()}")
        if time.perf_counter() > deadline:
            raise Timeout(f"server not ready after {timeout:.0f}s: {describe()}")
        time.sleep(interval)


def http_ready(url: str, method: str = "GET", json: object = None) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            response = httpx.request(method, url, json=json, timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    return probe


@contextlib.contextmanager
def priority(nice: int) -> Iterator[int]:
    """Run the block with this thread at ``nice`` (Linux: per thread); yields what was set.

    Raising priority needs privileges; without them the block runs unchanged (yields 0).
    Processes started inside the block would inherit it, so start servers outside.
    """
    tid = threading.get_native_id()
    try:
        before = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except (OSError, AttributeError):
        yield 0
        return
    try:
        yield nice
    finally:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, before)


def raw_forward(
    forward: Callable[[Sequence[str]], np.ndarray],
    texts: Sequence[str],
    batch_sizes: Sequence[int],
    seconds_each: float,
) -> dict[int, float]:
    """Texts per second of ``forward`` at each batch size, in-process.

    Each size runs for ``seconds_each`` in chunks of about 256 texts; the rate is the median
    chunk's, so a burst of other work on the machine moves it little either way. Sizes larger
    than ``texts`` are left out.
    """
    rates: dict[int, float] = {}
    for size in batch_sizes:
        if size > len(texts):  # a sample smaller than the batch has no whole batch
            continue
        batches = [texts[i : i + size] for i in range(0, len(texts) - size + 1, size)]
        forward(batches[0])  # warm
        chunk_rates: list[float] = []
        deadline = time.perf_counter() + seconds_each
        i = 0
        while time.perf_counter() < deadline or len(chunk_rates) < 3:
            start = time.perf_counter()
            n = 0
            for _ in range(max(1, 256 // size)):
                batch = batches[i % len(batches)]
                forward(batch)
                n += len(batch)
                i += 1
            chunk_rates.append(n / (time.perf_counter() - start))
        rates[size] = round(float(np.median(chunk_rates)), 1)
    return rates
