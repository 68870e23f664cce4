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
import logging
from collections.abc import Callable
from typing import Any

import kserve
from kserve import model_server
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.rest.server import RESTServer

from roost import proc
from roost.config import Settings
from roost.serving.fastpath import FastASGI, FastPath, FastServicer, http_protocol
from roost.serving.grpcserver import RoostGRPCServer
from roost.serving.guard import Repository
from roost.serving.predictor import SentimentModel
from roost.serving.server import prepare_app

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


class RoostDataPlane(DataPlane):  # type: ignore[misc]
    """KServe's data plane; the server is ready only while every model it holds is ready.

    KServe's ``ready()`` says True with no model at all (after an unload): a readiness probe
    would keep routing traffic to a server that answers every inference with an error.
    """

    async def ready(self) -> bool:
        models = self.model_registry.get_models().values()
        return bool(models) and all(m.ready for m in models) and bool(await super().ready())


class RoostRESTServer(RESTServer):  # type: ignore[misc]
    """KServe's REST server, then roost's middleware and handlers on top of KServe's."""

    def __init__(self, model: SentimentModel, settings: Settings, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.model = model
        self.settings = settings

    def create_application(self) -> None:
        super().create_application()
        prepare_app(model_server.app, self.settings, self.model)


class RoostModelServer(kserve.ModelServer):  # type: ignore[misc]
    """One REST server (uvicorn) and one gRPC server in one process, on roost's loop."""

    def __init__(self, model: SentimentModel, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.settings = settings
        self.dataplane = RoostDataPlane(model_registry=self.registered_models)

    def start(self, models: list[Any]) -> None:
        cfg = self.settings.serving
        self._register_and_check_atleast_one_model_is_ready(models)
        rest = RoostRESTServer(
            self.model,
            self.settings,
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            access_log_format=self.access_log_format,
            workers=1,
            grace_period=self.grace_period,
            event_loop="auto",
            timeout_keep_alive=cfg.keep_alive_timeout_s,
        )
        fast = FastPath(self.model, cfg.max_body_bytes, cfg.max_texts_per_request)
        callbacks = cfg.fast_path and cfg.fast_path_protocol
        protocol = http_protocol(fast if callbacks else None, cfg)
        if protocol is not None:  # uvicorn takes a protocol class for `http`
            rest.config.http = protocol
        else:
            log.warning(
                "uvicorn's httptools protocol not as expected: fast path via ASGI and "
                "no header/body timeouts or connection limit"
            )
        if cfg.fast_path and (protocol is None or not callbacks):
            # uvicorn serves what its config names: KServe's app behind the fast path
            rest.config.app = FastASGI(fast, model_server.app)
        self._rest_server = rest
        self.servers.append(rest.start())
        if self.enable_grpc:
            token = cfg.repository_token.get_secret_value() if cfg.repository_token else None
            servicer = FastServicer(
                self.dataplane,
                Repository(self.model, cfg.repository_extension, token),
                self.model,
                fast=cfg.fast_path,
                max_texts=cfg.max_texts_per_request,
            )
            self._grpc_server = RoostGRPCServer(
                self.model,
                servicer,
                cfg,
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                kwargs=vars(model_server.args),
                grace_period=self.grace_period,
            )
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
