"""``kserve.ModelServer`` with roost's serving loop: uvloop, and the fast path in front.

KServe 0.20's ``ModelServer.start`` runs its servers under ``asyncio.run`` (the stdlib
selector loop, even when uvloop is installed) and builds the REST app and the gRPC servicer
itself. :class:`RoostModelServer` starts the same ``RESTServer`` and gRPC server, with the
same endpoints, middleware and handlers, but on uvloop, with
:class:`~roost.serving.fastpath.FastPath` wrapping the ASGI app that uvicorn serves and
:class:`~roost.serving.fastpath.FastServicer` as the gRPC servicer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any

import kserve
from grpc import aio
from kserve import model_server
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.rest.server import RESTServer

from roost import proc
from roost.config import Settings
from roost.serving.fastpath import FastASGI, FastPath, FastServicer, http_protocol
from roost.serving.predictor import SentimentModel

log = logging.getLogger(__name__)


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop for ``auto`` (when installed) and ``uvloop``; the stdlib loop for ``asyncio``."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return new_loop
    return asyncio.new_event_loop


class FastGRPCServer(GRPCServer):  # type: ignore[misc]
    """KServe's gRPC server (same interceptors and limits) with :class:`FastServicer`."""

    def __init__(self, model: SentimentModel, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model = model

    async def start(self, max_workers: int) -> None:
        servicer = FastServicer(self._data_plane, self._model_repository_extension, self.model)
        self._server = aio.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[
                ("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                (
                    "grpc.max_receive_message_length",
                    self._kwargs.get("grpc_max_receive_message_length"),
                ),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        self._server.add_insecure_port(f"[::]:{self._port}")
        await self._server.start()
        await self._server.wait_for_termination()


class RoostModelServer(kserve.ModelServer):  # type: ignore[misc]
    """One REST server (uvicorn) and one gRPC server in one process, on roost's loop."""

    def __init__(self, model: SentimentModel, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.settings = settings

    def start(self, models: list[Any]) -> None:
        cfg = self.settings.serving
        self._register_and_check_atleast_one_model_is_ready(models)
        rest = RESTServer(
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            access_log_format=self.access_log_format,
            workers=1,
            grace_period=self.grace_period,
            event_loop="auto",
            timeout_keep_alive=self.timeout_keep_alive,
        )
        if cfg.fast_path:
            fast = FastPath(self.model, cfg.max_body_bytes)
            protocol = http_protocol(fast)
            if protocol is not None:  # uvicorn takes a protocol class for `http`
                rest.config.http = protocol
            else:  # uvicorn serves what its config names: KServe's app behind the fast path
                log.warning("uvicorn's httptools protocol not as expected; fast path via ASGI")
                rest.config.app = FastASGI(fast, model_server.app)
        self._rest_server = rest
        self.servers.append(rest.start())
        if self.enable_grpc:
            grpc_args: tuple[Any, ...] = (
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
            )
            grpc_kwargs = {"kwargs": vars(model_server.args), "grace_period": self.grace_period}
            if cfg.fast_path:
                self._grpc_server = FastGRPCServer(self.model, *grpc_args, **grpc_kwargs)
            else:
                self._grpc_server = GRPCServer(*grpc_args, **grpc_kwargs)
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.register_signal_handler()
        workers: int | None = getattr(self, "max_asyncio_workers", None)
        if workers is None:  # KServe's formula, over the pod's CPU limit
            self.max_asyncio_workers = min(32, proc.cpu_limit() + 4)
        with asyncio.Runner(loop_factory=loop_factory(cfg.event_loop)) as runner:
            loop = runner.get_loop()
            self.setup_event_loop()  # KServe's: its loop exception handler and the executor
            log.info("event loop %s", type(loop).__module__)
            runner.run(self._serve())
