"""Triton's ``ModelStreamInferResponse`` in protobuf's wire format, written and read by hand.

Triton's grpc_service.proto: ``message ModelStreamInferResponse { string error_message = 1;
ModelInferResponse infer_response = 2; }``. KServe's proto has no such message, and
tritonclient's cannot be imported next to KServe's (both register the protobuf package
``inference``), so the two fields are encoded here (tag, length, bytes: a few lines, no
dependency), around an already serialized ``ModelInferResponse`` (no copy into a wrapper
message either). No kserve or grpc import: the benchmark's client uses it too.
"""

from __future__ import annotations

SERVICE = "inference.GRPCInferenceService"  # KServe's and Triton's service name


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def stream_response(infer_response: bytes, error: str = "") -> bytes:
    """A serialized ``ModelStreamInferResponse`` around a serialized ``ModelInferResponse``.

    Triton's grpc_service.proto: ``string error_message = 1; ModelInferResponse
    infer_response = 2;``. KServe's proto has no such message, and tritonclient's cannot be
    imported next to KServe's (both register the protobuf package ``inference``), so its two
    fields are written here in protobuf's wire format (tag, length, bytes); the answer is not
    copied into a wrapper message either.
    """
    out = b""
    if error:
        data = error.encode("utf-8", "backslashreplace")
        out = b"\x0a" + varint(len(data)) + data
    return out + b"\x12" + varint(len(infer_response)) + infer_response


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def parse_stream_response(data: bytes) -> tuple[str, bytes]:
    """(error_message, serialized infer_response) of a ``ModelStreamInferResponse``."""
    error, inner, pos = "", b"", 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        if tag & 7 != 2:
            raise ValueError(f"ModelStreamInferResponse: unexpected wire type in tag {tag}")
        size, pos = _read_varint(data, pos)
        value, pos = data[pos : pos + size], pos + size
        if tag >> 3 == 1:
            error = value.decode("utf-8", "replace")
        elif tag >> 3 == 2:
            inner = value
    return error, inner
