"""Triton's ``ModelStreamInferResponse`` and roost's plain ``ModelInferResponse`` in
protobuf's wire format, written (and the first read) by hand.

Triton's grpc_service.proto: ``message ModelStreamInferResponse { string error_message = 1;
ModelInferResponse infer_response = 2; }``. KServe's proto has no such message, and
tritonclient's cannot be imported next to KServe's (both register the protobuf package
``inference``), so the two fields are encoded here (tag, length, bytes: a few lines, no
dependency), around an already serialized ``ModelInferResponse`` (no copy into a wrapper
message either). No kserve or grpc import: the benchmark's client uses it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

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


# -- roost's plain ModelInferResponse ---------------------------------------------------------
# KServe's grpc_predict_v2.proto: ModelInferResponse {string model_name = 1; string
# model_version = 2; string id = 3; map<string, InferParameter> parameters = 4;
# repeated InferOutputTensor outputs = 5;}, InferOutputTensor {string name = 1; string
# datatype = 2; repeated int64 shape = 3; InferTensorContents contents = 5;},
# InferTensorContents {repeated float fp32_contents = 6 (packed); repeated bytes
# bytes_contents = 8;}, InferParameter {string string_param = 3;} (in a oneof: written even
# when empty). Built by protobuf's Python API, this answer cost about 30 µs of the GIL per
# request; here the per-model part is encoded once and a request adds its id, labels and
# floats. tests/unit/test_wire.py holds it byte for byte to protobuf's own serialization.


def _field(tag: int, data: bytes) -> bytes:
    return bytes((tag,)) + varint(len(data)) + data


def _text(tag: int, value: str) -> bytes:
    return _field(tag, value.encode()) if value else b""  # proto3: an empty string is absent


@lru_cache(maxsize=16)
def _answer_parts(
    model_name: str, model_version: str, labels: tuple[str, ...]
) -> tuple[bytes, bytes]:
    """(model_name and model_version, the parameters map) of a model's answers."""
    parameter = _field(0x1A, ",".join(labels).encode())  # InferParameter.string_param
    entry = _field(0x0A, b"labels") + _field(0x12, parameter)  # the map's one entry
    return _text(0x0A, model_name) + _text(0x12, model_version), _field(0x22, entry)


def _tensor(header: bytes, shape: tuple[int, ...], contents: bytes) -> bytes:
    """One of ModelInferResponse.outputs: ``header`` is its name and datatype."""
    dims = b"".join(varint(d) for d in shape)
    return _field(0x2A, header + _field(0x1A, dims) + _field(0x2A, contents))


_LABEL = _field(0x0A, b"label") + _field(0x12, b"BYTES")
_PROBS = _field(0x0A, b"probabilities") + _field(0x12, b"FP32")
_CONFIDENCE = _field(0x0A, b"confidence") + _field(0x12, b"FP32")


def infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str,
    labels: Sequence[str],
    names: Sequence[str],
    proba: np.ndarray,
) -> bytes:
    """The serialized ``ModelInferResponse`` of a plain request: the bytes protobuf writes
    for :func:`roost.serving.codec.grpc_response` with the same arguments."""
    head, parameters = _answer_parts(model_name, model_version or "", tuple(labels))
    n, classes = proba.shape
    floats = np.ascontiguousarray(proba, dtype="<f4")
    label_contents = b"".join(_field(0x42, x.encode()) for x in names)
    return b"".join((
        head, _text(0x1A, request_id), parameters,
        _tensor(_LABEL, (n,), label_contents),
        _tensor(_PROBS, (n, classes), _field(0x32, floats.tobytes())),
        _tensor(_CONFIDENCE, (n,), _field(0x32, floats.max(axis=1).tobytes())),
    ))  # fmt: skip
