"""Open-loop load: requests leave at a fixed arrival rate, whatever the server does.

Each request has an *intended* send time ``t0 + i / rate``; its latency is measured from
that time, not from when a connection happened to be free, so a server that falls behind
shows its queueing in the percentiles (no coordinated omission, as in wrk2). The number
of requests and the time spent draining are bounded, so an overloaded server cannot make
a step run long.

HTTP/1.1 goes through a small keep-alive connection pool written on asyncio protocols
(httptools parses the responses) so the client costs little CPU next to the servers on
the same machine; gRPC uses ``grpc.aio`` on one channel. Every answer is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import httptools
import numpy as np

# (status, body, request index) -> None if the answer is right, else what is wrong.
HttpCheck = Callable[[int, bytes, int], str | None]
GrpcCheck = Callable[[Any, int], str | None]
# (request index, intended send time, None or "kind: detail") once per request.
Done = Callable[[int, float, str | None], None]


@dataclass(frozen=True)
class StepPlan:
    rate: float  # requests per second
    duration_s: float
    timeout_s: float = 2.0  # a request unanswered this long after its intended time fails
    drain_s: float = 2.0  # the most the step waits, after the last send, for stragglers

    @property
    def count(self) -> int:
        return max(1, round(self.rate * self.duration_s))


@dataclass
class StepRecord:
    """Raw outcome of one step: latencies of good answers, and failures by kind."""

    plan: StepPlan
    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    wrong: int = 0  # answered 200 but with a wrong/malformed answer (counted in errors too)
    first_error: str | None = None
    elapsed_s: float = 0.0  # first intended send -> last answer (or drain end)
    send_lag_s: float = 0.0  # worst lateness of the client's own sends (its health)

    def fail(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if self.first_error is None:
            self.first_error = f"{kind}: {detail}"[:300]

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class Sender(Protocol):
    """One protocol's way of sending request ``index``; calls ``done`` exactly once."""

    async def open(self) -> None: ...

    def send(self, index: int, intended: float, done: Done) -> None: ...

    def drop_queued(self) -> None: ...

    async def close(self) -> None: ...


