"""Start the predictor with ``kserve.ModelServer``: REST v1/v2 on one port, gRPC v2 on another.

roost adds to KServe's FastAPI app, before it starts: :class:`~roost.serving.guard.RequestGuard`
(body limit, repository extension, versioned paths, binary-extension and Unicode checks, no
500 without ``Connection: close``), request-validation errors as HTTP 400 with the field named
(FastAPI's default is 422 without a JSON ``error``), exception handlers that log a client's
error as one info line, and roost's own Prometheus metrics on the same ``/metrics``.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from roost.config import Settings
from roost.serving import guard

log = logging.getLogger(__name__)


def _field(loc: tuple[Any, ...]) -> str:
    """('body', 'inputs', 0, 'datatype') -> 'inputs[0].datatype'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "request body"


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    messages = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "invalid JSON")
            messages.append(f"request body: malformed JSON ({detail})")
        else:
            messages.append(f"{_field(tuple(err.get('loc', ())))}: {err.get('msg')}")
    message = "; ".join(messages)
    guard.client_error(400, request.method, request.url.path, message)
    return JSONResponse({"error": message}, status_code=400)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette/FastAPI HTTP errors (unparseable body, unknown route) as ``{"error": ...}``."""
    assert isinstance(exc, StarletteHTTPException)
    detail = str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in detail:
        detail = "request body: not valid UTF-8 JSON"
    if exc.status_code < 500:
        guard.client_error(exc.status_code, request.method, request.url.path, detail)
    return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)


def prepare_app(app: FastAPI, settings: Settings, model: Any) -> None:
    """Add roost's middleware and handlers to KServe's app (after KServe added its own)."""
    cfg = settings.serving
    token = cfg.repository_token.get_secret_value() if cfg.repository_token else None
    repository = guard.Repository(model, cfg.repository_extension, token)
    app.add_middleware(
        guard.RequestGuard, model=model, repository=repository, limit=cfg.max_body_bytes
    )
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    guard.install_handlers(app)


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
    # collection, and collect again (`roost serve` starts it with the collector off).
    gc.freeze()
    gc.enable()
    model_server.args.grpc_max_receive_message_length = cfg.max_body_bytes
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
