"""Payload logging from the predictor: every answered inference as two CloudEvents.

The request path only appends to a bounded in-memory queue (no I/O, no lock held across
I/O, no await); a daemon thread drains it, batches, sends, retries with exponential backoff,
and counts what it had to give up on in ``roost_payload_events_dropped_total``. Inference
never waits for, or fails because of, the log: a full queue drops the new events (counted)
instead of growing or blocking, and a receiver that is down costs retries in the sender thread.

Two content modes (``serving.logging.format``):

- ``batch`` (default): one POST per batch, ``application/cloudevents-batch+json`` (the
  CloudEvents HTTP binding's batched mode; roost's receiver takes it). Each element is the
  structured form of the event KServe's agent sends. One POST per event cannot keep up with
  inference rates (measured on 2 CPUs: 64-626 acknowledged one-event POSTs/s from 16
  concurrent clients, depending on load; this sender has one connection; the predictor
  answers thousands of requests/s);
- ``binary``: one POST per event with ``ce-*`` headers and the raw JSON body, exactly what
  KServe's logger agent sends (any CloudEvents receiver takes it).

Why our own sender and not the ``cloudevents`` SDK: the SDK builds and sends one event per
call on the caller's thread; what matters here (a bounded queue, batching, drop accounting
off the event loop) is the part it does not have, and the format itself is a handful of headers.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from prometheus_client import Counter

from roost.monitor import events

if TYPE_CHECKING:
    from roost.config import PayloadLoggingSettings

log = logging.getLogger(__name__)

DROPPED = Counter(
    "roost_payload_events_dropped_total",
    "Payload events not delivered to the receiver (queue full, rejected, or retries exhausted).",
    ["model", "version", "reason"],
)
SENT = Counter(
    "roost_payload_events_sent_total",
    "Payload events the receiver acknowledged.",
    ["model", "version"],
)

# What the queue holds per event: (id, type, unix time, JSON body or a function making it).
Body = bytes | Callable[[], bytes]
Item = tuple[str, str, float, Body]
PERMANENT = frozenset(range(400, 500)) - {408, 425, 429}


def text_request(event_id: str, texts: list[str]) -> bytes:
    """The REST v2 JSON of a request that arrived another way (gRPC, a non-JSON body)."""
    return orjson.dumps(
        {
            "id": event_id,
            "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}],
        }
    )


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


class PayloadLogger:
    """Queue + background sender of inference events for one model server."""

    def __init__(self, cfg: PayloadLoggingSettings, model: str, version: str | None) -> None:
        if not cfg.url:
            raise ValueError("serving.logging.url is required to log payloads")
        self.cfg = cfg
        self.url = cfg.url
        self.model = model
        self.version = version or "unknown"
        self.log_request = cfg.mode in ("all", "request")
        self.log_response = cfg.mode in ("all", "response")
        # Event ids: a random per-process prefix and a counter (cheaper than a uuid4 each).
        self._prefix = f"{os.urandom(6).hex()}-"
        self._counter = itertools.count(1)
        self._queue: collections.deque[Item] = collections.deque()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._source = cfg.source or f"/roost/{socket.gethostname()}/{model}"
        self._attributes = {
            "inferenceservicename": cfg.inference_service or model,
            "namespace": cfg.namespace,
            "component": "predictor",
            "endpoint": cfg.endpoint,
            events.VERSION_EXTENSION: self.version,
        }
        self._dropped = {
            reason: DROPPED.labels(model=model, version=self.version, reason=reason)
            for reason in ("queue_full", "rejected", "retries_exhausted")
        }
        self._sent = SENT.labels(model=model, version=self.version)
        self.sent = 0
        self._progress = 0

    # -- the request path (event loop): O(1), never blocks -------------------------------------
    def event_id(self, request_id: str = "") -> str:
        """The id of a request's events: the client's request id, else a new one."""
        return request_id or f"{self._prefix}{next(self._counter):x}"

    def log(self, event_id: str, request: Body, response: Body) -> None:
        """Queue the request and response events of one answered inference (maybe sampled out)."""
        rate = self.cfg.sample_rate
        if rate < 1.0 and random.random() >= rate:
            return
        now = time.time()
        queue = self._queue
        wanted = self.log_request + self.log_response
        if len(queue) + wanted > self.cfg.queue_size:
            self._dropped["queue_full"].inc(wanted)
            return
        if self.log_request:
            queue.append((event_id, events.REQUEST_TYPE, now, request))
        if self.log_response:
            queue.append((event_id, events.RESPONSE_TYPE, now, response))
        if len(queue) >= self.cfg.batch_size:
            self._wake.set()

    def log_grpc(
        self, event_id: str, texts: list[str], model: Any, names: list[str], proba: Any
    ) -> None:
        """Log a gRPC inference as its REST v2 JSON equivalents (built in the sender thread)."""
        from roost.serving import codec

        name, version, labels = model.name, model.version, model.labels
        self.log(
            event_id,
            lambda: text_request(event_id, texts),
            lambda: codec.v2_json(name, version, event_id, labels, names, proba),
        )

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="payload-logger", daemon=True)
            self._thread.start()
            log.info(
                "payload logging url=%s format=%s mode=%s sample_rate=%s",
                self.url, self.cfg.format, self.cfg.mode, self.cfg.sample_rate,
            )  # fmt: skip

    def close(self, timeout: float = 5.0) -> None:
        """Stop the sender after it delivered what is queued (or ``timeout`` passed)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def pending(self) -> int:
        return len(self._queue)

    # -- the sender thread ------------------------------------------------------------------
    def _run(self) -> None:
        cfg = self.cfg
        with httpx.Client(timeout=cfg.timeout_s) as client:
            while True:
                if not self._queue:
                    if self._stop.is_set():
                        return
                    self._wake.wait(cfg.flush_interval_s)
                    self._wake.clear()
                    continue
                batch = self._take(cfg.batch_size)
                self._deliver(client, [self._event(item) for item in batch])

    def _take(self, limit: int) -> list[Item]:
        queue = self._queue
        out: list[Item] = []
        while queue and len(out) < limit:
            out.append(queue.popleft())
        return out

    def _event(self, item: Item) -> events.Event:
        event_id, kind, ts, body = item
        data = body if isinstance(body, bytes) else body()
        return events.Event(event_id, kind, self._source, rfc3339(ts), data, self._attributes)

    def _deliver(self, client: httpx.Client, batch: list[events.Event]) -> None:
        """Send ``batch``; retry transient failures with backoff; count what is given up."""
        cfg = self.cfg
        remaining = batch
        attempt = 0
        while remaining:
            try:
                remaining = self._send(client, remaining)
                attempt = 0
                continue
            except _Rejected as exc:  # binary: that one event; batched: the whole batch
                bad = 1 if self.cfg.format == "binary" else len(remaining)
                log.warning("receiver rejected %d payload events: %s", bad, exc)
                self._dropped["rejected"].inc(bad)
                remaining = remaining[self._progress + bad :]
            except (httpx.HTTPError, _Transient) as exc:
                remaining = remaining[self._progress :]  # binary mode: those before got through
                attempt += 1
                if attempt > cfg.max_retries or (self._stop.is_set() and attempt > 1):
                    log.warning(
                        "dropping %d payload events after %d attempts: %s",
                        len(remaining), attempt, exc,
                    )  # fmt: skip
                    self._dropped["retries_exhausted"].inc(len(remaining))
                    return
                delay = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (attempt - 1))
                self._stop.wait(delay * (0.5 + random.random() / 2))

    def _send(self, client: httpx.Client, batch: list[events.Event]) -> list[events.Event]:
        """Send ``batch``; returns []; on a failure raises, with ``_progress`` events sent."""
        self._progress = 0
        if self.cfg.format == "batch":
            response = client.post(
                self.url,
                content=events.batch_body(batch),
                headers={"content-type": events.BATCH_CONTENT},
            )
            self._check(response)
            self._acknowledged(len(batch))
            return []
        for i, event in enumerate(batch):
            try:
                response = client.post(
                    self.url, content=event.data, headers=events.binary_headers(event)
                )
                self._check(response)
            except (httpx.HTTPError, _Transient, _Rejected):
                self._progress = i
                self._acknowledged(i)
                raise
        self._acknowledged(len(batch))
        return []

    def _acknowledged(self, n: int) -> None:
        if n:
            self.sent += n
            self._sent.inc(n)

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.is_success:
            return
        detail = f"HTTP {response.status_code}: {response.text[:200]}"
        if response.status_code in PERMANENT:
            raise _Rejected(detail)
        raise _Transient(detail)


class _Transient(Exception):
    """The receiver answered 5xx/408/429: worth another try."""


class _Rejected(Exception):
    """The receiver answered a 4xx that another try would not change."""