async def run_step(sender: Sender, plan: StepPlan) -> StepRecord:
    """Send ``plan.count`` requests at ``plan.rate`` and wait (bounded) for the answers.

    The client's garbage collector is paused for the step (and run after it): a full
    collection over the benchmark process's heap would stall the client for tens of
    milliseconds and show up as server latency.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return await _run_step(sender, plan)
    finally:
        if enabled:
            gc.enable()
        gc.collect()


async def _run_step(sender: Sender, plan: StepPlan) -> StepRecord:
    record = StepRecord(plan)
    loop = asyncio.get_running_loop()
    outstanding = 0
    all_done = loop.create_future()
    sent_all = False
    closed = False
    clock = time.perf_counter

    def done(index: int, intended: float, error: str | None) -> None:
        nonlocal outstanding
        if closed:
            return  # a straggler of a finished step: already counted as a timeout
        finished = clock()
        outstanding -= 1
        if error is None:
            record.latencies_s.append(finished - intended)
        else:
            kind, _, detail = error.partition(": ")
            record.fail(kind, detail)
            if kind == "wrong":
                record.wrong += 1
        if sent_all and outstanding == 0 and not all_done.done():
            all_done.set_result(None)

    interval = 1.0 / plan.rate
    t0 = clock() + 0.005
    worst_lag = 0.0
    for i in range(plan.count):
        intended = t0 + i * interval
        now = clock()
        if intended > now:
            await asyncio.sleep(intended - now)
        else:
            worst_lag = max(worst_lag, now - intended)
            if i % 64 == 0:
                await asyncio.sleep(0)  # let answers in even when the client is behind
        outstanding += 1
        sender.send(i, intended, done)
    sent_all = True
    if outstanding > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(all_done), plan.drain_s + plan.timeout_s)
    closed = True
    sender.drop_queued()
    record.elapsed_s = clock() - t0
    record.send_lag_s = worst_lag
    if outstanding > 0:
        record.errors["timeout"] = record.errors.get("timeout", 0) + outstanding
        record.first_error = record.first_error or f"timeout: {outstanding} request(s) unanswered"
    return record


# -- HTTP/1.1 ------------------------------------------------------------------------------
@dataclass
class _Pending:
    index: int
    intended: float
    done: Done


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, pool: HttpSender) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.current: _Pending | None = None
        self.body: list[bytes] = []
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._abort(f"http: unparseable response ({exc})")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)
        if self.current is not None:
            pending, self.current = self.current, None
            pending.done(pending.index, pending.intended, f"connection: closed ({exc})")

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        pending, self.current = self.current, None
        body, self.body = b"".join(self.body), []
        if pending is None:
            return
        status = self.parser.get_status_code()
        error: str | None
        if status != 200:
            error = f"http-{status}: {body[:200]!r}"
        else:
            problem = self.pool.check(status, body, pending.index)
            error = None if problem is None else f"wrong: {problem}"
        keep = self.parser.should_keep_alive()
        pending.done(pending.index, pending.intended, error)
        if keep:
            self.pool.idle(self)
        elif self.transport is not None:
            self.transport.close()

    def send(self, pending: _Pending, raw: bytes) -> None:
        assert self.transport is not None
        self.current = pending
        self.transport.write(raw)

    def _abort(self, error: str) -> None:
        pending, self.current = self.current, None
        if pending is not None:
            pending.done(pending.index, pending.intended, error)
        if self.transport is not None:
            self.transport.close()


class HttpSender:
    """POST pre-encoded bodies over a pool of at most ``connections`` keep-alive connections.

    A request that finds every connection busy waits in a queue: its latency keeps counting
    from its intended send time.
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        bodies: Sequence[bytes],
        check: HttpCheck,
        connections: int = 64,
        content_type: str = "application/json",
    ) -> None:
        self.host = host
        self.port = port
        self.check = check
        self.max_connections = connections
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: {content_type}\r\nAccept: */*\r\n"
        )
        self.requests = [(head + f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._opening = 0
        self._queue: deque[_Pending] = deque()

    async def open(self, warm: int = 16) -> None:
        await asyncio.gather(*(self._connect() for _ in range(min(warm, self.max_connections))))

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        self._opening += 1
        try:
            _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except OSError as exc:
            self._opening -= 1
            while self._queue and not self._all:
                p = self._queue.popleft()
                p.done(p.index, p.intended, f"connect: {exc}")
            return
        self._opening -= 1
        self._all.add(conn)
        self.idle(conn)

    def send(self, index: int, intended: float, done: Done) -> None:
        pending = _Pending(index, intended, done)
        if self._idle:
            conn = self._idle.pop()
            conn.send(pending, self.requests[index % len(self.requests)])
            return
        self._queue.append(pending)
        if len(self._all) + self._opening < self.max_connections:
            asyncio.get_running_loop().create_task(self._connect())

    def idle(self, conn: _Connection) -> None:
        if conn.closed:
            return
        if self._queue:
            pending = self._queue.popleft()
            conn.send(pending, self.requests[pending.index % len(self.requests)])
        else:
            self._idle.append(conn)

    def lost(self, conn: _Connection) -> None:
        self._all.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    def drop_queued(self) -> None:
        self._queue.clear()

    @property
    def connections(self) -> int:
        return len(self._all)

    async def close(self) -> None:
        for conn in list(self._all):
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(0)
        while self._queue:
            p = self._queue.popleft()
            p.done(p.index, p.intended, "connection: client closed")


# -- gRPC ----------------------------------------------------------------------------------
class GrpcSender:
    """Unary ``ModelInfer`` calls over one ``grpc.aio`` channel (HTTP/2 multiplexes them)."""

    def __init__(self, target: str, requests: Sequence[Any], check: GrpcCheck) -> None:
        self.target = target
        self.requests = list(requests)
        self.check = check
        self._channel: Any = None
        self._call: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        import grpc
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

        self._channel = grpc.aio.insecure_channel(
            self.target, options=[("grpc.max_receive_message_length", 16 << 20)]
        )
        await asyncio.wait_for(self._channel.channel_ready(), 10)
        self._call = pb_grpc.GRPCInferenceServiceStub(self._channel).ModelInfer

    def send(self, index: int, intended: float, done: Done) -> None:
        task = asyncio.get_running_loop().create_task(self._one(index, intended, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(self, index: int, intended: float, done: Done) -> None:
        import grpc

        try:
            response = await self._call(self.requests[index % len(self.requests)], timeout=10)
        except grpc.aio.AioRpcError as exc:
            done(index, intended, f"grpc-{exc.code().name}: {exc.details()}")
            return
        problem = self.check(response, index)
        done(index, intended, None if problem is None else f"wrong: {problem}")

    def drop_queued(self) -> None:
        pass  # nothing waits client-side: every call is on the channel

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._channel is not None:
            await self._channel.close()


# -- summaries -----------------------------------------------------------------------------
def percentiles_ms(latencies_s: Sequence[float]) -> tuple[float, float, float]:
    """(p50, p99, p99.9) in milliseconds; NaN when nothing was answered."""
    if not latencies_s:
        return (float("nan"),) * 3  # type: ignore[return-value]
    values = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p99, p999 = np.percentile(values, [50, 99, 99.9])
    return float(p50), float(p99), float(p999)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (a cheaper client), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
