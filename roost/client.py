"""A client for roost's predictor over REST v1, REST v2 (Open Inference Protocol) or gRPC v2."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from roost.errors import RoostError, Unavailable

if TYPE_CHECKING:  # imported where a request is sent: `roost --help` imports this module
    import httpx


class Protocol(StrEnum):
    """The three ways to call the predictor: roost's one enum for them (CLI, client, server).

    The value is what the CLI takes (``--protocol v2``); :attr:`label` is the ``protocol``
    label of the server's metrics. ``REST_V1``/``REST_V2``/``GRPC_V2`` are the server-side
    names of the same members.
    """

    V1 = "v1"
    V2 = "v2"
    GRPC = "grpc"
    REST_V1 = "v1"
    REST_V2 = "v2"
    GRPC_V2 = "grpc"

    @property
    def label(self) -> str:
        return _LABELS[self.value]


_LABELS = {"v1": "rest-v1", "v2": "rest-v2", "grpc": "grpc-v2"}


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str
    confidence: float
    probabilities: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PredictResult:
    predictions: list[Prediction]
    model_version: str | None
    protocol: Protocol


class PredictError(RoostError):
    """The model server answered with an error."""

    def __init__(self, status: int | str, message: str) -> None:
        super().__init__(f"model server answered {status}: {message}")
        self.status = status
        self.exit_code = 2 if isinstance(status, int) and 400 <= status < 500 else 1


def predict(
    texts: Sequence[str],
    protocol: Protocol = Protocol.V2,
    url: str = "http://127.0.0.1:8080",
    grpc_target: str = "127.0.0.1:8081",
    model: str = "sentiment",
    timeout: float = 30.0,
    headers: Mapping[str, str] | None = None,
) -> PredictResult:
    """``headers``: extra request headers (gRPC: metadata), e.g. a rollout side's pin
    (:func:`roost.rollout.variant.headers`)."""
    if protocol is Protocol.GRPC:
        return _predict_grpc(texts, grpc_target, model, timeout, headers or {})
    return _predict_rest(texts, protocol, url.rstrip("/"), model, timeout, headers or {})


def _predict_rest(
    texts: Sequence[str],
    protocol: Protocol,
    url: str,
    model: str,
    timeout: float,
    headers: Mapping[str, str],
) -> PredictResult:
    import httpx

    body: dict[str, Any]
    if protocol is Protocol.V1:
        endpoint, body = f"{url}/v1/models/{model}:predict", {"instances": list(texts)}
    else:
        endpoint = f"{url}/v2/models/{model}/infer"
        body = {
            "inputs": [
                {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": list(texts)}
            ]
        }
    try:
        response = httpx.post(endpoint, json=body, timeout=timeout, headers=dict(headers))
    except httpx.HTTPError as exc:
        raise Unavailable(f"model server at {url} is unreachable ({exc})") from None
    if response.status_code != 200:
        raise PredictError(response.status_code, _error_message(response))
    payload = response.json()
    version = response.headers.get("x-roost-model-version")
    if protocol is Protocol.V1:
        predictions = [
            Prediction(text, p["label"], float(p["confidence"]), dict(p["probabilities"]))
            for text, p in zip(texts, payload["predictions"], strict=True)
        ]
        return PredictResult(predictions, version, protocol)
    outputs = {o["name"]: o for o in payload["outputs"]}
    labels = str((payload.get("parameters") or {}).get("labels", "")).split(",")
    return PredictResult(
        _from_v2(texts, outputs["label"]["data"], outputs["probabilities"]["data"], labels),
        payload.get("model_version") or version,
        protocol,
    )


def _from_v2(
    texts: Sequence[str], names: Sequence[Any], flat_probs: Sequence[float], labels: list[str]
) -> list[Prediction]:
    k = len(flat_probs) // max(len(texts), 1)
    out = []
    for i, text in enumerate(texts):
        row = [float(x) for x in flat_probs[i * k : (i + 1) * k]]
        name = names[i].decode() if isinstance(names[i], bytes) else str(names[i])
        probs = dict(zip(labels, row, strict=True)) if len(labels) == k else {}
        out.append(Prediction(text, name, max(row), probs))
    return out


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:200]


def _predict_grpc(
    texts: Sequence[str], target: str, model: str, timeout: float, headers: Mapping[str, str]
) -> PredictResult:
    import grpc
    import numpy as np
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
    from kserve.protocol.infer_type import deserialize_bytes_tensor

    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="text",
                datatype="BYTES",
                shape=[len(texts)],
                contents=pb.InferTensorContents(bytes_contents=[t.encode() for t in texts]),
            )
        ],
    )
    with grpc.insecure_channel(target) as channel:
        try:
            metadata = tuple((k.lower(), v) for k, v in headers.items())  # gRPC: lower case
            response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, timeout=timeout, metadata=metadata
            )
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(
                    f"model server at {target} is unreachable ({code.name})"
                ) from None
            raise PredictError(code.name, exc.details() or "") from None
    outputs: dict[str, Any] = {}
    for i, tensor in enumerate(response.outputs):
        if response.raw_output_contents:
            raw = response.raw_output_contents[i]
            if tensor.datatype == "BYTES":
                outputs[tensor.name] = list(deserialize_bytes_tensor(raw))
            else:
                outputs[tensor.name] = np.frombuffer(raw, dtype=np.float32).tolist()
        elif tensor.datatype == "BYTES":
            outputs[tensor.name] = list(tensor.contents.bytes_contents)
        else:
            outputs[tensor.name] = list(tensor.contents.fp32_contents)
    params = response.parameters.get("labels")
    labels = params.string_param.split(",") if params is not None else []
    return PredictResult(
        _from_v2(texts, outputs["label"], outputs["probabilities"], labels),
        response.model_version or None,
        Protocol.GRPC,
    )
