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
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from kserve.metrics import POST_HIST_TIME, PRE_HIST_TIME, PREDICT_HIST_TIME, get_labels
from kserve.protocol.grpc.servicer import InferenceServicer
from starlette.types import ASGIApp, Receive, Scope, Send

from roost.config import ServingSettings
from roost.monitor import events
from roost.serving import codec, guard, metrics, wire
from roost.serving.guard import Repository, replay_body

if TYPE_CHECKING:
    from roost.serving.predictor import SentimentModel

log = logging.getLogger(__name__)

JSON_TYPES = frozenset({b"application/json", b"application/json; charset=utf-8"})
# Bytes of a request line + headers at most (HTTP 431 over it).
MAX_HEAD_BYTES = 64 * 1024
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
        self.ok = metrics.REQUESTS.labels(**labels, protocol=protocol.label, outcome="ok")
        self.latency = metrics.LATENCY.labels(**labels, protocol=protocol.label)
        kserve_labels = get_labels(model.name)
        self.pre = PRE_HIST_TIME.labels(**kserve_labels)
        self.predict = PREDICT_HIST_TIME.labels(**kserve_labels)
        self.post = POST_HIST_TIME.labels(**kserve_labels)
        self._times: list[tuple[float, float, float, float]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._failed = {
            outcome: metrics.REQUESTS.labels(**labels, protocol=protocol.label, outcome=outcome)
            for outcome in ("invalid", "error")
        }

    def failed(self, status: int) -> None:
        """A request answered with an error (4xx: invalid, 5xx: error)."""
        self._failed["invalid" if status < 500 else "error"].inc()

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

    def __init__(
        self, model: SentimentModel, max_body_bytes: int, max_texts: int | None = None
    ) -> None:
        self.model = model
        self.limit = max_body_bytes
        self.max_texts = max_texts
        self.routes = {
            f"/v2/models/{model.name}/infer": codec.Protocol.REST_V2,
            f"/v1/models/{model.name}:predict": codec.Protocol.REST_V1,
        }
        if model.version:
            self.routes[f"/v2/models/{model.name}/versions/{model.version}/infer"] = (
                codec.Protocol.REST_V2
            )
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
        return protocol

    def decode(self, protocol: codec.Protocol, body: bytes) -> tuple[list[str], str] | None:
        """(texts, request id) of a plain request; None: KServe's path must take it.

        Raises :class:`~roost.serving.codec.TooManyTexts` for a plain request over the limit
        (answered 413 at once, without KServe's much slower parse of a big body).
        """
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if protocol is codec.Protocol.REST_V2:
            decoded = codec.plain_v2(payload)
            where = "inputs[0].data"
        else:
            texts = codec.plain_v1(payload)
            decoded = None if texts is None else (texts, "")
            where = "instances"
        if decoded is not None:
            codec.check_count(len(decoded[0]), self.max_texts, where)
            if self.payload is not None:  # the id its events will carry
                decoded = (decoded[0], self.payload.event_id(decoded[1]))
        return decoded

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
def http_protocol(fast: FastPath | None, cfg: ServingSettings) -> type[Any] | None:
    """uvicorn's ``HttpToolsProtocol`` with roost's connection limits, answering plain
    requests itself when ``fast`` is given; None if uvicorn's internals are not as expected.

    uvicorn keeps its per-request state machine (keep-alive, pipelining, flow control,
    graceful shutdown): the subclass replaces the ASGI task of a plain request with
    callbacks, and writes the response the way uvicorn's ``send`` would. Its limits, which
    uvicorn lacks (tests/integration/test_serving_hostile.py holds them):

    - ``header_timeout_s``: from connecting (or from the last answer) to a request's complete
      headers; a connection that sends nothing, or its headers slowly, is closed;
    - ``body_timeout_s``: from the headers to the complete body; then 408 and close;
    - ``max_connections``: a new connection over it closes the oldest connection that has
      no request in progress (or itself, when every one is busy);
    - ``MAX_HEAD_BYTES`` of request line and headers (over it: uvicorn's 400 and close).
    """
    try:
        from uvicorn.protocols.http import httptools_impl as impl
        from uvicorn.protocols.utils import get_client_addr
    except ImportError:
        return None
    if not guarded_internals_present(impl):
        return None
    status_200: bytes = impl.STATUS_LINE[200]
    status_lines: dict[int, bytes] = impl.STATUS_LINE
    header_timeout = cfg.header_timeout_s
    body_timeout = cfg.body_timeout_s
    max_connections = cfg.max_connections

    class RoostHttpToolsProtocol(impl.HttpToolsProtocol):  # type: ignore[misc, name-defined]
        # -- connection limits --------------------------------------------------------------
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.roost_since = time.monotonic()
            self.roost_head = 0
            self.roost_timer: asyncio.TimerHandle | None = None
            self._roost_arm(header_timeout, "header")
            if len(self.connections) > max_connections:
                self._roost_evict()

        def _roost_busy(self) -> bool:
            cycle = self.cycle
            return cycle is not None and not cycle.response_complete

        def _roost_evict(self) -> None:
            connections: set[Any] = self.connections
            idle = [c for c in connections if c is not self and not c._roost_busy()]
            victim = min(idle, key=lambda c: c.roost_since) if idle else self
            log.info("connection limit %d reached: closing an idle connection", max_connections)
            victim.transport.close()

        def _roost_arm(self, seconds: float, what: str) -> None:
            self._roost_disarm()
            self.roost_timer = self.loop.call_later(seconds, self._roost_expired, what)

        def _roost_disarm(self) -> None:
            timer = getattr(self, "roost_timer", None)
            if timer is not None:
                timer.cancel()
                self.roost_timer = None

        def _roost_expired(self, what: str) -> None:
            self.roost_timer = None
            transport = self.transport
            if transport.is_closing():
                return
            cycle = self.cycle
            if what == "body" and cycle is not None and not cycle.response_started:
                log.info("client error status=408 reason=request body not complete in %ss",
                         body_timeout)  # fmt: skip
                payload = b'{"error":"request body: not complete within the body timeout"}'
                self._roost_write(cycle, 408, payload, close=True)
            transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.roost_head = 0

        def on_url(self, url: bytes) -> None:
            self._roost_count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._roost_count(len(name) + len(value))
            super().on_header(name, value)

        def _roost_count(self, size: int) -> None:
            self.roost_head += size
            if self.roost_head > MAX_HEAD_BYTES:
                raise httptools_error(f"request head over {MAX_HEAD_BYTES} bytes")

        def on_headers_complete(self) -> None:
            self._roost_arm(body_timeout, "body")
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self._roost_busy():
                self._roost_arm(header_timeout, "header")

        def connection_lost(self, exc: Exception | None) -> None:
            self._roost_disarm()
            super().connection_lost(exc)

        # -- the fast path -----------------------------------------------------------------
        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            scope = cycle.scope
            protocol = None
            if fast is not None and app is self.app and scope.get("http_version") == "1.1":
                protocol = fast.route(scope["method"], scope["path"], scope["headers"])
            if protocol is None:
                super()._start_asgi_task(cycle, app)
                return
            cycle.roost_fast = (protocol, app)
            if not cycle.more_body:  # a pipelined request, read in full already
                self._fast_start(cycle)

        def on_body(self, body: bytes) -> None:
            cycle = self.cycle
            if getattr(cycle, "roost_fast", None) and not cycle.response_complete:
                # Within the body limit (route() checked Content-Length): buffer it whole,
                # without uvicorn's pause at 64 KiB (which waits for the app's receive()).
                cycle.body += body
                return
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._roost_disarm()
            cycle = self.cycle
            super().on_message_complete()
            if cycle is not None and getattr(cycle, "roost_fast", None) and not cycle.more_body:
                self._fast_start(cycle)

        def _fast_start(self, cycle: Any) -> None:
            assert fast is not None
            protocol, app = cycle.roost_fast
            cycle.roost_fast = None
            start = time.perf_counter()
            try:
                decoded = fast.decode(protocol, bytes(cycle.body))
            except InvalidInput as exc:
                self._fast_error(cycle, protocol, exc)
                return
            if decoded is None:
                super()._start_asgi_task(cycle, app)  # body still in cycle.body for receive()
                return
            texts, request_id = decoded
            ready = time.perf_counter()
            future = fast.model.enqueue(texts)
            future.add_done_callback(
                lambda done: self._fast_finish(cycle, protocol, request_id, done, start, ready)
            )

        def _fast_error(self, cycle: Any, protocol: codec.Protocol, exc: Exception) -> None:
            """Answer an error from the error itself (no second run through KServe's path)."""
            assert fast is not None
            status = guard.status_of(exc)
            reason = str(exc) or type(exc).__name__
            if status < 500:
                guard.client_error(status, "POST", cycle.scope["path"], reason)
            else:
                log.error("server error path=%s", cycle.scope["path"], exc_info=exc)
            fast.meters[protocol].failed(status)
            payload = orjson.dumps({"error": codec.show(reason)})
            self._roost_write(cycle, status, payload, close=status >= 500)

        def _fast_finish(
            self,
            cycle: Any,
            protocol: codec.Protocol,
            request_id: str,
            done: asyncio.Future[np.ndarray],
            start: float,
            decoded: float,
        ) -> None:
            assert fast is not None
            if cycle.disconnected or self.transport.is_closing():
                return
            if done.cancelled():
                return
            exc = done.exception()
            if exc is not None:
                self._fast_error(cycle, protocol, exc)  # type: ignore[arg-type]
                return
            predicted = time.perf_counter()
            try:
                body = fast.encode(protocol, request_id, done.result())
            except Exception as error:  # a callback has no caller to tell: answer the error
                self._fast_error(cycle, protocol, error)
                return
            logged = fast.log(request_id, bytes(cycle.body), body)
            self._roost_write(cycle, 200, body, extra=[*fast.headers, *logged])
            fast.meters[protocol].record(start, decoded, predicted, time.perf_counter())

        def _roost_write(
            self,
            cycle: Any,
            status: int,
            body: bytes,
            extra: list[tuple[bytes, bytes]] | None = None,
            close: bool = False,
        ) -> None:
            """Write a whole response the way uvicorn's ``send`` would, and finish the cycle."""
            close = close or not cycle.keep_alive
            head = [status_200 if status == 200 else status_lines[status]]
            headers = extra if extra is not None else [(b"content-type", b"application/json")]
            for name, value in (*cycle.default_headers, *headers):
                head += [name, b": ", value, b"\r\n"]
            head.append(b"content-length: %d\r\n" % len(body))
            if close:
                head.append(b"connection: close\r\n")
            head += [b"\r\n", body]
            if cycle.access_log and cycle.access_logger.isEnabledFor(logging.INFO):
                cycle.access_logger.info(  # the line uvicorn's send() logs
                    '%s - "%s %s HTTP/%s" %d', get_client_addr(cycle.scope),
                    cycle.scope["method"], cycle.scope["path"], "1.1", status,
                )  # fmt: skip
            cycle.response_started = True
            cycle.response_complete = True
            self.transport.write(b"".join(head))
            cycle.message_event.set()
            if close:
                cycle.keep_alive = False
                self.transport.close()
            cycle.on_response()

    return RoostHttpToolsProtocol


def httptools_error(message: str) -> Exception:
    import httptools

    return httptools.HttpParserError(message)


# What the protocol subclass relies on in uvicorn's httptools implementation. If an upgrade
# removes any of it, http_protocol() returns None (the ASGI fast path, without the connection
# limits, and a warning) and tests/unit/test_serving_internals.py fails loudly.
GUARDED_METHODS = (
    "connection_made", "connection_lost", "on_message_begin", "on_url", "on_header",
    "on_headers_complete", "on_body", "on_message_complete", "on_response_complete",
    "_start_asgi_task",
)  # fmt: skip
GUARDED_CYCLE = (
    "body", "more_body", "keep_alive", "response_started", "response_complete", "disconnected",
    "message_event", "on_response", "default_headers", "access_log", "access_logger", "scope",
)  # fmt: skip


def guarded_internals_present(impl: Any) -> bool:
    protocol = getattr(impl, "HttpToolsProtocol", None)
    if protocol is None or not all(hasattr(protocol, n) for n in GUARDED_METHODS):
        return False
    return all(hasattr(impl, n) for n in ("STATUS_LINE", "RequestResponseCycle"))


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
        try:
            decoded = fast.decode(protocol, body)
            if decoded is None:
                return False
            texts, request_id = decoded
            ready = time.perf_counter()
            proba = await fast.model.infer(texts)
        except Exception as exc:  # answered from the error itself
            status = guard.status_of(exc)
            if status < 500:
                guard.client_error(status, "POST", protocol.label, str(exc))
            else:
                log.error("server error protocol=%s", protocol.label, exc_info=exc)
            fast.meters[protocol].failed(status)
            await guard.respond(send, status, str(exc) or type(exc).__name__, close=status >= 500)
            return True
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
    """KServe's gRPC servicer, with plain ``ModelInfer`` requests answered directly (when
    ``fast``), the served version checked, readiness from the model, and the repository
    extension behind ``repository`` (off: UNIMPLEMENTED; on: a bearer token in the call's
    ``authorization`` metadata)."""

    def __init__(
        self,
        data_plane: Any,
        repository: Repository,
        model: SentimentModel,
        fast: bool = True,
        max_texts: int | None = None,
    ) -> None:
        super().__init__(data_plane, None)
        self.model = model
        self.repository = repository
        self.fast = fast
        self.max_texts = max_texts
        self.meters = _Meters(model, codec.Protocol.GRPC_V2)

    def _version(self, name: str, version: str) -> None:
        model = self.model
        if name == model.name and version and version != model.version:
            raise ModelNotFound(
                f"{codec.show(name)} version {codec.show(version)} "
                f"(serving {model.version or 'none'})"
            )

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # gRPC's method name
        return await self.infer(request, context)

    async def infer(self, request: Any, context: Any, stream: bool = False) -> Any:
        """One ``ModelInferRequest``'s answer; errors raise (the caller maps them).

        ``stream``: a request of ``ModelStreamInfer`` (its metadata was sent already, so
        the payload event id travels only in the response's ``id``).
        """
        start = time.perf_counter()
        texts = self.plain(request)
        if texts is None:
            return await super().ModelInfer(request, context)
        decoded = time.perf_counter()
        proba = await self.model.infer(texts)  # an error here is the answer (the caller maps it)
        response, event_id = self.answer(request, texts, proba, start, decoded)
        if event_id is not None and not stream:  # roost.monitor: name the events
            await context.send_initial_metadata(((events.EVENT_ID_HEADER, event_id),))
        return response

    def plain(self, request: Any) -> list[str] | None:
        """The texts of a plain request (the fast path), None for KServe's path; raises
        for a request that breaks the input rule."""
        model = self.model
        self._version(request.model_name, request.model_version)
        if request.model_name == model.name and not model.ready:
            raise ModelNotReady(model.name)
        codec.check_grpc_raw(request)
        for tensor in request.inputs:  # the input rule: datatypes compare case-insensitively
            if tensor.datatype != tensor.datatype.upper():
                tensor.datatype = tensor.datatype.upper()
        if not (self.fast and model.ready):
            return None
        texts = codec.plain_grpc(request, model.name, model.version)
        if texts is not None:
            codec.check_count(len(texts), self.max_texts, "inputs[0].contents")
        return texts

    def answer(
        self, request: Any, texts: list[str], proba: np.ndarray, start: float, decoded: float
    ) -> tuple[Any, str | None]:
        """(the serialized response, the payload event id when logging is on) of a plain
        request."""
        model = self.model
        predicted = time.perf_counter()
        payload = model.payload
        event_id = request.id if payload is None else payload.event_id(request.id)
        names = model.names(proba)
        response = wire.infer_response(
            model.name, model.version, event_id, model.labels, names, proba
        )  # serialized: the gRPC handlers pass bytes through
        if payload is not None:
            payload.log_grpc(event_id, texts, model, names, proba)
        self.meters.record(start, decoded, predicted, time.perf_counter())
        return response, None if payload is None else event_id

    async def ServerReady(self, request: Any, context: Any) -> Any:
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

        return pb.ServerReadyResponse(ready=bool(self.model.ready))

    async def ModelReady(self, request: Any, context: Any) -> Any:
        self._version(request.name, request.version)
        return await super().ModelReady(request, context)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        self._version(request.name, request.version)
        return await super().ModelMetadata(request, context)

    async def _repository(self, context: Any) -> None:
        import grpc

        if not self.repository.enabled:
            raise NotImplementedError(
                "the model repository extension is off (serving.repository_extension)"
            )
        metadata = dict(context.invocation_metadata() or ())
        if not self.repository.authorized(metadata.get("authorization")):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the model repository extension needs the operator's bearer token",
            )

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

        await self._repository(context)
        await self.repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse(model_name=request.model_name, isLoaded=True)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

        await self._repository(context)
        await self.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse(model_name=request.model_name, isUnloaded=True)
