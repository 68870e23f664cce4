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

The sender thread shares the predictor's GIL, so its CPU per event is inference's loss. It
writes a batch's JSON as bytes (the constant part of each event encoded once) and posts it with
the standard library's ``http.client`` on one keep-alive connection: httpx cost 4 to 5 times the
CPU per POST of a 160 KB batch here (482 against 97 µs to a local nginx). The sender's CPU per
event: ``python -m roost.monitor.bench --sender 20000``.
"""

from __future__ import annotations

import collections
import functools
import http.client
import itertools
import logging
import os
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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


class _Clock:
    """``rfc3339`` as bytes, the seconds part formatted once per second (the sender's hot loop)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = b""

    def __call__(self, ts: float) -> bytes:
        second = int(ts)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
        return self._prefix + b".%06dZ" % int((ts - second) * 1e6)


class Poster:
    """POSTs to one URL over one keep-alive ``http.client`` connection (the sender's thread).

    A connection the receiver closed or reset is opened again once for the same POST; the
    receiver stores an event once even if it arrives twice, so that retry is safe.
    """

    def __init__(self, url: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"serving.logging.url: expected an http(s):// URL, got {url!r}")
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """(status, body) of the answer; raises OSError or http.client.HTTPException."""
        for attempt in (0, 1):
            conn = self._conn or self._connect()
            try:
                conn.request("POST", self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
                continue
            if response.will_close:
                self.close()
            return response.status, data
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        self._conn = cls(self.host, self.port, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


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
        # The constant part of every event of a type, encoded once: a batch element is this,
        # then the id, the time and the data (what ``events.structured`` gives, as bytes).
        constant = orjson.dumps(
            {
                "specversion": events.SPEC_VERSION,
                "source": self._source,
                "datacontenttype": events.BINARY_CONTENT,
                **self._attributes,
            }
        )[1:-1]
        self._heads = {
            kind: b'{"type":"' + kind.encode() + b'",' + constant + b',"id":'
            for kind in events.EVENT_TYPES
        }
        self._clock = _Clock()
        self._dropped = {
            reason: DROPPED.labels(model=model, version=self.version, reason=reason)
            for reason in ("queue_full", "rejected", "retries_exhausted")
        }
        self._sent = SENT.labels(model=model, version=self.version)
        self.sent = 0

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
        poster = Poster(self.url, cfg.timeout_s)
        try:
            while True:
                # Wait for a whole batch (``log`` wakes us) or the flush interval, whichever
                # is first: sending whatever is queued at once made batches of a few events
                # under steady load, one POST (and GIL hand-off) per handful of requests.
                if len(self._queue) < cfg.batch_size and not self._stop.is_set():
                    self._wake.wait(cfg.flush_interval_s)
                    self._wake.clear()
                if not self._queue:
                    if self._stop.is_set():
                        return
                    continue
                self._deliver(poster, self._take(cfg.batch_size))
        finally:
            poster.close()

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

    def batch_body(self, items: list[Item]) -> bytes:
        """The batched-mode body of ``items``: the JSON of ``events.batch_body`` of their events."""
        heads, clock, dumps = self._heads, self._clock, orjson.dumps
        out = [b"["]
        for event_id, kind, ts, body in items:
            data = body if isinstance(body, bytes) else body()
            out += (heads[kind], dumps(event_id), b',"time":"', clock(ts), b'","data":', data)
            out.append(b"},")
        if len(out) > 1:
            out[-1] = b"}]"
        else:
            out.append(b"]")
        return b"".join(out)

    def _deliver(self, poster: Poster, batch: list[Item]) -> None:
        """Send ``batch`` (one POST, or one per event in binary mode) and count what is lost."""
        if self.cfg.format == "batch":
            body = self.batch_body(batch)
            headers = {"content-type": events.BATCH_CONTENT}
            self._retrying(lambda: self._check(*poster.post(body, headers)), len(batch))
            return
        for k, item in enumerate(batch):
            event = self._event(item)
            post = functools.partial(poster.post, event.data, events.binary_headers(event))
            sent = self._retrying(lambda: self._check(*post()), 1)  # noqa: B023 - called here
            if sent is None:  # the receiver is gone: the rest of the batch goes the same way
                left = len(batch) - k - 1
                if left:
                    self._dropped["retries_exhausted"].inc(left)
                return

    def _retrying(self, post: Callable[[], None], n: int) -> bool | None:
        """``post`` until it succeeds (True), is refused for good (False, counted ``rejected``),
        or fails ``max_retries`` more times with backoff (None, counted ``retries_exhausted``)."""
        cfg = self.cfg
        attempt = 0
        while True:
            try:
                post()
            except _Rejected as exc:
                log.warning("receiver rejected %d payload events: %s", n, exc)
                self._dropped["rejected"].inc(n)
                return False
            except (OSError, http.client.HTTPException, _Transient) as exc:
                attempt += 1
                if attempt > cfg.max_retries or (self._stop.is_set() and attempt > 1):
                    log.warning("dropping payload events after %d attempts: %s", attempt, exc)
                    self._dropped["retries_exhausted"].inc(n)
                    return None
                delay = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (attempt - 1))
                self._stop.wait(delay * (0.5 + random.random() / 2))
                continue
            self._acknowledged(n)
            return True

    def _acknowledged(self, n: int) -> None:
        if n:
            self.sent += n
            self._sent.inc(n)

    @staticmethod
    def _check(status: int, body: bytes) -> None:
        if 200 <= status < 300:
            return
        detail = f"HTTP {status}: {body[:200].decode(errors='replace')}"
        if status in PERMANENT:
            raise _Rejected(detail)
        raise _Transient(detail)


class _Transient(Exception):
    """The receiver answered 5xx/408/429: worth another try."""


class _Rejected(Exception):
    """The receiver answered a 4xx that another try would not change."""
