"""Decode REST v1, REST v2 and gRPC v2 inputs into texts, and encode the answers.

Every protocol goes through the same checks and raises the same
``kserve.errors.InvalidInput`` (HTTP 400 / gRPC INVALID_ARGUMENT) naming the field.

The input rule (the same for all three protocols; docs/serving.md states it):

- a text is Unicode: UTF-8 on the wire, no lone surrogate (a JSON ``\\ud800`` escape
  without its pair); any string of the request that breaks this is a 400 naming the field;
- the one input's ``datatype`` is BYTES, compared case-insensitively (KServe upper-cases
  REST datatypes; gRPC does the same here);
- at most ``max_texts_per_request`` texts per request: more is HTTP 413 / gRPC
  INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from roost.client import Protocol as Protocol  # the one enum, re-exported

TEXT_INPUT = "text"
LABEL_OUTPUT = "label"
PROBS_OUTPUT = "probabilities"
CONFIDENCE_OUTPUT = "confidence"


class TooManyTexts(InvalidInput):  # type: ignore[misc]
    """More texts in one request than ``serving.max_texts_per_request`` (HTTP 413)."""

    http_status = 413


def check_count(count: int, limit: int | None, where: str) -> None:
    if limit is not None and count > limit:
        raise TooManyTexts(
            f"{where}: {count} texts; at most {limit} per request (serving.max_texts_per_request)"
        )


def show(value: Any) -> str:
    """A client's value inside an error message: always encodable (lone surrogates escaped)."""
    text = value if isinstance(value, str) else repr(value)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def unicode_error(value: str) -> bool:
    """True when ``value`` holds a lone surrogate (not encodable as UTF-8)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def lone_surrogate_field(payload: Any, where: str = "") -> str | None:
    """The first field (``inputs[0].data[1]``, ``id``) of a parsed JSON body holding a lone
    surrogate, in a key or a value; None when there is none."""
    if isinstance(payload, str):
        return (where or "request body") if unicode_error(payload) else None
    if isinstance(payload, dict):
        for key, value in payload.items():
            name = f"{where}.{show(key)}" if where else show(key)
            if isinstance(key, str) and unicode_error(key):
                return name
            found = lone_surrogate_field(value, name)
            if found:
                return found
    elif isinstance(payload, list):
        for i, value in enumerate(payload):
            found = lone_surrogate_field(value, f"{where}[{i}]")
            if found:
                return found
    return None


@dataclass(frozen=True)
class Decoded:
    texts: list[str]
    protocol: Protocol
    request: InferRequest | None = None  # v2 only: id, requested outputs, binary flags


def protocol_of(body: Any) -> Protocol:
    if isinstance(body, InferRequest):
        return Protocol.GRPC_V2 if body.from_grpc else Protocol.REST_V2
    return Protocol.REST_V1


def decode(payload: Any, max_texts: int | None = None) -> Decoded:
    if isinstance(payload, InferRequest):
        return decode_v2(payload, max_texts)
    return decode_v1(payload, max_texts)


def decode_v1(payload: Any, max_texts: int | None = None) -> Decoded:
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
    check_count(len(instances), max_texts, "instances")
    texts = []
    for i, item in enumerate(instances):
        if isinstance(item, dict) and TEXT_INPUT in item:
            item = item[TEXT_INPUT]
            where = f"instances[{i}].text"
        else:
            where = f"instances[{i}]"
        if not isinstance(item, str):
            raise InvalidInput(f"{where}: expected a string, got {_json_type(item)}")
        if unicode_error(item):
            raise InvalidInput(f"{where}: not valid Unicode (a lone surrogate)")
        texts.append(item)
    return Decoded(texts, Protocol.REST_V1)


def decode_v2(request: InferRequest, max_texts: int | None = None) -> Decoded:
    """One BYTES input of texts, shape [n] or [n, 1]."""
    protocol = Protocol.GRPC_V2 if request.from_grpc else Protocol.REST_V2
    if len(request.inputs) != 1:
        raise InvalidInput(
            f"inputs: expected exactly one BYTES input of texts, got {len(request.inputs)}"
        )
    if request.id is not None and (not isinstance(request.id, str) or unicode_error(request.id)):
        raise InvalidInput("id: expected a string of valid Unicode")
    tensor = request.inputs[0]
    datatype = tensor.datatype
    if not isinstance(datatype, str) or datatype.upper() != "BYTES":
        raise InvalidInput(f"inputs[0].datatype: expected BYTES, got {show(datatype)}")
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
    check_count(len(values), max_texts, "inputs[0].data")
    texts = []
    for i, value in enumerate(values):
        if isinstance(value, bytes | bytearray | np.bytes_):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"inputs[0].data[{i}]: not valid UTF-8") from None
        if not isinstance(value, str):
            raise InvalidInput(f"inputs[0].data[{i}]: expected a string, got {_json_type(value)}")
        if unicode_error(value):
            raise InvalidInput(f"inputs[0].data[{i}]: not valid Unicode (a lone surrogate)")
        texts.append(value)
    return Decoded(texts, protocol, request)


def _flatten_values(tensor: Any) -> list[Any]:
    raw = getattr(tensor, "_raw_data", None)
    if raw is not None:
        try:
            return list(tensor.as_numpy().reshape(-1))
        except (ValueError, InvalidInput) as exc:
            raise InvalidInput(
                f"inputs[0].data: cannot decode binary BYTES tensor ({exc})"
            ) from None
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
    binary = bool(request is not None and request.use_binary_outputs)
    outputs = []
    for name, shape, datatype, array in (
        (LABEL_OUTPUT, [n], "BYTES", np.asarray(names, dtype=object)),
        (PROBS_OUTPUT, [n, classes], "FP32", proba.astype(np.float32)),
        (CONFIDENCE_OUTPUT, [n], "FP32", proba.max(axis=1).astype(np.float32)),
    ):
        tensor = InferOutput(name, shape, datatype)
        # Serialise now: KServe's to_grpc cannot take numpy data when raw outputs are asked for
        # (e.g. tritonclient's gRPC requests, which send raw_input_contents).
        tensor.set_data_from_numpy(array, binary_data=binary)
        outputs.append(tensor)
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


# -- the fast path: plain requests straight from JSON or protobuf ---------------------------
# These accept only the common, well-formed shape of a request and return None for anything
# else (extra fields, parameters, requested outputs, binary data, any error); the caller then
# takes KServe's full path, whose answers and error messages stay the reference.

_V2_REQUEST_KEYS = frozenset({"id", "inputs"})
_V2_INPUT_KEYS = frozenset({"name", "shape", "datatype", "data"})


def plain_v2(body: Any) -> tuple[list[str], str] | None:
    """(texts, request id) of a plain REST v2 request (one BYTES input of strings)."""
    if type(body) is not dict or not body.keys() <= _V2_REQUEST_KEYS:
        return None
    request_id = body.get("id")
    if request_id is not None and type(request_id) is not str:
        return None
    inputs = body.get("inputs")
    if type(inputs) is not list or len(inputs) != 1:
        return None
    tensor = inputs[0]
    if type(tensor) is not dict or tensor.keys() != _V2_INPUT_KEYS:
        return None
    if type(tensor["name"]) is not str or tensor["datatype"] != "BYTES":
        return None
    shape, data = tensor["shape"], tensor["data"]
    if type(data) is not list or not _plain_shape(shape):
        return None
    texts = data
    if len(shape) == 2 and any(type(x) is list for x in data):  # [[text], [text], ...]
        texts = [y for x in data for y in (x if type(x) is list else (x,))]
    if len(texts) != math.prod(shape) or not texts:
        return None
    if not all(type(t) is str for t in texts):
        return None
    return texts, request_id or ""


def _plain_shape(shape: Any) -> bool:
    if type(shape) is not list or not 1 <= len(shape) <= 2:
        return False
    if not all(type(d) is int and d >= 0 for d in shape):
        return False
    return len(shape) == 1 or shape[1] == 1


def plain_v1(body: Any) -> list[str] | None:
    """Texts of a plain REST v1 request (``instances``: strings or ``{"text": ...}``)."""
    if type(body) is not dict or body.keys() != {"instances"}:
        return None
    instances = body["instances"]
    if type(instances) is not list or not instances:
        return None
    texts = []
    for item in instances:
        if type(item) is dict:
            item = item.get(TEXT_INPUT)
        if type(item) is not str:
            return None
        texts.append(item)
    return texts


def plain_grpc(request: Any, model_name: str, model_version: str | None = None) -> list[str] | None:
    """Texts of a plain gRPC ``ModelInferRequest`` for ``model_name`` (bytes_contents)."""
    if (
        request.model_name != model_name
        or (request.model_version and request.model_version != model_version)
        or len(request.inputs) != 1
        or request.raw_input_contents
        or request.outputs
        or request.parameters
    ):
        return None
    tensor = request.inputs[0]
    if tensor.datatype.upper() != "BYTES" or tensor.parameters:
        return None
    if not _plain_shape(list(tensor.shape)):
        return None
    values = tensor.contents.bytes_contents
    if not values or len(values) != math.prod(tensor.shape):
        return None
    try:
        return [v.decode("utf-8") for v in values]
    except UnicodeDecodeError:
        return None


def v2_json(
    model_name: str,
    model_version: str | None,
    request_id: str,
    labels: Sequence[str],
    names: Sequence[str],
    proba: np.ndarray,
) -> bytes:
    """The REST v2 answer of :func:`encode_v2` (same fields, order and float values) as JSON."""
    n, classes = proba.shape
    return orjson.dumps(
        {
            "model_name": model_name,
            "model_version": model_version,
            "id": request_id,
            "parameters": {"labels": ",".join(labels)},
            "outputs": [
                {"name": LABEL_OUTPUT, "shape": [n], "datatype": "BYTES", "parameters": None,
                 "data": list(names)},
                {"name": PROBS_OUTPUT, "shape": [n, classes], "datatype": "FP32",
                 "parameters": None, "data": proba.reshape(-1).tolist()},
                {"name": CONFIDENCE_OUTPUT, "shape": [n], "datatype": "FP32", "parameters": None,
                 "data": proba.max(axis=1).tolist()},
            ],
        }
    )  # fmt: skip


def v1_json(labels: Sequence[str], names: Sequence[str], proba: np.ndarray) -> bytes:
    return orjson.dumps(encode_v1(labels, names, proba))


def grpc_response(
    model_name: str,
    model_version: str | None,
    request_id: str,
    labels: Sequence[str],
    names: Sequence[str],
    proba: np.ndarray,
) -> Any:
    """The gRPC answer of :func:`encode_v2` for a plain request, built directly as protobuf."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    n, classes = proba.shape
    tensor = pb.ModelInferResponse.InferOutputTensor
    contents = pb.InferTensorContents
    return pb.ModelInferResponse(
        model_name=model_name,
        model_version=model_version or "",
        id=request_id,
        parameters={"labels": pb.InferParameter(string_param=",".join(labels))},
        outputs=[
            tensor(name=LABEL_OUTPUT, datatype="BYTES", shape=[n],
                   contents=contents(bytes_contents=[x.encode() for x in names])),
            tensor(name=PROBS_OUTPUT, datatype="FP32", shape=[n, classes],
                   contents=contents(fp32_contents=proba.reshape(-1).tolist())),
            tensor(name=CONFIDENCE_OUTPUT, datatype="FP32", shape=[n],
                   contents=contents(fp32_contents=proba.max(axis=1).tolist())),
        ],
    )  # fmt: skip


