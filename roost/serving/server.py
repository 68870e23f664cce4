"""Start the predictor with ``kserve.ModelServer``: REST v1/v2 on one port, gRPC v2 on another.

roost adds to KServe's FastAPI app, before it starts: a request-body limit (HTTP 413),
request-validation errors as HTTP 400 with the field named (FastAPI's default is 422
without a JSON ``error``), and roost's own Prometheus metrics on the same ``/metrics``.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from roost.config import Settings

log = logging.getLogger(__name__)


class BodyLimit:
    """ASGI middleware: bodies over ``limit`` bytes get 413 before any handler reads them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in {"POST", "PUT", "PATCH"}:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._reject(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replay_body(b"".join(chunks), receive), send)

    async def _reject(self, send: Send) -> None:
        payload = orjson.dumps(
            {"error": f"request body: larger than the limit of {self.limit} bytes"}
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _field(loc: tuple[Any, ...]) -> str:
    """('body', 'inputs', 0, 'datatype') -> 'inputs[0].datatype'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "request body"


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands an already-read body to the next app once, then defers."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def validation_error(_: Request, exc: Exception) -> ORJSONResponse:
    assert isinstance(exc, RequestValidationError)
    messages = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "invalid JSON")
            messages.append(f"request body: malformed JSON ({detail})")
        else:
            messages.append(f"{_field(tuple(err.get('loc', ())))}: {err.get('msg')}")
    return ORJSONResponse({"error": "; ".join(messages)}, status_code=400)


async def http_error(_: Request, exc: Exception) -> ORJSONResponse:
    """Starlette/FastAPI HTTP errors (unparseable body, unknown route) as ``{"error": ...}``."""
    assert isinstance(exc, StarletteHTTPException)
    detail = str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in detail:
        detail = "request body: not valid UTF-8 JSON"
    return ORJSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)


def prepare_app(app: FastAPI, settings: Settings) -> None:
    """Add roost's middleware and handlers to KServe's app (before it starts)."""
    app.add_middleware(BodyLimit, limit=settings.serving.max_body_bytes)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def serve(settings: Settings) -> None:
    """Load the model and run the KServe ModelServer until SIGTERM/SIGINT."""
    # kserve parses sys.argv when imported; import it only when serving.
    from kserve import model_server

    from roost.serving.predictor import SentimentModel
    from roost.serving.runner import RoostModelServer

    cfg = settings.serving
    model = SentimentModel(cfg.model_name, cfg.model_uri, settings)
    model.load()
    # Modules and the model live as long as the process: keep them out of every future
    # collection, and collect again (python -m roost.serving starts with the collector off).
    gc.freeze()
    gc.enable()
    model_server.args.grpc_max_receive_message_length = cfg.max_body_bytes
    prepare_app(model_server.app, settings)
    server = RoostModelServer(
        model,
        settings,
        http_port=cfg.http_port,
        grpc_port=cfg.grpc_port,
        enable_docs_url=False,
        enable_latency_logging=False,
    )
    log.info(
        "serving model=%s version=%s http=%d grpc=%d fast_path=%s",
        cfg.model_name, model.version, cfg.http_port, cfg.grpc_port, cfg.fast_path,
    )  # fmt: skip
    server.start([model])
    if model.payload is not None:  # deliver the queued payload events before exiting
        model.payload.close()
