"""roost's gRPC rows beyond unary calls: Triton's ``ModelStreamInfer`` and the gRPC targets.

:class:`GrpcStreamSender` sends each request on one bidirectional stream (what
tritonclient's ``start_stream``/``async_stream_infer`` does) and matches the answers by
their ``id``, so answers may come back in any order. Requests are serialized once up
front; the per-request ``id`` is appended as protobuf field 3 (``ModelInferRequest.id``),
which the wire format allows in any position, so the client spends no protobuf work per
request either way.

:func:`targets` adds the issue's gRPC targets to the run's (kept apart from
:func:`roost.bench.report.targets` so the two lists merge independently).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from roost.bench import h2grpc, workload
from roost.bench.loadgen import Done, GrpcCheck
from roost.bench.plan import ServerResult, Target
from roost.serving.wire import SERVICE, varint

STREAM_PROTOCOL = "grpc-v2-stream"
STREAM_METHOD = f"/{SERVICE}/ModelStreamInfer"


class GrpcStreamSender:
    """``ModelStreamInfer`` requests on one ``grpc.aio`` stream, answers matched by id."""

    def __init__(self, target: str, requests: Sequence[Any], check: GrpcCheck) -> None:
        self.target = target
        self.bodies = [r.SerializeToString() for r in requests]
        self.check = check
        self._channel: Any = None
        self._call: Any = None
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._pending: dict[bytes, tuple[int, float, Done]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._serial = 0

    async def open(self) -> None:
        import grpc

        self._channel = grpc.aio.insecure_channel(
            self.target, options=[("grpc.max_receive_message_length", 16 << 20)]
        )
        await asyncio.wait_for(self._channel.channel_ready(), 10)
        method = self._channel.stream_stream(STREAM_METHOD)  # bytes in, bytes out
        self._call = method(timeout=24 * 3600)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write()), loop.create_task(self._read())]

    def send(self, index: int, intended: float, done: Done) -> None:
        self._serial += 1
        request_id = b"%d" % self._serial
        self._pending[request_id] = (index, intended, done)
        body = self.bodies[index % len(self.bodies)]
        self._outbox.put_nowait(body + b"\x1a" + varint(len(request_id)) + request_id)

    async def _write(self) -> None:
        while True:
            await self._call.write(await self._outbox.get())

    async def _read(self) -> None:
        import grpc

        try:
            while True:
                data = await self._call.read()
                if data is grpc.aio.EOF:
                    break
                h2grpc.settle(data, self._pending, self.check)
        except grpc.aio.AioRpcError as exc:
            self._fail_all(f"grpc-{exc.code().name}: {exc.details()}")
            raise

    def _fail_all(self, error: str) -> None:
        pending, self._pending = self._pending, {}
        for index, intended, done in pending.values():
            done(index, intended, error)

    def drop_queued(self) -> None:
        while not self._outbox.empty():
            self._outbox.get_nowait()
        self._pending.clear()  # run_step counted the unanswered ones as timeouts

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()


def target(
    result: ServerResult, server: Any, texts: list[str], name: str, expected: workload.Expected
) -> Target:
    """The ``grpc-v2-stream`` row of a running roost server (same texts as the unary row)."""
    return Target(
        result,
        server.process.pid,
        len(texts),
        lambda: h2grpc.streaming(
            server.grpc_target, workload.grpc_requests(texts, name), workload.check_grpc(expected)
        ),
    )


TARGET_LABELS = {
    "grpc_unary_vs_rest": "roost gRPC v2 unary / REST v2, max req/s",
    "grpc_stream_vs_rest": "roost gRPC v2 ModelStreamInfer / REST v2, max req/s",
}


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """gRPC unary >= 0.7x REST v2 and streaming >= 1.0x REST v2, from this run's rows."""
    rows = {
        s["protocol"]: s
        for s in result["servers"]
        if s["name"] == "roost" and s["texts_per_request"] == 1
    }
    rest = rows.get("rest-v2")
    out: dict[str, Any] = {}
    for key, protocol, goal in (
        ("grpc_unary_vs_rest", "grpc-v2", 0.7),
        ("grpc_stream_vs_rest", STREAM_PROTOCOL, 1.0),
    ):
        row = rows.get(protocol)
        label = TARGET_LABELS[key]
        if row is None or rest is None:
            out[key] = {"value": None, "target": goal, "met": None, "label": label,
                        "reason": "a server did not run"}  # fmt: skip
        elif rest["max_rps_p99_50ms"] <= 0:
            out[key] = {"value": None, "target": goal, "met": None, "label": label,
                        "reason": "roost rest-v2 passed no ladder step at p99 <= SLO"}  # fmt: skip
        else:
            value = row["max_rps_p99_50ms"] / rest["max_rps_p99_50ms"]
            out[key] = {"value": round(value, 3), "target": goal, "met": value >= goal,
                        "label": label}  # fmt: skip
    return out
