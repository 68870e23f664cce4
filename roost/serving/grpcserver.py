"""roost's gRPC server: KServe's service with roost's servicer, limits and error mapping.

:class:`RoostInterceptor` replaces KServe's ``ExceptionToStatusInterceptor`` (which answers
UNKNOWN for an undecodable message, INTERNAL for a bad ``raw_input_contents`` and fails on
``ModelNotReady`` itself) and adds:

- an undecodable request message -> INVALID_ARGUMENT naming the message type;
- errors -> status codes with the error's text (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE,
  UNIMPLEMENTED); a client's error is one info-level log line, a server fault a traceback;
- overload: at most ``serving.grpc_max_inflight`` ``ModelInfer`` calls in flight; one more
  is answered at once with RESOURCE_EXHAUSTED and the ``grpc-retry-pushback-ms`` trailer
  (gRPC's retry pushback: the client's retry policy waits that long).

:class:`RoostGRPCServer` starts grpc.aio with roost's connection limits: the HTTP/2
handshake timeout (a connection that sends nothing is closed), keepalive pings, and idle
connections closed after ``serving.grpc_idle_timeout_s``, and Triton's bidirectional
``ModelStreamInfer`` (:class:`StreamInfer`) next to KServe's unary methods.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from grpc import aio
from kserve.errors import (
    InferenceError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ServerNotLive,
    ServerNotReady,
    UnsupportedProtocol,
)
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.server import GRPCServer

from roost.config import ServingSettings
from roost.serving import codec
from roost.serving.wire import SERVICE, stream_response

if TYPE_CHECKING:
    from roost.serving.predictor import SentimentModel

log = logging.getLogger(__name__)

PUSHBACK = "grpc-retry-pushback-ms"


class Undecodable:
    """What the request deserializer returns for bytes that are not the expected message."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def status_of(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, ModelNotReady | ServerNotReady | ServerNotLive):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, NotImplementedError | UnsupportedProtocol):
        return grpc.StatusCode.UNIMPLEMENTED
    if isinstance(exc, InferenceError):
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.INTERNAL


CLIENT_CODES = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED}
)


