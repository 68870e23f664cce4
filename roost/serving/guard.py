"""What stands between a hostile HTTP client and KServe's app.

:class:`RequestGuard` is the outermost of roost's ASGI middleware in front of KServe's
FastAPI app. Per request it:

1. bounds the body (HTTP 413 over ``serving.max_body_bytes``, before any handler reads it);
2. answers the model repository extension itself: 404 unless ``serving.repository_extension``
   is on, then 401 without the operator's bearer token (:class:`Repository`);
3. maps versioned paths (``/v2/models/<name>/versions/<v>/...``): the served version answers
   as the unversioned path, any other version is a 404; ``:explain`` is a 404 (no explainer);
4. checks a binary-extension body (``Inference-Header-Content-Length``) and a JSON body for
   lone surrogates before KServe parses them (HTTP 400 naming the field; KServe answered 500);
5. turns any exception that escapes the app into a JSON 500 with ``Connection: close``, so a
   keep-alive client is never left on a connection the server has dropped without saying so.

The exception handlers installed by :func:`install_handlers` replace KServe's, which log every
4xx at error level with a traceback: a client's error is one info-level line with its
reason; only the server's own faults log a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from kserve.errors import (
    InferenceError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ServerNotLive,
    ServerNotReady,
    UnsupportedProtocol,
)
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from roost.serving import codec

if TYPE_CHECKING:
    from roost.serving.predictor import SentimentModel

log = logging.getLogger(__name__)

VERSIONED = re.compile(r"^/v2/models/([^/]+)/versions/([^/]+)(/infer|/ready|)$")
EXPLAIN = re.compile(r"^/v1/models/([^/]+):explain$")
REPOSITORY = "/v2/repository/"
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
INFER_PATHS = re.compile(r"^(/v2/models/[^/]+/infer|/v1/models/[^/]+:predict)$")
BINARY_HEADER = b"inference-header-content-length"


class Repository:
    """The model repository extension (load/unload), for one model, behind a bearer token."""

    def __init__(self, model: SentimentModel, enabled: bool, token: str | None) -> None:
        self.model = model
        self.enabled = enabled
        self._token = (token or "").encode()

    def authorized(self, authorization: str | bytes | None) -> bool:
        if not self._token or authorization is None:
            return False
        value = authorization.encode() if isinstance(authorization, str) else authorization
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token)

    def check(self, name: str) -> None:
        if name != self.model.name:
            raise ModelNotFound(codec.show(name))

    async def load(self, name: str) -> None:
        self.check(name)
        if not self.model.ready:
            await asyncio.to_thread(self.model.load)
        log.info("repository load model=%s ready=%s", name, self.model.ready)

    async def unload(self, name: str) -> None:
        self.check(name)
        self.model.unload()
        log.info("repository unload model=%s (not ready until loaded again)", name)


def client_error(status: int, method: str, path: str, reason: str) -> None:
    """The one line a client's error logs (info: the client's fault, not the server's)."""
    log.info(
        "client error status=%d method=%s path=%s reason=%s",
        status, method, codec.show(path), codec.show(reason),
    )  # fmt: skip


