"""The hand-written gRPC wire format (ModelStreamInfer's wrapper, the plain answer), and the
gRPC/layer rows of the bench report."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from roost.bench import layers, stream
from roost.serving import codec, wire

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16384, 1 << 21])
def test_stream_response_round_trips(size: int) -> None:
    inner = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    assert wire.parse_stream_response(wire.stream_response(inner)) == ("", inner)
    error, got = wire.parse_stream_response(wire.stream_response(inner, "bad: ünïcode"))
    assert (error, got) == ("bad: ünïcode", inner)


def test_stream_response_is_what_protobuf_writes() -> None:
    """The bytes equal a protobuf message with the same two fields (field 1 string, 2 bytes)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = descriptor_pb2.FileDescriptorProto(name="roost_test_stream.proto", package="t")
    message = proto.message_type.add(name="M")
    message.field.add(name="error_message", number=1, type=9, label=1)  # string
    message.field.add(name="infer_response", number=2, type=12, label=1)  # bytes
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.M"))
    inner = b"\x0a\x09sentiment" * 40
    assert (
        wire.stream_response(inner, "oops")
        == cls(error_message="oops", infer_response=inner).SerializeToString()
    )
    assert wire.stream_response(inner) == cls(infer_response=inner).SerializeToString()


@pytest.mark.parametrize(
    ("version", "request_id", "n"),
    [("3", "r1", 1), (None, "", 2), ("12", "ïd-ü" * 40, 64), ("", "x" * 300, 200)],
)
def test_plain_answer_is_byte_for_byte_what_protobuf_writes(
    version: str | None, request_id: str, n: int
) -> None:
    """wire.infer_response writes the same bytes as codec.grpc_response's message, with
    extreme floats, long ids (two-byte lengths) and batches past one-byte lengths."""
    rng = np.random.default_rng(n)
    proba = rng.dirichlet([1.0, 1.0, 1.0], size=n).astype(np.float32)
    proba[0] = [1.0, 0.0, 1e-38]
    labels = ["negative", "neutral", "positive"]
    names = [labels[i] for i in proba.argmax(axis=1)]
    expected = codec.grpc_response("sentiment", version, request_id, labels, names, proba)
    got = wire.infer_response("sentiment", version, request_id, labels, names, proba)
    assert got == expected.SerializeToString()
    assert type(expected).FromString(got) == expected


def row(name: str, protocol: str, rps: float) -> dict[str, Any]:
    return {"name": name, "protocol": protocol, "texts_per_request": 1, "max_rps_p99_50ms": rps}


def test_grpc_targets_are_ratios_to_rest_v2_of_the_same_run() -> None:
    result = {"servers": [row("roost", "rest-v2", 1000.0), row("roost", "grpc-v2", 800.0),
                          row("roost", "grpc-v2-stream", 900.0),
                          row("roost-no-fast-path", "grpc-v2", 5000.0)]}  # fmt: skip
    got = stream.targets(result)
    assert got["grpc_unary_vs_rest"]["value"] == 0.8 and got["grpc_unary_vs_rest"]["met"]
    assert got["grpc_stream_vs_rest"]["value"] == 0.9
    assert got["grpc_stream_vs_rest"]["met"] is False
    missing = stream.targets({"servers": [row("roost", "rest-v2", 1000.0)]})
    assert missing["grpc_stream_vs_rest"]["met"] is None


def test_layer_gains_compare_each_layer_off_with_the_plain_row() -> None:
    result: dict[str, Any] = {"servers": [
        row("roost", "rest-v2", 3000.0), row("roost", "grpc-v2", 1500.0),
        row("roost-no-fast-path", "rest-v2", 1000.0), row("roost-no-fast-path", "grpc-v2", 0.0),
        row("roost-no-micro-batching", "rest-v2", 2000.0),
    ]}  # fmt: skip
    gains = {(g["layer"], g["protocol"]): g for g in layers.gains(result)}
    assert set(gains) == {("fast-path", "rest-v2"), ("fast-path", "grpc-v2"),
                          ("micro-batching", "rest-v2")}  # fmt: skip
    assert gains["fast-path", "rest-v2"]["gain"] == 3.0
    assert gains["fast-path", "grpc-v2"]["gain"] is None  # the slow row passed no step
    assert gains["micro-batching", "rest-v2"]["switch"] == "ROOST_SERVING__MAX_BATCH_SIZE=1"
    result["layers"] = list(gains.values())
    section = "\n".join(layers.markdown(result))
    assert (
        "| fast-path | `ROOST_SERVING__FAST_PATH=false` | rest-v2 | 3,000 | 1,000 | 3.0x |"
        in section
    )
    assert layers.markdown({"servers": []}) == []
