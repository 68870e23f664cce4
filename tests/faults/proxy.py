"""A small HTTP fault proxy: sits between roost and one dependency and breaks it on demand.

Why our own: the faults the suite needs are per request (a 500 on the alias read only, a
dropped connection on the Job create), which a TCP-level proxy such as toxiproxy cannot
aim at, and nothing on PyPI does this without a daemon of its own. It is aiohttp (already
in the environment through kserve), one thread with its own event loop, loopback only.

Faults, each aimed at ``method`` + a ``path`` regex (searched in the path and query):
``status`` answers a canned error without reaching the dependency; ``drop`` resets the
connection after reading the request; ``delay`` waits, then forwards. ``refuse()`` stops
listening (connection refused) and ``restore()`` listens again on the same port and clears
every fault. Every request is recorded with what the proxy did to it.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
from aiohttp import web

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip

Action = Literal["status", "drop", "delay"]


@dataclass
class Fault:
    method: str | None
    path: re.Pattern[str]
    action: Action
    status: int = 500
    body: bytes = b"Internal Server Error"
    delay_s: float = 0.0
    times: int | None = None  # None: until cleared
    body_pattern: re.Pattern[bytes] | None = None  # also match on the request body
    on_hit: Callable[[], None] | None = None  # run (in the proxy's thread) before acting
    hits: int = 0

    def matches(self, method: str, target: str, body: bytes) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return (
            (self.method is None or self.method == method)
            and bool(self.path.search(target))
            and (self.body_pattern is None or bool(self.body_pattern.search(body)))
        )


@dataclass(frozen=True)
class Seen:
    method: str
    target: str
    outcome: str  # "forwarded", "500", "dropped", "delayed", "refused", "upstream-down"


@dataclass
class FaultProxy:
    upstream: str
    port: int = 0
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _site: web.TCPSite | None = None
    _session: aiohttp.ClientSession | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _down: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- faults -------------------------------------------------------------------------------
    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def fail(
        self, method: str | None, path: str, status: int = 500, times: int | None = None,
        body: bytes = b"Internal Server Error", when_body: bytes | None = None,
    ) -> Fault:  # fmt: skip
        """Answer ``status`` to matching requests (the dependency never sees them)."""
        return self._add(
            Fault(method, re.compile(path), "status", status, body, times=times,
                  body_pattern=_compile(when_body))
        )  # fmt: skip

    def drop(
        self, method: str | None, path: str, times: int | None = None,
        when_body: bytes | None = None,
    ) -> Fault:  # fmt: skip
        """Reset the connection of matching requests after reading them."""
        return self._add(
            Fault(method, re.compile(path), "drop", times=times, body_pattern=_compile(when_body))
        )

    def delay(
        self, method: str | None, path: str, seconds: float, times: int | None = None,
        when_body: bytes | None = None, on_hit: Callable[[], None] | None = None,
    ) -> Fault:  # fmt: skip
        """Hold matching requests ``seconds`` (running ``on_hit`` first), then forward them."""
        return self._add(
            Fault(method, re.compile(path), "delay", delay_s=seconds, times=times,
                  body_pattern=_compile(when_body), on_hit=on_hit)
        )  # fmt: skip

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def hits(self, method: str | None, path: str) -> list[Seen]:
        regex = re.compile(path)
        return [
            s
            for s in self.seen
            if (method is None or s.method == method) and regex.search(s.target)
        ]

    def _match(self, method: str, target: str, body: bytes) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, target, body):
                    fault.hits += 1
                    return fault
        return None

    # -- serving ------------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        target = request.path_qs
        body = await request.read()
        if self._down:  # a kept-alive connection from before refuse(): as if the server died
            self.seen.append(Seen(request.method, target, "refused"))
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        fault = self._match(request.method, target, body)
        if fault is not None and fault.on_hit is not None:
            await asyncio.get_running_loop().run_in_executor(None, fault.on_hit)
        if fault is not None and fault.action == "status":
            self.seen.append(Seen(request.method, target, str(fault.status)))
            return web.Response(status=fault.status, body=fault.body)
        if fault is not None and fault.action == "drop":
            self.seen.append(Seen(request.method, target, "dropped"))
            assert request.transport is not None
            request.transport.abort()  # RST: the client sees the connection reset
            raise asyncio.CancelledError
        if fault is not None:
            self.seen.append(Seen(request.method, target, "delayed"))
            await asyncio.sleep(fault.delay_s)
        else:
            self.seen.append(Seen(request.method, target, "forwarded"))
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            async with self._session.request(
                request.method, self.upstream + target, headers=headers, data=body,
                allow_redirects=False,
            ) as upstream:  # fmt: skip
                payload = await upstream.read()
                out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
                return web.Response(status=upstream.status, body=payload, headers=out)
        except (aiohttp.ClientError, OSError):
            # The dependency is gone (killed): its clients see what they would see directly.
            self.seen.append(Seen(request.method, target, "upstream-down"))
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError from None

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        if self.port == 0:
            server = self._site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _start(self) -> None:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await self._runner.setup()
        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=300)
        )
        await self._listen()

    def _call(self, coro: object) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)  # type: ignore[arg-type]

    def start(self) -> FaultProxy:
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True, name="fault-proxy").start()
        self._call(self._start())
        return self

    def refuse(self) -> None:
        """Stop listening: new connections are refused (the process behind stays up)."""
        assert self._site is not None
        if self._down:
            return
        self._down = True
        self._call(self._site.stop())

    def restore(self) -> None:
        """Clear every fault and listen again (same port) if refusing."""
        self.clear()
        self._down = False
        assert self._runner is not None
        if not self._runner.sites:
            self._call(self._listen())

    def stop(self) -> None:
        async def close() -> None:
            assert self._runner is not None and self._session is not None
            await self._runner.cleanup()
            await self._session.close()

        self._call(close())
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)


def _compile(pattern: bytes | None) -> re.Pattern[bytes] | None:
    return None if pattern is None else re.compile(pattern)


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream.rstrip("/")).start()
    try:
        yield proxy
    finally:
        proxy.stop()