async def respond(
    send: Send,
    status: int,
    message: str,
    close: bool = False,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    payload = orjson.dumps({"error": codec.show(message)})
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *headers,
    ]
    if close:
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    """ASGI middleware in front of KServe's app (see the module docstring)."""

    def __init__(
        self, app: ASGIApp, model: SentimentModel, repository: Repository, limit: int
    ) -> None:
        self.app = app
        self.model = model
        self.repository = repository
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self._handle(scope, receive, tracked)
        except Exception:
            if started:
                raise  # uvicorn closes the connection: the client sees a cut answer
            log.exception("server error method=%s path=%s", scope.get("method"), scope["path"])
            await respond(send, 500, "internal server error", close=True)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]

        def fail(status: int, reason: str, **kw: Any) -> Any:
            client_error(status, method, path, reason)
            return respond(send, status, reason, **kw)

        if path.startswith(REPOSITORY):
            await self._repository(scope, send, fail)
            return
        versioned = VERSIONED.match(path)
        if versioned:
            name, version, rest = versioned.groups()
            if name != self.model.name:
                await fail(404, f"model {name} not found")
                return
            if version != self.model.version:
                served = self.model.version or "none"
                await fail(404, f"model {name} version {version} not found (serving {served})")
                return
            path = f"/v2/models/{name}{rest}"
            scope = {**scope, "path": path, "raw_path": path.encode()}
        if EXPLAIN.match(path):
            await fail(404, "no explainer: this model answers :predict only, not :explain")
            return
        if method not in {"POST", "PUT", "PATCH"}:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await fail(
                413, f"request body: larger than the limit of {self.limit} bytes", close=True
            )
            return
        body = await self._read(receive)
        if body is None:
            return  # the client went away
        if isinstance(body, int):
            await fail(
                413, f"request body: larger than the limit of {self.limit} bytes", close=True
            )
            return
        if INFER_PATHS.match(path):
            problem = self._check(headers, body)
            if problem is not None:
                await fail(status_of(problem), str(problem))
                return
        await self.app(scope, replay_body(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | int | None:
        """The whole body; its size so far when over the limit; None if the client left."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return size
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _check(headers: dict[bytes, bytes], body: bytes) -> InvalidInput | None:
        """The input rule's checks that must run before KServe parses the body."""
        binary = headers.get(BINARY_HEADER)
        try:
            if binary is not None:
                codec.check_binary_request(body, binary.decode("latin-1"))
            elif SURROGATE_ESCAPE.search(body):
                field = _surrogate_field(body)
                if field is not None:
                    raise InvalidInput(f"{field}: not valid Unicode (a lone surrogate)")
        except InvalidInput as exc:
            return exc
        return None

    async def _repository(self, scope: Scope, send: Send, fail: Any) -> None:
        repository = self.repository
        if not repository.enabled:
            await fail(404, "the model repository extension is off (serving.repository_extension)")
            return
        headers = dict(scope.get("headers") or [])
        if not repository.authorized(headers.get(b"authorization")):
            await fail(
                401,
                "the model repository extension needs the operator's bearer token",
                headers=((b"www-authenticate", b"Bearer"),),
            )
            return
        parts = scope["path"][len(REPOSITORY) :].split("/")
        if scope["method"] != "POST" or len(parts) != 3 or parts[0] != "models":
            await fail(404, "not found: POST /v2/repository/models/<name>/load or /unload")
            return
        _, name, action = parts
        if action not in {"load", "unload"}:
            await fail(404, f"unknown repository action {action!r}")
            return
        try:
            await (repository.load if action == "load" else repository.unload)(name)
        except ModelNotFound as exc:
            await fail(404, str(exc))
            return
        payload = orjson.dumps({"name": name, action: True})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _surrogate_field(body: bytes) -> str | None:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    else:
        return None  # the escape was inside an escaped backslash: no surrogate
    import json

    try:
        payload = json.loads(body)
    except ValueError:
        return None  # malformed JSON: the parser's 400 names it
    return codec.lone_surrogate_field(payload)


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


# -- exception handlers (replacing KServe's) -------------------------------------------------
CLIENT_ERRORS: tuple[tuple[type[Exception], int], ...] = (
    (codec.TooManyTexts, 413),
    (InvalidInput, 400),
    (ModelNotFound, 404),
)
UNAVAILABLE: tuple[type[Exception], ...] = (ModelNotReady, ServerNotReady, ServerNotLive)


class BodyLimit:
    """ASGI middleware for roost's other HTTP services (the monitor's receiver): a body over
    ``limit`` bytes gets a JSON 413 before any handler reads it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in {"POST", "PUT", "PATCH"}:
            await self.app(scope, receive, send)
            return
        too_big = f"request body: larger than the limit of {self.limit} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await respond(send, 413, too_big, close=True)
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
                await respond(send, 413, too_big, close=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replay_body(b"".join(chunks), receive), send)


def status_of(exc: Exception) -> int:
    """HTTP status of an exception raised while answering a request."""
    for kind, status in CLIENT_ERRORS:
        if isinstance(exc, kind):
            return status
    if isinstance(exc, UNAVAILABLE):
        return 503
    if isinstance(exc, UnsupportedProtocol | NotImplementedError):
        return 501
    return 500


async def _handler(request: Request, exc: Exception) -> JSONResponse:
    status = status_of(exc)
    reason = str(exc) or type(exc).__name__
    if status < 500:
        client_error(status, request.method, request.url.path, reason)
    elif status == 503:
        log.warning("unavailable path=%s reason=%s", request.url.path, codec.show(reason))
    else:
        log.error("server error path=%s", request.url.path, exc_info=exc)
    return JSONResponse({"error": codec.show(reason)}, status_code=status)


def install_handlers(app: FastAPI) -> None:
    """roost's handler for every exception class KServe registers one for."""
    for kind in (
        codec.TooManyTexts,
        InvalidInput,
        ModelNotFound,
        ModelNotReady,
        ServerNotReady,
        ServerNotLive,
        UnsupportedProtocol,
        NotImplementedError,
        InferenceError,
    ):
        app.add_exception_handler(kind, _handler)