# -- the binary tensor extension (REST) and raw_input_contents (gRPC) ----------------------
# KServe parses these before any roost code runs and answers 500 for malformed ones (a bad
# size, a cut length prefix, shape [-1]). These checks run first; a request that passes them
# parses in KServe without error, and one that fails gets a 400 / INVALID_ARGUMENT.

FIXED_SIZES = {
    "BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
    "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8,
}  # fmt: skip


def split_bytes_tensor(raw: bytes, count: int, where: str) -> list[bytes]:
    """The elements of a BYTES tensor in the binary layout (4-byte little-endian length, bytes)."""
    out: list[bytes] = []
    pos, end = 0, len(raw)
    while pos < end:
        if len(out) >= count:
            raise InvalidInput(f"{where}: more data than the {count} element(s) of the shape")
        if pos + 4 > end:
            raise InvalidInput(f"{where}: element {len(out)}: length prefix cut short")
        size = int.from_bytes(raw[pos : pos + 4], "little")
        pos += 4
        if size > end - pos:
            raise InvalidInput(
                f"{where}: element {len(out)}: length {size} runs past the end of the data "
                f"({end - pos} byte(s) left)"
            )
        out.append(raw[pos : pos + size])
        pos += size
    if len(out) != count:
        raise InvalidInput(f"{where}: holds {len(out)} element(s) but the shape says {count}")
    return out


