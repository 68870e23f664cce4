"""The bench's HTTP/2 gRPC client against a scripted server that reads and writes raw frames.

The server side is written here frame by frame (hpack's encoder for its header blocks), so
each test states exactly what a server sends and checks what the client put on the wire:
flow control (DATA held back until WINDOW_UPDATE, split to MAX_FRAME_SIZE), SETTINGS and
PING acknowledged, trailers and trailers-only answers, RST_STREAM and GOAWAY.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hpack import Decoder, Encoder

from roost.bench import h2grpc, loadgen, stream
from roost.bench.h2grpc import (
    ACK,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Connection,
    frame,
    message,
)

pytestmark = pytest.mark.unit

Frame = tuple[int, int, int, bytes]  # type, flags, stream id, payload


class Peer:
    """The server's end of one connection: read frames, write frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = Encoder()

    async def frame(self) -> Frame:
        head = await asyncio.wait_for(self.reader.readexactly(9), 10)
        length_type, flags, stream_id = struct.unpack(">IBI", head)
        payload = await self.reader.readexactly(length_type >> 8)
        return length_type & 0xFF, flags, stream_id & 0x7FFFFFFF, payload

    async def until(self, kind: int) -> Frame:
        while True:
            got = await self.frame()
            if got[0] == kind:
                return got

    def send(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        self.writer.write(frame(kind, flags, stream_id, payload))

    def headers(self, stream_id: int, fields: list[tuple[str, str]], end: bool = False) -> None:
        flags = END_HEADERS | (END_STREAM if end else 0)
        self.send(HEADERS, flags, stream_id, self.encoder.encode(fields))


def scripted(script: Callable[[Peer], Awaitable[None]]) -> Callable[[], Awaitable[Connection]]:
    """A server on a free port running ``script`` for its one connection; returns a
    coroutine function that connects the client to it."""

    async def connect() -> Connection:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = Peer(reader, writer)
            assert await reader.readexactly(24) == h2grpc.PREFACE
            await script(peer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        return await Connection.open(f"127.0.0.1:{port}")

    return connect


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_request_waits_for_the_window_and_is_split_to_the_frame_size() -> None:
    seen: dict[str, object] = {}
    ended: asyncio.Event

    async def script(peer: Peer) -> None:
        kind, flags, _, payload = await peer.frame()
        assert kind == SETTINGS and not flags & ACK
        assert struct.unpack(">HIHI", payload) == (2, 0, 4, (1 << 31) - 1)  # no push, wide window
        # A tiny stream window and the smallest frame size.
        peer.send(SETTINGS, 0, 0, struct.pack(">HIHI", 4, 10, 5, 16384))
        assert (await peer.until(SETTINGS))[1] == ACK  # acknowledged
        kind, flags, stream, block = await peer.until(HEADERS)
        fields: dict[Any, Any] = dict(Decoder().decode(block))
        assert fields[":path"] == h2grpc.INFER_PATH and fields["te"] == "trailers"
        assert fields["content-type"] == "application/grpc" and not flags & END_STREAM
        first = await peer.until(DATA)
        assert len(first[3]) == 10 and not first[1] & END_STREAM  # held at the window
        peer.send(PING, 0, 0, b"12345678")
        assert await peer.frame() == (PING, ACK, 0, b"12345678")  # and no DATA before it
        peer.send(WINDOW_UPDATE, 0, stream, struct.pack(">I", 1 << 20))
        body = first[3]
        while True:
            chunk = await peer.until(DATA)
            assert len(chunk[3]) <= 16384
            body += chunk[3]
            if chunk[1] & END_STREAM:
                break
        seen["body"] = body
        peer.headers(stream, [(":status", "200"), ("content-type", "application/grpc")])
        peer.send(DATA, 0, stream, message(b"answer"))
        peer.headers(stream, [("grpc-status", "0")], end=True)
        await peer.writer.drain()
        await ended.wait()

    async def main() -> None:
        nonlocal ended
        ended = asyncio.Event()
        conn = await scripted(script)()
        answers: list[bytes] = []
        done: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        big = bytes(range(256)) * 160  # 40 KiB: three frames at 16 KiB
        conn.start(h2grpc.INFER_PATH, answers.append,
                   lambda status, detail: done.set_result((status, detail)), big)  # fmt: skip
        assert await done == (0, "")
        assert answers == [b"answer"] and seen["body"] == message(big)
        assert not conn.calls  # the stream is gone once answered
        ended.set()
        conn.close()

    run(main())


def test_errors_trailers_only_rst_stream_and_goaway() -> None:
    ended: asyncio.Event

    async def script(peer: Peer) -> None:
        peer.send(SETTINGS, 0, 0)
        streams: list[int] = []
        while len(streams) < 4:
            kind, _, stream, _ = await peer.frame()
            if kind == HEADERS:
                streams.append(stream)
        one, two, three, _four = streams
        # A trailers-only answer, its message percent-encoded as gRPC does.
        peer.headers(one, [(":status", "200"), ("content-type", "application/grpc"),
                           ("grpc-status", "5"), ("grpc-message", "model %27nope%27 not found")],
                     end=True)  # fmt: skip
        peer.send(RST_STREAM, 0, two, struct.pack(">I", 2))
        peer.headers(three, [(":status", "502")], end=True)  # a proxy's answer, not gRPC
        # Going away: the last stream it will answer is three; four fails.
        peer.send(GOAWAY, 0, 0, struct.pack(">II", three, 0) + b"bye")
        await peer.writer.drain()
        await ended.wait()

    async def main() -> None:
        nonlocal ended
        ended = asyncio.Event()
        conn = await scripted(script)()
        results: list[str] = []
        four = asyncio.Event()

        def closed(status: int, detail: str) -> None:
            results.append(h2grpc.error_text(status, detail))
            if len(results) == 4:
                four.set()

        for _ in range(4):
            conn.start(h2grpc.INFER_PATH, lambda _: None, closed, b"x")
        await asyncio.wait_for(four.wait(), 10)
        conn.start(h2grpc.INFER_PATH, lambda _: None, closed, b"x")  # after GOAWAY: refused
        assert results == [
            "grpc-NOT_FOUND: model 'nope' not found",
            "rst-stream: the server reset the stream (code 2)",
            "http-502: not a gRPC answer",
            "connection: goaway: code 0 bye",
            "connection: goaway: code 0 bye",
        ]
        ended.set()
        conn.close()

    run(main())


def test_the_bench_uses_the_configured_client() -> None:
    h2grpc.use("grpcio")
    try:
        assert type(h2grpc.unary("x:1", [], lambda r, i: None)) is loadgen.GrpcSender
        assert type(h2grpc.streaming("x:1", [], lambda r, i: None)) is stream.GrpcStreamSender
    finally:
        h2grpc.use("h2")
    assert type(h2grpc.unary("x:1", [], lambda r, i: None)) is h2grpc.H2GrpcSender
    with pytest.raises(ValueError, match=r"bench\.grpc_client"):
        h2grpc.use("curl")
