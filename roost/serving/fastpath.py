"""The fast path: plain inference requests answered without FastAPI, pydantic or KServe objects.

Profiling ``roost serve`` under load (see the README's benchmark section) showed most of each
request's CPU in the framework: routing, pydantic validation of the V2 body and response,
``jsonable_encoder``, the timing middleware, and an asyncio task per request. A POST to
``/v2/models/<name>/infer`` or ``/v1/models/<name>:predict`` with a plain JSON body (see
:func:`roost.serving.codec.plain_v2`) is instead decoded with orjson, batched, and answered
with the same bytes, headers and metrics as KServe's path. Everything else, and every request
whose inference fails, goes through KServe's app unchanged, so error codes and messages stay
those of the full path.

Two ways in, same decisions (:class:`FastPath`):

- :func:`http_protocol`: uvicorn's httptools protocol, answering plain requests from its
  parser callbacks (no task, no ASGI call chain, one write per response);
- :class:`FastASGI`: an ASGI app in front of KServe's, used if uvicorn's protocol internals
  are not the ones this was written against.

:class:`FastServicer` does the same for gRPC ``ModelInfer``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from kserve.metrics import POST_HIST_TIME, PRE_HIST_TIME, PREDICT_HIST_TIME, get_labels
from kserve.protocol.grpc.servicer import InferenceServicer
from starlette.types import ASGIApp, Receive, Scope, Send

from roost.monitor import events
from roost.serving import codec, metrics
from roost.serving.server import replay_body

if TYPE_CHECKING:
    from roost.serving.predictor import SentimentModel

log = logging.getLogger(__name__)

JSON_TYPES = frozenset({b"application/json", b"application/json; charset=utf-8"})
# Bodies up to this size: uvicorn buffers them without pausing the socket (its high-water
# mark is 64 KiB); larger ones, rare for texts, take KServe's path.
SMALL_BODY = 60_000
EVENT_ID_HEADER = events.EVENT_ID_HEADER.encode()


class _Meters:
    """The metrics of KServe's path, recorded in bulk.

    A request appends its four timestamps to a list; every ``FLUSH_EVERY`` requests, or
    ``FLUSH_AFTER_S`` after the first unflushed one, the counter and the histograms get
    them all at once (:func:`roost.serving.metrics.observe_many`). ``/metrics`` lags by at
    most that long; a request costs an append instead of five locked updates.
    """

    FLUSH_EVERY = 256
    FLUSH_AFTER_S = 0.2

    def __init__(self, model: SentimentModel, protocol: codec.Protocol) -> None:
        labels = {"model": model.name, "version": model.version or "unknown"}
        self.ok = metrics.REQUESTS.labels(**labels, protocol=protocol.value, outcome="ok")
        self.latency = metrics.LATENCY.labels(**labels, protocol=protocol.value)
        kserve_labels = get_labels(model.name)
        self.pre = PRE_HIST_TIME.labels(**kserve_labels)
        self.predict = PREDICT_HIST_TIME.labels(**kserve_labels)
        self.post = POST_HIST_TIME.labels(**kserve_labels)
        self._times: list[tuple[float, float, float, float]] = []
        self._timer: asyncio.TimerHandle | None = None

    def record(self, start: float, decoded: float, predicted: float, end: float) -> None:
        """Called on the event loop, once per answered request."""
        times = self._times
        times.append((start, decoded, predicted, end))
        if len(times) >= self.FLUSH_EVERY:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_AFTER_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._times:
            return
        t = np.array(self._times)
        self._times = []
        self.ok.inc(len(t))
        metrics.observe_many(self.latency, t[:, 3] - t[:, 0])
        metrics.observe_many(self.pre, t[:, 1] - t[:, 0])
        metrics.observe_many(self.predict, t[:, 2] - t[:, 1])
        metrics.observe_many(self.post, t[:, 3] - t[:, 2])


class FastPath:
    """Which requests are plain, how to decode them, and their answer bytes."""

    def __init__(self, model: SentimentModel, max_body_bytes: int) -> None:
        self.model = model
        self.limit = max_body_bytes
        self.routes = {
            f"/v2/models/{model.name}/infer": codec.Protocol.REST_V2,
            f"/v1/models/{model.name}:predict": codec.Protocol.REST_V1,
        }
        self.meters = {p: _Meters(model, p) for p in self.routes.values()}
        self.payload = model.payload  # roost.monitor's payload logger (None: logging off)
        self.headers = [(b"content-type", b"application/json")] + [
            (k.encode(), v.encode()) for k, v in model.response_headers().items()
        ]

    def route(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Any:
        """The protocol of a plain JSON POST to an inference route, within the body limit."""
        protocol = self.routes.get(path)
        if protocol is None or method != "POST" or not self.model.ready:
            return None
        length = None
        json_body = False
        for key, value in headers:
            if key == b"content-length":
                length = value
            elif key == b"content-type":
                json_body = value.lower() in JSON_TYPES
            elif key in (b"inference-header-content-length", b"transfer-encoding", b"expect"):
                return None  # binary tensor extension, streamed body, 100-continue
            elif key.startswith(b"ce-"):
                return None  # a CloudEvent
        if not json_body or length is None or not length.isdigit() or int(length) > self.limit:
            return None
        return protocol if int(length) <= SMALL_BODY else None

    def decode(self, protocol: codec.Protocol, body: bytes) -> tuple[list[str], str] | None:
        """(texts, request id) of a plain request; None: KServe's path must take it."""
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if protocol is codec.Protocol.REST_V2:
            plain = codec.plain_v2(payload)
        else:
            texts = codec.plain_v1(payload)
            plain = None if texts is None else (texts, "")
        if plain is not None and self.payload is not None:  # the id its events will carry
            plain = (plain[0], self.payload.event_id(plain[1]))
        return plain

    def log(self, event_id: str, request: bytes, response: bytes) -> list[tuple[bytes, bytes]]:
        """Queue the payload events (when logging is on); the response headers that name them."""
        if self.payload is None:
            return []
        self.payload.log(event_id, request, response)
        return [(EVENT_ID_HEADER, event_id.encode())]

    def encode(self, protocol: codec.Protocol, request_id: str, proba: np.ndarray) -> bytes:
        model = self.model
        names = model.names(proba)
        if protocol is codec.Protocol.REST_V2:
            return codec.v2_json(model.name, model.version, request_id, model.labels, names, proba)
        return codec.v1_json(model.labels, names, proba)


