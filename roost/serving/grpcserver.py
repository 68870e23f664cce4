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
connections closed after ``serving.grpc_idle_timeout_s``.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

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


class RoostInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Decoding errors, error mapping and the in-flight bound (see the module docstring)."""

    def __init__(self, max_inflight: int, pushback_ms: int) -> None:
        self.max_inflight = max_inflight
        self.pushback_ms = pushback_ms
        self.inflight = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
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

        return handler._replace(request_deserializer=decode, unary_unary=call)

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
            interceptors=(RoostInterceptor(cfg.grpc_max_inflight, cfg.grpc_retry_pushback_ms),),
            options=server_options(cfg, self._kwargs),
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            self.servicer, self._server
        )
        self._server.add_insecure_port(f"[::]:{self._port}")
        await self._server.start()
        await self._server.wait_for_termination()
