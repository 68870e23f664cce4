"""Input decoding shared by REST v1, REST v2 and gRPC: every error names its field."""

from __future__ import annotations

import numpy as np
import pytest
from kserve.errors import InvalidInput
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

from roost.serving import codec

pytestmark = pytest.mark.unit


def v2(*inputs: InferInput, outputs: list[str] | None = None) -> InferRequest:
    return InferRequest(
        "sentiment",
        list(inputs),
        request_id="r1",
        request_outputs=[RequestedOutput(o) for o in outputs] if outputs else None,
    )


def test_v1_strings_and_objects() -> None:
    decoded = codec.decode({"instances": ["a", {"text": "b"}]})
    assert decoded.texts == ["a", "b"] and decoded.protocol is codec.Protocol.REST_V1


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({}, "instances: field required"),
        ({"instances": "text"}, "instances: expected a list of strings, got string"),
        ({"instances": []}, "instances: must not be empty"),
        ({"instances": ["ok", 3]}, r"instances\[1\]: expected a string, got number"),
        ({"instances": [{"text": None}]}, r"instances\[0\].text: expected a string, got null"),
        ([1, 2], "request body: expected a JSON object"),
        (b"plain text", "request body: expected a JSON object"),
    ],
)
def test_v1_errors(payload: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        codec.decode(payload)


def test_v2_bytes_input_with_str_and_bytes() -> None:
    decoded = codec.decode(v2(InferInput("text", [2], "BYTES", ["a", b"b"])))
    assert decoded.texts == ["a", "b"] and decoded.protocol is codec.Protocol.REST_V2


def test_v2_shape_n_by_1_and_nested_data() -> None:
    decoded = codec.decode(v2(InferInput("text", [2, 1], "BYTES", [["a"], ["b"]])))
    assert decoded.texts == ["a", "b"]


def test_v2_binary_tensor() -> None:
    tensor = InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([b"x", b"y"], dtype=object), binary_data=True)
    assert codec.decode(v2(tensor)).texts == ["x", "y"]


def test_grpc_request() -> None:
    request = pb.ModelInferRequest(
        model_name="sentiment",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="text", datatype="BYTES", shape=[1],
                contents=pb.InferTensorContents(bytes_contents=[b"hello"]),
            )
        ],
    )  # fmt: skip
    decoded = codec.decode(InferRequest.from_grpc(request))
    assert decoded.texts == ["hello"] and decoded.protocol is codec.Protocol.GRPC_V2


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (v2(), "inputs: expected exactly one BYTES input"),
        (
            v2(InferInput("a", [1], "BYTES", ["x"]), InferInput("b", [1], "BYTES", ["y"])),
            "inputs: expected exactly one",
        ),
        (
            v2(InferInput("text", [1], "FP32", [1.0])),
            r"inputs\[0\].datatype: expected BYTES, got FP32",
        ),
        (v2(InferInput("text", [3], "BYTES", ["a", "b"])), r"inputs\[0\].shape: \[3\] holds 3"),
        (v2(InferInput("text", [2, 2], "BYTES", ["a"] * 4)), r"inputs\[0\].shape: expected \[n\]"),
        (v2(InferInput("text", [0], "BYTES", [])), r"inputs\[0\].data: must not be empty"),
        (
            v2(InferInput("text", [1], "BYTES", [b"\xff\xfe"])),
            r"inputs\[0\].data\[0\]: not valid UTF-8",
        ),
        (v2(InferInput("text", [1], "BYTES", [5])), r"inputs\[0\].data\[0\]: expected a string"),
    ],
)
def test_v2_errors(request_: InferRequest, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        codec.decode(request_)


def test_encode_v2_outputs_and_unknown_requested_output() -> None:
    proba = np.array([[0.1, 0.2, 0.7]], dtype=np.float32)
    decoded = codec.decode(v2(InferInput("text", [1], "BYTES", ["a"])))
    response = codec.encode_v2(decoded, "sentiment", "3", ["n", "u", "p"], ["p"], proba)
    body, _ = response.to_rest()
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["data"] == ["p"] and outputs["label"]["datatype"] == "BYTES"
    assert outputs["probabilities"]["shape"] == [1, 3]
    assert outputs["probabilities"]["datatype"] == "FP32"
    assert body["model_version"] == "3" and body["parameters"]["labels"] == "n,u,p"

    asking = codec.decode(v2(InferInput("text", [1], "BYTES", ["a"]), outputs=["logits"]))
    with pytest.raises(InvalidInput, match="outputs: unknown output 'logits'"):
        codec.encode_v2(asking, "sentiment", "3", ["n", "u", "p"], ["p"], proba)


def test_encode_v1() -> None:
    body = codec.encode_v1(["n", "p"], ["p"], np.array([[0.25, 0.75]], dtype=np.float32))
    assert body == {
        "predictions": [{"label": "p", "confidence": 0.75, "probabilities": {"n": 0.25, "p": 0.75}}]
    }
