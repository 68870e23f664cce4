"""The bench's gRPC load generator: HTTP/2 frames written and read on an asyncio protocol.

Why not ``grpc.aio``: client and server share the machine's CPUs, so what the client spends
per call is taken from the server. The HTTP/1.1 client (:mod:`roost.bench.loadgen`) is a
small asyncio protocol for that reason; ``grpc.aio``'s client cost several times its CPU per
request (``client CPU s / 1k req`` in bench.md: 0.452 a unary call against REST's 0.042 in
the full run at ``2d85dde``), so the gRPC rows charged the server for the client's work. A
full run loads roost's gRPC rows with both clients (``roost (grpc.aio client)`` rows), side
by side. This client does what the HTTP/1.1 one does, over HTTP/2:

- one connection (as one ``grpc.aio`` channel), streams multiplexed on it; request header
  blocks are HPACK literals that never touch the dynamic table (constant bytes per
  connection), response blocks are decoded with ``hpack`` (the python-hyper decoder);
- HTTP/2 as RFC 9113 asks of a client: the server's SETTINGS are applied and acknowledged,
  PINGs answered, send windows (connection and stream) respected, with DATA split to the
  server's ``MAX_FRAME_SIZE`` and held back until a WINDOW_UPDATE; receive windows are
  opened wide and topped up; GOAWAY and RST_STREAM fail the streams they name;
- gRPC: 5-byte length-prefixed messages, ``grpc-status`` / ``grpc-message`` from trailers
  (or a trailers-only answer), status names as gRPC's.

It is a load generator, not a general client: no TLS, no compression, no retries.
``bench.grpc_client: grpcio`` switches the bench back to ``grpc.aio`` (both are checked
against the same servers in ``tests/integration/test_h2grpc.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast
from urllib.parse import unquote

from hpack import HPACKError

from roost.bench.loadgen import Done, GrpcCheck
from roost.serving.wire import SERVICE, parse_stream_response, varint

INFER_PATH = f"/{SERVICE}/ModelInfer"
STREAM_PATH = f"/{SERVICE}/ModelStreamInfer"

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE = 0x3, 0x4
SETTINGS_MAX_FRAME_SIZE, SETTINGS_ENABLE_PUSH = 0x5, 0x2
MAX_WINDOW = (1 << 31) - 1
CANCEL = 0x8  # RST_STREAM error code

FRAME = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
STATUS_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)  # fmt: skip

# (status, message) once a call ends: status 0 is OK; -1 is not gRPC's (transport, HTTP).
Closed = Callable[[int, str], None]


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return FRAME.pack((len(payload) << 8) | kind, flags, stream_id) + payload


def _hpack_int(value: int, bits: int, first: int) -> bytes:
    """An HPACK integer with a ``bits``-bit prefix, ``first`` holding the pattern bits."""
    limit = (1 << bits) - 1
    if value < limit:
        return bytes([first | value])
    return bytes([first | limit]) + varint(value - limit)


def _hpack_str(value: str) -> bytes:
    data = value.encode()
    return _hpack_int(len(data), 7, 0) + data


def request_block(path: str, authority: str) -> bytes:
    """The HEADERS block of a gRPC call: static-table indices and literals without indexing
    (RFC 7541 6.2.2), so it is the same bytes for every call and leaves the server's table."""
    return (
        b"\x83\x86"  # :method POST, :scheme http
        + _hpack_int(4, 4, 0) + _hpack_str(path)  # :path (static name 4)
        + _hpack_int(1, 4, 0) + _hpack_str(authority)  # :authority (static name 1)
        + _hpack_int(31, 4, 0) + _hpack_str("application/grpc")  # content-type
        + b"\x00" + _hpack_str("te") + _hpack_str("trailers")
        + _hpack_int(58, 4, 0) + _hpack_str("roost-bench")  # user-agent
    )  # fmt: skip