class RoostInterceptor:
    """Decoding errors, error mapping and the in-flight bound (see the module docstring).

    Not a grpc.aio ``ServerInterceptor``: grpc runs those on every call (a coroutine, and
    here a new handler with two closures per call). :meth:`wrap` wraps each method's
    handler once, when the server starts.
    """

    def __init__(self, max_inflight: int, pushback_ms: int) -> None:
        self.max_inflight = max_inflight
        self.pushback_ms = pushback_ms
        self.inflight = 0

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is None:
            return handler
        deserialize = handler.request_deserializer
        behavior = handler.unary_unary
        shed = method == "ModelInfer"

        def decode(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception as exc:  # protobuf's DecodeError and friends
                return Undecodable(f"request: not a valid {method} message ({exc})")

        async def call(request: Any, context: aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            if shed and self.inflight >= self.max_inflight:
                context.set_trailing_metadata(((PUSHBACK, str(self.pushback_ms)),))
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"overloaded: {self.inflight} inference calls in flight "
                    f"(serving.grpc_max_inflight); retry after {self.pushback_ms} ms",
                )
            self.inflight += shed
            try:
                return await behavior(request, context)
            except aio.AbortError:
                raise
            except Exception as exc:
                code = status_of(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.error("server error grpc_method=%s", method, exc_info=exc)
                    await context.abort(code, "internal server error")
                await self._abort(context, method, code, str(exc) or type(exc).__name__)
            finally:
                self.inflight -= shed

        return handler._replace(
            request_deserializer=decode,
            response_serializer=serialized,  # KServe's: each message's SerializeToString
            unary_unary=call,
        )

    @staticmethod
    async def _abort(
        context: aio.ServicerContext, method: str, code: grpc.StatusCode, reason: str
    ) -> None:
        reason = codec.show(reason)
        if code in CLIENT_CODES:
            log.info("client error grpc_method=%s code=%s reason=%s", method, code.name, reason)
        else:
            log.warning("grpc_method=%s code=%s reason=%s", method, code.name, reason)
        await context.abort(code, reason)


# -- Triton's ModelStreamInfer --------------------------------------------------------------


class Servicer(Protocol):
    """What the stream needs of the servicer (roost.serving.fastpath.FastServicer)."""

    model: Any

    async def infer(self, request: Any, context: Any, stream: bool = False) -> Any: ...

    def plain(self, request: Any) -> list[str] | None: ...

    def answer(
        self, request: Any, texts: list[str], proba: Any, start: float, decoded: float
    ) -> tuple[bytes, str | None]: ...


def serialized(response: Any) -> bytes:
    """A servicer's answer as bytes: roost's plain answers are serialized already."""
    return response if type(response) is bytes else response.SerializeToString()


class StreamInfer:
    """``ModelStreamInfer``: a stream of ``ModelInferRequest``, one ``ModelStreamInferResponse``
    per request, in the order they are answered (the response's ``id`` names its request).

    Requests of one stream run concurrently (they share batches with each other and with
    unary calls), at most ``max_inflight`` at a time: past it the stream is not read, so
    HTTP/2 flow control slows the client down. A failed request is answered in the stream
    with ``error_message`` (Triton's behaviour): the stream stays open for the next ones.
    A plain request costs no task: its batch future's callback writes the answer; others
    (KServe's path) run as a task.
    """

    def __init__(self, servicer: Servicer, max_inflight: int) -> None:
        self.servicer = servicer
        self.max_inflight = max_inflight

    async def handle(
        self, requests: AsyncIterator[Any], context: aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """The method (grpc.aio tells an async generator function from its signature).

        A reader task reads and enqueues; this generator writes the answers as they come.
        Both hand over through plain lists and one future each (no asyncio.Queue or
        Semaphore: a message costs no coroutine beyond grpc.aio's read and write).
        """
        servicer = self.servicer
        loop = asyncio.get_running_loop()
        answers: deque[bytes | None] = deque()  # written in this order; None: the reader ended
        wake: list[asyncio.Future[None]] = []  # the writer, waiting for an answer
        room: list[asyncio.Future[None]] = []  # the reader, waiting for a request to end
        running: set[asyncio.Future[Any]] = set()
        limit = self.max_inflight

        def put(data: bytes | None) -> None:
            answers.append(data)
            if wake:
                waiter = wake.pop()
                if not waiter.done():
                    waiter.set_result(None)

        def release() -> None:
            if room:
                waiter = room.pop()
                if not waiter.done():
                    waiter.set_result(None)

        def finish(request: Any, texts: list[str], start: float, decoded: float,
                   done: asyncio.Future[Any]) -> None:  # fmt: skip
            running.discard(done)
            release()
            if done.cancelled():
                return
            try:
                exc = done.exception()
                if exc is not None:
                    raise exc
                response, _ = servicer.answer(request, texts, done.result(), start, decoded)
                data = stream_response(response)
            except Exception as error:
                data = self._error(request, error)
            put(data)

        async def slow(request: Any) -> None:
            try:
                response = await servicer.infer(request, context, True)
                data = stream_response(serialized(response))
            except Exception as exc:
                data = self._error(request, exc)
            put(data)

        def slow_done(task: asyncio.Future[Any]) -> None:
            running.discard(task)
            release()

        async def read() -> None:
            try:
                # context.read(): the request iterator is an async generator around it
                while (request := await context.read()) is not aio.EOF:
                    if isinstance(request, Undecodable):
                        log.info("client error grpc_method=ModelStreamInfer code=%s reason=%s",
                                 "INVALID_ARGUMENT", request.reason)  # fmt: skip
                        put(stream_response(b"", codec.show(request.reason)))
                        continue
                    start = time.perf_counter()
                    try:
                        texts = servicer.plain(request)
                    except Exception as exc:
                        put(self._error(request, exc))
                        continue
                    while len(running) >= limit:  # past it the stream is not read
                        waiter: asyncio.Future[None] = loop.create_future()
                        room.append(waiter)
                        await waiter
                    if texts is None:
                        future: asyncio.Future[Any] = loop.create_task(slow(request))
                        future.add_done_callback(slow_done)
                    else:
                        future = servicer.model.enqueue(texts)
                        future.add_done_callback(
                            partial(finish, request, texts, start, time.perf_counter())
                        )
                    running.add(future)
                while running:
                    await asyncio.wait(set(running))
            finally:
                put(None)

        reader = loop.create_task(read())
        try:
            while True:
                while answers:
                    data = answers.popleft()
                    if data is None:
                        await reader  # a broken stream (client gone, transport error) ends the call
                        return
                    yield data
                waiter: asyncio.Future[None] = loop.create_future()
                wake.append(waiter)
                await waiter
        finally:
            reader.cancel()
            for future in list(running):
                future.cancel()

    @staticmethod
    def _error(request: Any, exc: Exception) -> bytes:
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

        code = status_of(exc)
        reason = codec.show(str(exc) or type(exc).__name__)
        if code is grpc.StatusCode.INTERNAL:
            log.error("server error grpc_method=ModelStreamInfer", exc_info=exc)
            reason = "internal server error"
        elif code in CLIENT_CODES:
            log.info("client error grpc_method=ModelStreamInfer code=%s reason=%s",
                     code.name, reason)  # fmt: skip
        else:
            log.warning("grpc_method=ModelStreamInfer code=%s reason=%s", code.name, reason)
        echo = pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        return stream_response(echo.SerializeToString(), f"[{code.name}] {reason}")


def stream_method(servicer: Servicer, max_inflight: int) -> grpc.RpcMethodHandler:
    """The ``ModelStreamInfer`` method of the inference service (added next to KServe's)."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    def decode(data: bytes) -> Any:
        try:
            return pb.ModelInferRequest.FromString(data)
        except Exception as exc:  # protobuf's DecodeError and friends
            return Undecodable(f"request: not a valid ModelInferRequest message ({exc})")

    return grpc.stream_stream_rpc_method_handler(
        StreamInfer(servicer, max_inflight).handle, request_deserializer=decode
    )  # response_serializer None: the handler yields serialized messages


class _Collect:
    """Stands in for the server in KServe's generated ``add_...Servicer_to_server``: keeps
    the method handlers it registers, so that roost can wrap them before the server gets them."""

    def __init__(self) -> None:
        self.methods: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come to add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, methods: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        if service != SERVICE:
            raise RuntimeError(f"KServe's generated gRPC code registers {service}, not {SERVICE}")
        self.methods.update(methods)


def add_services(server: aio.Server, servicer: Any, cfg: ServingSettings) -> None:
    """KServe's inference service (each unary method wrapped once by :class:`RoostInterceptor`)
    plus ``ModelStreamInfer``, as registered methods (looked up by the gRPC core, no Python
    lookup per call) and as a generic handler (what grpc falls back to)."""
    collect = _Collect()
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, collect)
    if "ModelInfer" not in collect.methods:
        raise RuntimeError("KServe's generated gRPC code registered no ModelInfer handler")
    guard = RoostInterceptor(cfg.grpc_max_inflight, cfg.grpc_retry_pushback_ms)
    methods = {name: guard.wrap(name, handler) for name, handler in collect.methods.items()}
    methods["ModelStreamInfer"] = stream_method(servicer, cfg.grpc_max_inflight)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    server.add_registered_method_handlers(SERVICE, methods)


def server_options(cfg: ServingSettings, kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
    """grpc core channel arguments of the server: message sizes and connection limits."""
    return [
        ("grpc.max_send_message_length", kwargs.get("grpc_max_send_message_length")),
        ("grpc.max_receive_message_length", kwargs.get("grpc_max_receive_message_length")),
        ("grpc.server_handshake_timeout_ms", int(cfg.header_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", int(cfg.grpc_idle_timeout_s * 1000)),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class RoostGRPCServer(GRPCServer):  # type: ignore[misc]
    """KServe's gRPC server with roost's servicer, interceptor and connection limits."""

    def __init__(
        self, model: SentimentModel, servicer: Any, cfg: ServingSettings, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.model = model
        self.servicer = servicer
        self.cfg = cfg

    async def start(self, max_workers: int) -> None:
        cfg = self.cfg
        self._server = aio.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=max_workers),
            options=server_options(cfg, self._kwargs),
        )
        add_services(self._server, self.servicer, cfg)
        self._server.add_insecure_port(f"[::]:{self._port}")
        await self._server.start()
        await self._server.wait_for_termination()
