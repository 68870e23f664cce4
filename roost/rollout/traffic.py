"""Synthetic prediction traffic for a local canary: bounded in rate, count and time, loopback only.

The demo, the tests and ``roost rollout start --traffic-rps`` use it to give a canary something
to be judged on. Each answer is recorded with the version that served it (the predictor's
``x-roost-model-version`` header), so time to first canary traffic and failed requests during
a rollback can be measured from the client's side.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import httpx

from roost.errors import ConfigError, NotFound, Unavailable

if TYPE_CHECKING:
    from roost.registry import Registry
    from roost.rollout.backends.local import LocalBackend
    from roost.rollout.controller import Controller

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
VERSION_HEADER = "x-roost-model-version"

# One text per class: what `roost demo` predicts, and the traffic where a run has no test split.
SAMPLE_TEXTS = (
    "I love how smooth the new update is, great job!",
    "The flight was delayed three hours and nobody told us anything.",
    "The meeting is scheduled for Tuesday at 10am.",
)


def run_texts(registry: Registry, run_id: str, limit: int | None = None) -> list[str]:
    """The held-out test texts of a training run (real request sizes), else SAMPLE_TEXTS."""
    from roost import data

    try:
        frame = registry.test_split(run_id)
    except (NotFound, ConfigError):
        return list(SAMPLE_TEXTS)
    return [str(text) for text in frame[data.TEXT].tolist()[:limit]]


def start_canary_traffic(
    controller: Controller, backend: LocalBackend, model: str, texts: Sequence[str], rps: float
) -> Traffic:
    """Apply the rollout's first weight (the proxy and both servers come up), then send traffic."""
    controller.tick()
    endpoint = backend.endpoint()
    if endpoint is None:
        raise Unavailable(f"the local proxy of {backend.model} did not come up")
    return Traffic(endpoint, model, texts, rps=rps).start()


@dataclass(frozen=True)
class Answer:
    """One request: when it was sent (epoch seconds), how long it took, who answered how."""

    sent_at: float
    seconds: float
    status: int  # 0: no HTTP answer (connection error, timeout)
    version: str | None

    @property
    def ok(self) -> bool:
        return self.status == 200


class Traffic:
    """Send REST v1/v2 predictions to ``url`` from a background thread until stopped."""

    def __init__(
        self,
        url: str,
        model: str,
        texts: Sequence[str],
        rps: float = 50.0,
        concurrency: int = 4,
        max_requests: int = 50_000,
        max_seconds: float = 600.0,
        max_batch: int = 2,
        seed: int = 0,
    ) -> None:
        host = urlparse(url).hostname or ""
        if host not in LOOPBACK:
            raise ConfigError(f"synthetic traffic only goes to loopback, not {host!r}")
        if not texts:
            raise ConfigError("synthetic traffic needs at least one text")
        self.url = url.rstrip("/")
        self.model = model
        self.texts = list(texts)
        self.rps = rps
        self.concurrency = concurrency
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.max_batch = max_batch
        self.random = random.Random(seed)
        self._answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return self.answers()

    def answers(self) -> list[Answer]:
        with self._lock:
            return list(self._answers)

    def _body(self) -> tuple[str, dict[str, Any]]:
        texts = self.random.sample(
            self.texts, k=min(len(self.texts), self.random.randint(1, self.max_batch))
        )
        if self.random.random() < 0.5:
            return f"/v1/models/{self.model}:predict", {"instances": texts}
        tensor = {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}
        return f"/v2/models/{self.model}/infer", {"inputs": [tensor]}

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_seconds
        interval = 1.0 / self.rps
        next_slot = loop.time()
        sent = 0
        limits = httpx.Limits(max_connections=self.concurrency * 2)

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal next_slot, sent
            while not self._stop.is_set() and sent < self.max_requests:
                now = loop.time()
                if now >= deadline:
                    return
                slot = max(next_slot, now)
                next_slot = slot + interval
                sent += 1
                if slot > now:
                    await asyncio.sleep(slot - now)
                path, body = self._body()
                sent_at, start = time.time(), time.perf_counter()
                try:
                    response = await client.post(self.url + path, json=body)
                    status, version = response.status_code, response.headers.get(VERSION_HEADER)
                except httpx.HTTPError:
                    status, version = 0, None
                answer = Answer(sent_at, time.perf_counter() - start, status, version)
                with self._lock:
                    self._answers.append(answer)

        async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:
            await asyncio.gather(*(worker(client) for _ in range(self.concurrency)))


def summary(
    answers: Sequence[Answer], since: float | None = None, until: float | None = None
) -> dict[str, Any]:
    """Counts of answers sent in [since, until): total, failed, by version."""
    chosen = [
        a for a in answers
        if (since is None or a.sent_at >= since) and (until is None or a.sent_at < until)
    ]  # fmt: skip
    failed = [a for a in chosen if not a.ok]
    versions: dict[str, int] = {}
    for a in chosen:
        key = a.version or "none"
        versions[key] = versions.get(key, 0) + 1
    return {
        "requests": len(chosen),
        "failed": len(failed),
        "failed_fraction": round(len(failed) / len(chosen), 4) if chosen else 0.0,
        "by_version": versions,
    }


def first_answer_from(answers: Sequence[Answer], version: str, since: float = 0.0) -> float | None:
    """When the first request that ``version`` answered was sent (epoch seconds)."""
    times = [a.sent_at + a.seconds for a in answers if a.version == version and a.sent_at >= since]
    return min(times) if times else None