# -- uvicorn's httptools protocol ------------------------------------------------------------
def http_protocol(fast: FastPath) -> type[Any] | None:
    """uvicorn's ``HttpToolsProtocol`` answering plain requests itself; None if unsupported.

    uvicorn keeps its per-request state machine (keep-alive, pipelining, flow control,
    graceful shutdown): the subclass only replaces the ASGI task of a plain request with
    callbacks, and writes the response the way uvicorn's ``send`` would.
    """
    try:
        from uvicorn.protocols.http import httptools_impl as impl
        from uvicorn.protocols.utils import get_client_addr
    except ImportError:
        return None
    needed = ("_start_asgi_task", "on_message_complete", "on_response_complete")
    if not all(hasattr(impl.HttpToolsProtocol, n) for n in needed) or not all(
        hasattr(impl, n) for n in ("STATUS_LINE", "RequestResponseCycle")
    ):
        return None
    status_200: bytes = impl.STATUS_LINE[200]

    class FastHttpToolsProtocol(impl.HttpToolsProtocol):  # type: ignore[misc, name-defined]
        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            scope = cycle.scope
            protocol = None
            if app is self.app and scope.get("http_version") == "1.1":
                protocol = fast.route(scope["method"], scope["path"], scope["headers"])
            if protocol is None:
                super()._start_asgi_task(cycle, app)
                return
            cycle.roost_fast = (protocol, app)
            if not cycle.more_body:  # a pipelined request, read in full already
                self._fast_start(cycle)

        def on_message_complete(self) -> None:
            cycle = self.cycle
            super().on_message_complete()
            if cycle is not None and getattr(cycle, "roost_fast", None) and not cycle.more_body:
                self._fast_start(cycle)

        def _fast_start(self, cycle: Any) -> None:
            protocol, app = cycle.roost_fast
            cycle.roost_fast = None
            start = time.perf_counter()
            decoded = fast.decode(protocol, bytes(cycle.body))
            if decoded is None:
                super()._start_asgi_task(cycle, app)  # body still in cycle.body for receive()
                return
            texts, request_id = decoded
            ready = time.perf_counter()
            future = fast.model.enqueue(texts)
            future.add_done_callback(
                lambda done: self._fast_finish(cycle, app, protocol, request_id, done, start, ready)
            )

        def _fast_finish(
            self,
            cycle: Any,
            app: Any,
            protocol: codec.Protocol,
            request_id: str,
            done: asyncio.Future[np.ndarray],
            start: float,
            decoded: float,
        ) -> None:
            if cycle.disconnected or self.transport.is_closing():
                return
            if done.cancelled() or done.exception() is not None:
                super()._start_asgi_task(cycle, app)  # KServe's path reruns it, renders errors
                return
            predicted = time.perf_counter()
            try:
                body = fast.encode(protocol, request_id, done.result())
            except Exception:  # a callback has no caller to tell: KServe's path answers instead
                log.exception("fast path could not encode an answer; KServe's path serves it")
                super()._start_asgi_task(cycle, app)
                return
            head = [status_200]
            logged = fast.log(request_id, bytes(cycle.body), body)
            for name, value in (*cycle.default_headers, *fast.headers, *logged):
                head += [name, b": ", value, b"\r\n"]
            head.append(b"content-length: %d\r\n" % len(body))
            if not cycle.keep_alive:
                head.append(b"connection: close\r\n")
            head += [b"\r\n", body]
            if cycle.access_log and cycle.access_logger.isEnabledFor(logging.INFO):
                cycle.access_logger.info(  # the line uvicorn's send() logs
                    '%s - "%s %s HTTP/%s" %d', get_client_addr(cycle.scope),
                    "POST", cycle.scope["path"], "1.1", 200,
                )  # fmt: skip
            cycle.response_started = True
            cycle.response_complete = True
            self.transport.write(b"".join(head))
            cycle.message_event.set()
            if not cycle.keep_alive:
                self.transport.close()
            cycle.on_response()
            fast.meters[protocol].record(start, decoded, predicted, time.perf_counter())

    return FastHttpToolsProtocol


