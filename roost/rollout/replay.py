"""The copy of traffic for a shadow phase: read the champion's logged inferences, replay them.

The champion's payload logger (roost's own locally, KServe's logger agent in a cluster)
sends every request and response to the receiver (``roost monitor serve``); the receiver
keeps the latest ones numbered (``GET /v1/tail``). :class:`Feed` follows that tail with a
cursor kept in the rollout's state, and :func:`replay` sends the champion's requests to the
challenger, a few at a time, each with a timeout. Clients never wait on any of this: the
champion answered them before its events were even logged, so a slow or failing challenger
shows up in the shadow's tally and nowhere else.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from roost.monitor import payloads
from roost.rollout.backends.base import MetricsUnavailable
from roost.rollout.shadow import Answer, Logged

if TYPE_CHECKING:
    from roost.config import Settings


@dataclass(frozen=True)
class Cursor:
    """Where the shadow stands in the receiver's tail (``epoch``: which receiver process)."""

    epoch: str = ""
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seq": self.seq}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Cursor:
        data = data or {}
        return cls(str(data.get("epoch", "")), int(data.get("seq", 0)))


@dataclass(frozen=True)
class Batch:
    events: list[dict[str, Any]]
    cursor: Cursor
    restarted: bool = False  # the receiver restarted: events in between are not replayed


class Feed:
    """Reads the logged events of one model from the receiver's tail."""

    def __init__(self, url: str, model: str, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout

    def read(
        self, cursor: Cursor, limit: int, settle_s: float, now: float, since: float = 0.0
    ) -> Batch:
        """Events after ``cursor`` received in ``[since, now - settle_s)`` (a request's response
        may still be on its way for younger ones; older ones predate the shadow phase: they
        are skipped), and the cursor after them."""
        params: dict[str, str | int | float] = {
            "after": cursor.seq, "limit": limit, "model": self.model, "since": since,
        }  # fmt: skip
        try:
            response = httpx.get(f"{self.url}/v1/tail", params=params, timeout=self.timeout)
            response.raise_for_status()
            doc = orjson.loads(response.content)
        except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
            raise MetricsUnavailable(f"payload receiver {self.url}: {exc}") from None
        epoch = str(doc["epoch"])
        if cursor.epoch and epoch != cursor.epoch:
            # A new receiver process numbers from 1 again: start over at its beginning.
            return Batch([], Cursor(epoch, 0), restarted=True)
        if not cursor.epoch:
            cursor = Cursor(epoch, cursor.seq)
        taken: list[dict[str, Any]] = []
        seq = cursor.seq
        for event in doc["events"]:
            received = float(event["received"])
            if received > now - settle_s:
                return Batch(taken, Cursor(epoch, seq))
            if received >= since:
                taken.append(event)
            seq = int(event["seq"])
        # All taken: move past the other models' events the receiver skipped over, too.
        return Batch(taken, Cursor(epoch, max(seq, int(doc["next"]))))


def endpoint_path(body: Any, model: str) -> str | None:
    """Where a logged request goes: REST v1 (``instances``) or v2 (``inputs``)."""
    if isinstance(body, dict) and "instances" in body:
        return f"/v1/models/{model}:predict"
    if isinstance(body, dict) and "inputs" in body:
        return f"/v2/models/{model}/infer"
    return None


def _one(client: httpx.Client, base: str, model: str, logged: Logged) -> Answer:
    path = endpoint_path(logged.body, model)
    if path is None:
        return Answer(logged.id, 0.0, error="unreplayable: not a REST v1/v2 body")
    start = time.perf_counter()
    try:
        response = client.post(f"{base}{path}", json=logged.body)
    except httpx.TimeoutException:
        return Answer(logged.id, time.perf_counter() - start, error="timeout")
    except httpx.HTTPError as exc:
        return Answer(logged.id, time.perf_counter() - start, error=f"connection: {exc}")
    latency = time.perf_counter() - start
    if response.status_code >= 300:
        return Answer(logged.id, latency, error=f"http {response.status_code}")
    try:
        fields = payloads.response_fields(response.json())
    except ValueError:
        return Answer(logged.id, latency, error="invalid: not JSON")
    labels = fields.get("labels")
    if not labels:
        return Answer(logged.id, latency, error="invalid: no labels in the answer")
    return Answer(logged.id, latency, tuple(labels), tuple(fields.get("confidences") or ()))


def replay(
    inferences: list[Logged],
    base_url: str,
    model: str,
    timeout_s: float,
    concurrency: int,
    budget_s: float | None = None,
) -> list[Answer | None]:
    """The challenger's answers to ``inferences`` (same order); failures become answers.

    ``budget_s`` bounds the pass: an inference not yet sent when it runs out is not sent
    (``None``: left out of the tally, like one the sample skipped), so a challenger that hangs
    costs one pass at most ``budget_s + timeout_s``, never ``len(inferences) / concurrency``
    timeouts, and the controller keeps its lease and its check cadence.
    """
    if not inferences:
        return []
    base = base_url.rstrip("/")
    deadline = None if budget_s is None else time.monotonic() + budget_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    def one(client: httpx.Client, item: Logged) -> Answer | None:
        if deadline is not None and time.monotonic() >= deadline:
            return None
        return _one(client, base, model, item)

    with (
        httpx.Client(timeout=timeout_s, limits=limits) as client,
        ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="roost-shadow") as pool,
    ):
        return list(pool.map(lambda item: one(client, item), inferences))


def receiver_url(settings: Settings) -> str | None:
    """The receiver a shadow reads from: ``rollout.shadow.receiver_url``, else ``monitor.url``,
    else the one ``roost monitor up`` started (if it answers)."""
    from roost.monitor.local import receiver_url as monitor_url

    return settings.rollout.shadow.receiver_url or monitor_url(settings)