def message(body: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
    return b"\x00" + len(body).to_bytes(4, "big") + body


class Call:
    """One HTTP/2 stream carrying a gRPC call."""

    __slots__ = ("closed", "ended", "headers", "id", "inbox", "on_closed", "on_message",
                 "outbox", "received", "window")  # fmt: skip

    def __init__(self, on_message: Callable[[bytes], None], on_closed: Closed) -> None:
        self.id = 0
        self.on_message = on_message
        self.on_closed = on_closed
        self.window = 0  # what the server lets this stream send
        self.outbox = bytearray()  # DATA not yet sent (windows)
        self.ended = False  # END_STREAM goes with the outbox's last byte
        self.inbox = bytearray()  # DATA received, not yet a whole message
        self.received = 0  # DATA bytes received since the last stream WINDOW_UPDATE
        self.headers: dict[bytes, bytes] | None = None  # the response's headers
        self.closed = False


class Connection(asyncio.Protocol):
    """One HTTP/2 connection to a gRPC server (see the module docstring)."""

    def __init__(self, authority: str) -> None:
        from hpack import Decoder

        self.authority = authority
        self.decoder = Decoder()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.calls: dict[int, Call] = {}
        self.next_id = 1
        self.window = 65535  # connection send window
        self.stream_window = 65535  # the server's SETTINGS_INITIAL_WINDOW_SIZE
        self.max_frame = 16384
        self.max_streams = 1 << 31
        self.received = 0  # DATA bytes since the last connection WINDOW_UPDATE
        self.blocked: deque[Call] = deque()  # calls with DATA waiting for a window
        self.waiting: deque[tuple[bytes, Call]] = deque()  # calls past MAX_CONCURRENT_STREAMS
        self.blocks: dict[str, bytes] = {}
        self.continuing: tuple[Call | None, int, bool] | None = None  # (call, id, end stream)
        self.block = bytearray()  # the header block being received
        self.goaway: str | None = None
        self.settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, target: str, timeout: float = 10.0) -> Connection:
        """Connect to ``host:port`` and wait for the server's SETTINGS."""
        host, _, port = target.rpartition(":")
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: cls(target), host.strip("[]"), int(port)), timeout
        )
        try:
            await asyncio.wait_for(asyncio.shield(conn.settled), timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        settings = struct.pack(
            ">HIHI", SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW
        )
        self.transport.write(
            PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - 65535))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.goaway = self.goaway or f"connection closed ({exc})"
        if not self.settled.done():
            self.settled.set_exception(ConnectionError(self.goaway))
        self._fail_all(self.goaway)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        pos, size = 0, len(buffer)
        try:
            while size - pos >= 9:
                head, flags, stream_id = FRAME.unpack_from(buffer, pos)
                length = head >> 8
                end = pos + 9 + length
                if end > size:
                    break
                payload = bytes(buffer[pos + 9 : end])
                self._frame(head & 0xFF, flags, stream_id & MAX_WINDOW, payload)
                pos = end
        except (ValueError, struct.error, HPACKError) as exc:  # a frame that makes no sense
            self._close(f"protocol: {type(exc).__name__}: {exc}")
            return
        del buffer[:pos]

    # -- calls ---------------------------------------------------------------------------------
    def start(
        self, path: str, on_message: Callable[[bytes], None], on_closed: Closed,
        body: bytes | None = None,
    ) -> Call:  # fmt: skip
        """A new call on ``path``; with ``body``, a unary call (its one message, then the end)."""
        call = Call(on_message, on_closed)
        if body is not None:
            call.outbox += message(body)
            call.ended = True
        if self.goaway is not None:
            self._end(call, -1, f"connection: {self.goaway}")
            return call
        block = self.blocks.get(path)
        if block is None:
            block = self.blocks[path] = request_block(path, self.authority)
        if len(self.calls) >= self.max_streams:
            self.waiting.append((block, call))
        else:
            self._open(block, call)
        return call

    def send(self, call: Call, body: bytes, end: bool = False) -> None:
        """One more message on an open call (a stream)."""
        if call.closed:
            return
        call.outbox += message(body)
        call.ended = end
        if call.id and self.transport is not None:
            self.transport.write(self._push(call))

    def cancel(self, call: Call) -> None:
        """End a call without an answer (RST_STREAM CANCEL); its callback is not called."""
        if call.closed:
            return
        call.closed = True
        if call.id and self.calls.pop(call.id, None) is not None and self.transport:
            self.transport.write(frame(RST_STREAM, 0, call.id, struct.pack(">I", CANCEL)))
        self._admit()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.write(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
            self.transport.close()

    def _open(self, block: bytes, call: Call) -> None:
        call.id, self.next_id = self.next_id, self.next_id + 2
        call.window = self.stream_window
        self.calls[call.id] = call
        flags = END_HEADERS | (END_STREAM if call.ended and not call.outbox else 0)
        assert self.transport is not None
        if len(block) > self.max_frame:  # never, for the bench's paths: one frame
            raise ValueError("request header block larger than a frame")
        # HEADERS and the DATA the windows allow: one write (one send() for a unary call)
        self.transport.write(frame(HEADERS, flags, call.id, block) + self._push(call))

    def _push(self, call: Call) -> bytes:
        """The DATA frames the windows allow of ``call``'s outbox; the rest waits."""
        out = call.outbox
        frames = b""
        while out:
            room = min(len(out), self.window, call.window, self.max_frame)
            if room <= 0:
                if call not in self.blocked:
                    self.blocked.append(call)
                break
            last = room == len(out)
            flags = END_STREAM if last and call.ended else 0
            frames += frame(DATA, flags, call.id, bytes(out[:room]))
            del out[:room]
            self.window -= room
            call.window -= room
        return frames

    def _unblock(self) -> None:
        frames = b""
        for _ in range(len(self.blocked)):
            if self.window <= 0:
                break
            call = self.blocked.popleft()
            if not call.closed:
                frames += self._push(call)
        if frames and self.transport is not None:
            self.transport.write(frames)

    def _admit(self) -> None:
        while self.waiting and len(self.calls) < self.max_streams:
            block, call = self.waiting.popleft()
            if not call.closed:
                self._open(block, call)

    # -- frames --------------------------------------------------------------------------------
    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuing is not None and kind != CONTINUATION:
            raise ValueError("a header block was interrupted")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind in (HEADERS, CONTINUATION):
            self._headers(kind, flags, stream_id, payload)
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & MAX_WINDOW
            if stream_id == 0:
                self.window += increment
            else:
                call = self.calls.get(stream_id)
                if call is None:
                    return
                call.window += increment
            self._unblock()
        elif kind == PING:
            if not flags & ACK and self.transport is not None:
                self.transport.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            code = int.from_bytes(payload[:4], "big")
            call = self.calls.get(stream_id)
            if call is not None:
                self._end(call, -1, f"rst-stream: the server reset the stream (code {code})")
        elif kind == GOAWAY:
            last, code = struct.unpack_from(">II", payload)
            detail = payload[8:].decode("utf-8", "replace")
            self.goaway = f"goaway: code {code} {detail}".strip()
            for call in [c for i, c in self.calls.items() if i > last & MAX_WINDOW]:
                self._end(call, -1, f"connection: {self.goaway}")
        elif kind == PUSH_PROMISE:
            raise ValueError("PUSH_PROMISE after SETTINGS_ENABLE_PUSH 0")
        # PRIORITY and unknown frame types: ignored, as RFC 9113 says

    def _settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - len(payload) % 6, 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                delta = value - self.stream_window
                self.stream_window = value
                for call in self.calls.values():
                    call.window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self.max_frame = value
            elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                self.max_streams = value
        assert self.transport is not None
        self.transport.write(frame(SETTINGS, ACK, 0))
        if not self.settled.done():
            self.settled.set_result(None)
        self._unblock()
        self._admit()

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        size = len(payload)
        if flags & PADDED:
            payload = payload[1 : size - payload[0]]
        self.received += size
        if self.received > 1 << 30 and self.transport is not None:  # keep the window open
            self.transport.write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received)))
            self.received = 0
        call = self.calls.get(stream_id)
        if call is None:
            return  # a cancelled call's late DATA
        call.received += size
        if call.received > 1 << 30 and self.transport is not None:
            self.transport.write(
                frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", call.received))
            )
            call.received = 0
        inbox = call.inbox
        inbox += payload
        while len(inbox) >= 5:
            length = int.from_bytes(inbox[1:5], "big")
            if len(inbox) < 5 + length:
                break
            if inbox[0]:
                self._end(call, -1, "grpc: a compressed message (no encoding was offered)")
                return
            body = bytes(inbox[5 : 5 + length])
            del inbox[: 5 + length]
            call.on_message(body)
        if flags & END_STREAM:
            self._end(call, -1, "grpc: the stream ended without trailers")

    def _headers(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == HEADERS:
            start = 0
            if flags & PADDED:
                start = 1
                payload = payload[: len(payload) - payload[0]]
            if flags & PRIORITY_FLAG:
                start += 5
            self.continuing = (self.calls.get(stream_id), stream_id, bool(flags & END_STREAM))
            self.block = bytearray(payload[start:])
        else:
            if self.continuing is None or self.continuing[1] != stream_id:
                raise ValueError("CONTINUATION without its HEADERS")
            self.block += payload
        if not flags & END_HEADERS:
            return
        assert self.continuing is not None
        call, _, ended = self.continuing
        self.continuing = None
        # Every block is decoded, a cancelled call's too: HPACK's table is the connection's.
        fields = dict(self.decoder.decode(bytes(self.block), raw=True))
        if call is None:
            return
        if call.headers is None:
            call.headers = fields
            status = fields.get(b":status")
            if status != b"200":
                self._end(call, -1, f"http-{(status or b'?').decode()}: not a gRPC answer")
                return
            if not ended:
                return
        if ended:  # trailers (or a trailers-only answer)
            code = fields.get(b"grpc-status")
            if code is None:
                self._end(call, -1, "grpc: trailers without grpc-status")
                return
            text = unquote(fields.get(b"grpc-message", b"").decode("utf-8", "replace"))
            self._end(call, int(code), text)

    def _end(self, call: Call, status: int, detail: str) -> None:
        if call.closed:
            return
        call.closed = True
        if call.id:
            self.calls.pop(call.id, None)
        call.on_closed(status, detail)
        self._admit()

    def _close(self, reason: str) -> None:
        self.goaway = reason
        self._fail_all(reason)
        if self.transport is not None:
            self.transport.close()

    def _fail_all(self, reason: str) -> None:
        for call in list(self.calls.values()):
            self._end(call, -1, f"connection: {reason}")
        while self.waiting:
            _, call = self.waiting.popleft()
            self._end(call, -1, f"connection: {reason}")


def error_text(status: int, detail: str) -> str:
    """``kind: detail`` for :data:`roost.bench.loadgen.Done`, as the grpc.aio senders say it."""
    if status < 0:
        return detail
    name = STATUS_NAMES[status] if status < len(STATUS_NAMES) else str(status)
    return f"grpc-{name}: {detail}"


class H2GrpcSender:
    """Unary ``ModelInfer`` calls, each its own stream on one connection."""

    def __init__(self, target: str, requests: Sequence[Any], check: GrpcCheck) -> None:
        self.target = target
        self.bodies = [r.SerializeToString() for r in requests]
        self.check = check
        self.conn: Connection | None = None
        self.open_calls: set[Call] = set()

    async def open(self) -> None:
        self.conn = await Connection.open(self.target)

    def send(self, index: int, intended: float, done: Done) -> None:
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

        answers: list[bytes] = []
        conn = self.conn
        assert conn is not None
        started: list[Call] = []  # the call, once start() returned (it may end inside it)

        def closed(status: int, detail: str) -> None:
            if started:
                self.open_calls.discard(started[0])
            if status != 0:
                done(index, intended, error_text(status, detail))
            elif len(answers) != 1:
                done(index, intended, f"wrong: {len(answers)} messages in a unary answer")
            else:
                try:
                    response = pb.ModelInferResponse.FromString(answers[0])
                except Exception as exc:  # protobuf's DecodeError
                    done(index, intended, f"wrong: not a ModelInferResponse ({exc})")
                    return
                problem = self.check(response, index)
                done(index, intended, None if problem is None else f"wrong: {problem}")

        body = self.bodies[index % len(self.bodies)]
        call = conn.start(INFER_PATH, answers.append, closed, body)
        if not call.closed:
            started.append(call)
            self.open_calls.add(call)

    def drop_queued(self) -> None:
        """The step is over: calls still open are cancelled (run_step counted them)."""
        conn = self.conn
        calls, self.open_calls = self.open_calls, set()
        if conn is not None:
            for call in calls:
                conn.cancel(call)

    async def close(self) -> None:
        self.drop_queued()
        if self.conn is not None:
            self.conn.close()
            await asyncio.sleep(0)


def settle(data: bytes, pending: dict[bytes, tuple[int, float, Done]], check: GrpcCheck) -> None:
    """One ``ModelStreamInferResponse`` of a stream: its request (by ``id``) is done."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    error, inner = parse_stream_response(data)
    response = pb.ModelInferResponse.FromString(inner)
    entry = pending.pop(response.id.encode(), None)
    if entry is None:
        return  # a request of a finished step
    index, intended, done = entry
    if error:
        done(index, intended, f"stream-error: {error}")
        return
    problem = check(response, index)
    done(index, intended, None if problem is None else f"wrong: {problem}")


class H2GrpcStreamSender:
    """``ModelStreamInfer`` requests on one stream, answers matched by their ``id``."""

    def __init__(self, target: str, requests: Sequence[Any], check: GrpcCheck) -> None:
        self.target = target
        self.bodies = [r.SerializeToString() for r in requests]
        self.check = check
        self.conn: Connection | None = None
        self.call: Call | None = None
        self._pending: dict[bytes, tuple[int, float, Done]] = {}
        self._serial = 0
        self._ended: str | None = None

    async def open(self) -> None:
        self.conn = await Connection.open(self.target)
        self.call = self.conn.start(STREAM_PATH, self._answer, self._closed)

    def send(self, index: int, intended: float, done: Done) -> None:
        if self._ended is not None:
            done(index, intended, self._ended)
            return
        self._serial += 1
        request_id = b"%d" % self._serial
        self._pending[request_id] = (index, intended, done)
        body = self.bodies[index % len(self.bodies)]
        assert self.conn is not None and self.call is not None
        self.conn.send(self.call, body + b"\x1a" + varint(len(request_id)) + request_id)

    def _answer(self, data: bytes) -> None:
        settle(data, self._pending, self.check)

    def _closed(self, status: int, detail: str) -> None:
        self._ended = error_text(status if status != 0 else -1,
                                 detail or "stream: the server ended the stream")  # fmt: skip
        pending, self._pending = self._pending, {}
        for index, intended, done in pending.values():
            done(index, intended, self._ended)

    def drop_queued(self) -> None:
        self._pending.clear()  # run_step counted the unanswered ones as timeouts

    async def close(self) -> None:
        if self.conn is not None:
            if self.call is not None:
                with contextlib.suppress(Exception):
                    self.conn.cancel(self.call)
            self.conn.close()
            await asyncio.sleep(0)


# -- which client the bench uses (bench.grpc_client) ---------------------------------------
CLIENTS = ("h2", "grpcio")
_client = ["h2"]


def use(client: str) -> None:
    """Set the bench's gRPC load generator for this process: ``h2`` (this module) or
    ``grpcio`` (``grpc.aio``: :class:`roost.bench.loadgen.GrpcSender` and
    :class:`roost.bench.stream.GrpcStreamSender`)."""
    if client not in CLIENTS:
        raise ValueError(f"bench.grpc_client: {client!r} is not one of {', '.join(CLIENTS)}")
    _client[0] = client


def client() -> str:
    return _client[0]


def unary(target: str, requests: Sequence[Any], check: GrpcCheck) -> Any:
    """A sender of unary ``ModelInfer`` calls, of the client :func:`use` chose."""
    if _client[0] == "grpcio":
        from roost.bench.loadgen import GrpcSender

        return GrpcSender(target, requests, check)
    return H2GrpcSender(target, requests, check)


def streaming(target: str, requests: Sequence[Any], check: GrpcCheck) -> Any:
    """A sender of ``ModelStreamInfer`` requests on one stream, of the client :func:`use` chose."""
    if _client[0] == "grpcio":
        from roost.bench.stream import GrpcStreamSender

        return GrpcStreamSender(target, requests, check)
    return H2GrpcStreamSender(target, requests, check)