# -- ASGI (fallback) ------------------------------------------------------------------------
class FastASGI:
    """ASGI app in front of KServe's: plain REST inference here, the rest passed through."""

    def __init__(self, fast: FastPath, app: ASGIApp) -> None:
        self.fast = fast
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        protocol = None
        if scope["type"] == "http":
            protocol = self.fast.route(scope["method"], scope["path"], scope["headers"])
        if protocol is None:
            await self.app(scope, receive, send)
            return
        body = await _read(receive)
        if body is None:
            return  # the client went away
        if not await self._answer(protocol, body, send):
            await self.app(scope, replay_body(body, receive), send)

    async def _answer(self, protocol: codec.Protocol, body: bytes, send: Send) -> bool:
        """Answer a plain request; False (nothing sent) when KServe's path must take it."""
        fast = self.fast
        start = time.perf_counter()
        decoded = fast.decode(protocol, body)
        if decoded is None:
            return False
        texts, request_id = decoded
        ready = time.perf_counter()
        try:
            proba = await fast.model.infer(texts)
        except Exception:  # KServe's path reruns it and renders the error
            return False
        predicted = time.perf_counter()
        out = fast.encode(protocol, request_id, proba)
        logged = fast.log(request_id, body, out)
        headers = [*fast.headers, *logged, (b"content-length", b"%d" % len(out))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})
        fast.meters[protocol].record(start, ready, predicted, time.perf_counter())
        return True


async def _read(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


# -- gRPC -----------------------------------------------------------------------------------
class FastServicer(InferenceServicer):  # type: ignore[misc]
    """KServe's gRPC servicer, with plain ``ModelInfer`` requests answered directly."""

    def __init__(self, data_plane: Any, repository: Any, model: SentimentModel) -> None:
        super().__init__(data_plane, repository)
        self.model = model
        self.meters = _Meters(model, codec.Protocol.GRPC_V2)

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # gRPC's method name
        start = time.perf_counter()
        model = self.model
        texts = codec.plain_grpc(request, model.name) if model.ready else None
        if texts is None:
            return await super().ModelInfer(request, context)
        decoded = time.perf_counter()
        try:
            proba = await model.infer(texts)
        except Exception:  # KServe's path reruns it and renders the error
            return await super().ModelInfer(request, context)
        predicted = time.perf_counter()
        payload = model.payload
        event_id = request.id if payload is None else payload.event_id(request.id)
        names = model.names(proba)
        response = codec.grpc_response(
            model.name, model.version, event_id, model.labels, names, proba
        )
        if payload is not None:  # roost.monitor: log it, and name the events in the metadata
            await context.send_initial_metadata(((events.EVENT_ID_HEADER, event_id),))
            payload.log_grpc(event_id, texts, model, names, proba)
        self.meters.record(start, decoded, predicted, time.perf_counter())
        return response
