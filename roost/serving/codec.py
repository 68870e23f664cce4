"""Decode REST v1, REST v2 and gRPC v2 inputs into texts, and encode the answers.

Every protocol goes through the same checks and raises the same
``kserve.errors.InvalidInput`` (HTTP 400 / gRPC INVALID_ARGUMENT) naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

TEXT_INPUT = "text"
LABEL_OUTPUT = "label"
PROBS_OUTPUT = "probabilities"
CONFIDENCE_OUTPUT = "confidence"


class Protocol(str, Enum):
    REST_V1 = "rest-v1"
    REST_V2 = "rest-v2"
    GRPC_V2 = "grpc-v2"


@dataclass(frozen=True)
class Decoded:
    texts: list[str]
    protocol: Protocol
    request: InferRequest | None = None  # v2 only: id, requested outputs, binary flags


def protocol_of(body: Any) -> Protocol:
    if isinstance(body, InferRequest):
        return Protocol.GRPC_V2 if body.from_grpc else Protocol.REST_V2
    return Protocol.REST_V1


def decode(payload: Any) -> Decoded:
    if isinstance(payload, InferRequest):
        return decode_v2(payload)
    return decode_v1(payload)


def decode_v1(payload: Any) -> Decoded:
    """``{"instances": ["text", ...]}``; an instance may also be ``{"text": "..."}``."""
    if isinstance(payload, bytes | bytearray | str):
        raise InvalidInput("request body: expected a JSON object with an 'instances' list")
    if not isinstance(payload, dict):
        raise InvalidInput(
            f"request body: expected a JSON object with an 'instances' list, "
            f"got {type(payload).__name__}"
        )
    if "instances" not in payload:
        raise InvalidInput("instances: field required (a list of strings)")
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise InvalidInput(f"instances: expected a list of strings, got {_json_type(instances)}")
    if not instances:
        raise InvalidInput("instances: must not be empty")
    texts = []
    for i, item in enumerate(instances):
        if isinstance(item, dict) and TEXT_INPUT in item:
            item = item[TEXT_INPUT]
            where = f"instances[{i}].text"
        else:
            where = f"instances[{i}]"
        if not isinstance(item, str):
            raise InvalidInput(f"{where}: expected a string, got {_json_type(item)}")
        texts.append(item)
    return Decoded(texts, Protocol.REST_V1)


def decode_v2(request: InferRequest) -> Decoded:
    """One BYTES input of texts, shape [n] or [n, 1]."""
    protocol = Protocol.GRPC_V2 if request.from_grpc else Protocol.REST_V2
    if len(request.inputs) != 1:
        raise InvalidInput(
            f"inputs: expected exactly one BYTES input of texts, got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"inputs[0].datatype: expected BYTES, got {tensor.datatype}")
    shape = list(tensor.shape)
    if not shape or any((not isinstance(d, int)) or d < 0 for d in shape):
        raise InvalidInput(f"inputs[0].shape: expected [n] or [n, 1], got {shape}")
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInput(f"inputs[0].shape: expected [n] or [n, 1], got {shape}")
    values = _flatten_values(tensor)
    if len(values) != math.prod(shape):
        raise InvalidInput(
            f"inputs[0].shape: {shape} holds {math.prod(shape)} element(s) "
            f"but inputs[0].data has {len(values)}"
        )
    if not values:
        raise InvalidInput("inputs[0].data: must not be empty")
    texts = []
    for i, value in enumerate(values):
        if isinstance(value, bytes | bytearray | np.bytes_):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"inputs[0].data[{i}]: not valid UTF-8") from None
        if not isinstance(value, str):
            raise InvalidInput(f"inputs[0].data[{i}]: expected a string, got {_json_type(value)}")
        texts.append(value)
    return Decoded(texts, protocol, request)


def _flatten_values(tensor: Any) -> list[Any]:
    raw = getattr(tensor, "_raw_data", None)
    if raw is not None:
        try:
            return list(tensor.as_numpy().reshape(-1))
        except (ValueError, InvalidInput) as exc:
            raise InvalidInput(f"inputs[0].data: cannot decode binary BYTES tensor ({exc})") from None
    data = tensor.data
    if data is None:
        raise InvalidInput("inputs[0].data: field required")
    if isinstance(data, np.ndarray):
        return list(data.reshape(-1))
    if not isinstance(data, list):
        raise InvalidInput(f"inputs[0].data: expected a list, got {_json_type(data)}")
    flat: list[Any] = []
    for item in data:
        if isinstance(item, list):
            flat.extend(item)
        else:
            flat.append(item)
    return flat


def _json_type(value: Any) -> str:
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def encode_v1(labels: Sequence[str], names: Sequence[str], proba: np.ndarray) -> dict[str, Any]:
    return {
        "predictions": [
            {
                "label": name,
                "confidence": float(row.max()),
                "probabilities": {label: float(p) for label, p in zip(labels, row, strict=True)},
            }
            for name, row in zip(names, proba, strict=True)
        ]
    }


def encode_v2(
    decoded: Decoded,
    model_name: str,
    model_version: str | None,
    labels: Sequence[str],
    names: Sequence[str],
    proba: np.ndarray,
) -> InferResponse:
    """Outputs ``label`` (BYTES [n]), ``probabilities`` (FP32 [n, classes]) and ``confidence``.

    The response parameter ``labels`` names the probability columns in order.
    """
    request = decoded.request
    n, classes = proba.shape
    outputs = [
        InferOutput(LABEL_OUTPUT, [n], "BYTES", data=np.asarray(names, dtype=object)),
        InferOutput(PROBS_OUTPUT, [n, classes], "FP32", data=proba.astype(np.float32)),
        InferOutput(CONFIDENCE_OUTPUT, [n], "FP32", data=proba.max(axis=1).astype(np.float32)),
    ]
    known = {o.name for o in outputs}
    if request is not None and request.request_outputs:
        for wanted in request.request_outputs:
            if wanted.name not in known:
                raise InvalidInput(
                    f"outputs: unknown output {wanted.name!r}; known: {sorted(known)}"
                )
    return InferResponse(
        response_id=(request.id if request is not None and request.id else ""),
        model_name=model_name,
        model_version=model_version,
        infer_outputs=outputs,
        use_binary_outputs=bool(request is not None and request.use_binary_outputs),
        requested_outputs=request.request_outputs if request is not None else None,
        from_grpc=decoded.protocol is Protocol.GRPC_V2,
        parameters={"labels": ",".join(labels)},
    )


def input_types() -> list[dict[str, Any]]:
    return [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}]


def output_types(num_classes: int) -> list[dict[str, Any]]:
    return [
        {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]},
        {"name": PROBS_OUTPUT, "datatype": "FP32", "shape": [-1, num_classes]},
        {"name": CONFIDENCE_OUTPUT, "datatype": "FP32", "shape": [-1]},
    ]