def _shape(value: Any, where: str) -> int:
    if type(value) is not list or not all(type(d) is int and d >= 0 for d in value):
        raise InvalidInput(f"{where}: expected a list of non-negative integers, got {show(value)}")
    return math.prod(value)


def check_raw_tensor(datatype: str, shape: Any, raw: bytes, where: str) -> None:
    """A tensor's raw bytes agree with its datatype and shape (BYTES: every length prefix)."""
    count = _shape(shape, f"{where}.shape")
    kind = datatype.upper() if isinstance(datatype, str) else ""
    if kind == "BYTES":
        for i, element in enumerate(split_bytes_tensor(raw, count, f"{where} (binary data)")):
            try:
                element.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"{where}.data[{i}]: not valid UTF-8") from None
    elif kind in FIXED_SIZES:
        if len(raw) != count * FIXED_SIZES[kind]:
            raise InvalidInput(
                f"{where}: {len(raw)} byte(s) of binary data; {kind} {shape} needs "
                f"{count * FIXED_SIZES[kind]}"
            )
    else:
        raise InvalidInput(f"{where}.datatype: unknown datatype {show(datatype)}")


def check_binary_request(body: bytes, header_length: str) -> None:
    """A REST v2 request with ``Inference-Header-Content-Length``: JSON header + binary data."""
    name = "Inference-Header-Content-Length"
    if not header_length.isascii() or not header_length.isdigit():
        raise InvalidInput(f"{name}: expected a byte count, got {show(header_length)}")
    json_length = int(header_length)
    if not 0 < json_length <= len(body):
        raise InvalidInput(f"{name}: {json_length} is outside the body's {len(body)} byte(s)")
    try:
        header = orjson.loads(body[:json_length])
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request header: malformed JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidInput("inputs: field required (a list of tensors)")
    offset = json_length
    for i, tensor in enumerate(header["inputs"]):
        where = f"inputs[{i}]"
        if not isinstance(tensor, dict):
            raise InvalidInput(f"{where}: expected an object")
        for key, kind in (("name", str), ("datatype", str)):
            if not isinstance(tensor.get(key), kind):
                raise InvalidInput(f"{where}.{key}: field required (a string)")
        parameters = tensor.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise InvalidInput(f"{where}.parameters: expected an object")
        if "data" in tensor:
            _shape(tensor.get("shape"), f"{where}.shape")
            continue
        size = (parameters or {}).get("binary_data_size")
        if type(size) is not int or size < 0:
            raise InvalidInput(
                f"{where}.parameters.binary_data_size: expected a non-negative integer, "
                f"got {show(size)}"
            )
        if size > len(body) - offset:
            raise InvalidInput(
                f"{where}.parameters.binary_data_size: {size} byte(s) but only "
                f"{len(body) - offset} left in the body"
            )
        check_raw_tensor(
            tensor["datatype"], tensor.get("shape"), body[offset : offset + size], where
        )
        offset += size
    if offset != len(body):
        raise InvalidInput(
            f"request body: {len(body) - offset} byte(s) after the binary data the inputs declare"
        )
    outputs = header.get("outputs")
    if outputs is not None and (
        not isinstance(outputs, list)
        or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)
    ):
        raise InvalidInput("outputs: expected a list of objects with a name")


def check_grpc_raw(request: Any) -> None:
    """``raw_input_contents`` of a gRPC ``ModelInferRequest`` agree with its inputs."""
    raw = request.raw_input_contents
    if not raw:
        return
    if len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} input(s)"
        )
    for i, (tensor, data) in enumerate(zip(request.inputs, raw, strict=True)):
        check_raw_tensor(tensor.datatype, list(tensor.shape), data, f"inputs[{i}]")
