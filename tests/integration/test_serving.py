"""The KServe predictor over REST v1, REST v2 and gRPC v2, against a real `roost serve`.

Every bad input gets a 400/404/413 with a JSON `error` naming the field, and the server
keeps answering good requests afterwards.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pandas as pd
import pytest

from roost import client
from roost.serving.local import LocalServer

pytestmark = pytest.mark.integration

TEXTS = [
    "I absolutely love this airline, best flight ever!",
    "My phone broke after two days, terrible support.",
    "The meeting moved to Thursday.",
]
V2_BODY = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": TEXTS}]}


@pytest.fixture
def http(model_server: LocalServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=model_server.http_url, timeout=30) as c:
        yield c
        # After every test (bad inputs included) the server still answers a good request.
        ok = c.post("/v1/models/sentiment:predict", json={"instances": ["still serving?"]})
        assert ok.status_code == 200, ok.text


def pyfunc_labels(champion_uri: str) -> list[str]:
    import mlflow

    out = mlflow.pyfunc.load_model(champion_uri).predict(pd.DataFrame({"text": TEXTS}))
    return out["label"].tolist()


def test_rest_v1(http: httpx.Client, champion) -> None:  # type: ignore[no-untyped-def]
    r = http.post("/v1/models/sentiment:predict", json={"instances": TEXTS})
    assert r.status_code == 200
    assert r.headers["x-roost-model-version"] == champion.version
    assert r.headers["x-roost-model-alias"] == "champion"
    predictions = r.json()["predictions"]
    assert [p["label"] for p in predictions] == pyfunc_labels(champion.model_uri)
    for p in predictions:
        assert set(p["probabilities"]) == {"negative", "neutral", "positive"}
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-4
        assert p["confidence"] == max(p["probabilities"].values())


def test_rest_v2_and_metadata(http: httpx.Client, champion) -> None:  # type: ignore[no-untyped-def]
    r = http.post("/v2/models/sentiment/infer", json={**V2_BODY, "id": "req-7"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-7" and body["model_version"] == champion.version
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["datatype"] == "BYTES" and outputs["label"]["shape"] == [3]
    assert outputs["probabilities"]["datatype"] == "FP32"
    assert outputs["probabilities"]["shape"] == [3, 3]
    assert outputs["label"]["data"] == pyfunc_labels(champion.model_uri)
    assert body["parameters"]["labels"] == "negative,neutral,positive"

    meta = http.get("/v2/models/sentiment").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]} in meta["outputs"]
    assert http.get("/v2/models/sentiment/ready").json()["ready"] is True
    assert http.get("/v2/health/live").status_code == 200


def test_all_protocols_agree(model_server: LocalServer) -> None:
    answers = {
        p: client.predict(TEXTS, p, model_server.http_url, model_server.grpc_target)
        for p in client.Protocol
    }
    labels = {p: [x.label for x in a.predictions] for p, a in answers.items()}
    assert labels[client.Protocol.V1] == labels[client.Protocol.V2] == labels[client.Protocol.GRPC]
    for p in client.Protocol:
        conf = [x.confidence for x in answers[p].predictions]
        assert np.allclose(
            conf, [x.confidence for x in answers[client.Protocol.V1].predictions], atol=1e-6
        )


def test_metrics_endpoint(http: httpx.Client) -> None:
    http.post("/v1/models/sentiment:predict", json={"instances": TEXTS})
    text = http.get("/metrics").text
    for name in (
        "roost_inference_requests_total",
        "roost_inference_seconds_bucket",
        "roost_predictions_total",
        "roost_prediction_confidence_sum",
        "roost_model_info",
        "request_predict_seconds",  # KServe's own
    ):
        assert name in text, name


def test_long_text_is_truncated_not_rejected(http: httpx.Client) -> None:
    r = http.post("/v1/models/sentiment:predict", json={"instances": ["great " * 3400]})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in {
        "negative",
        "neutral",
        "positive",
    }


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "fragment"),
    [
        ("/v1/models/nope:predict", {"json": {"instances": ["x"]}}, 404, "nope"),
        ("/v2/models/nope/infer", {"json": V2_BODY}, 404, "nope"),
        (
            "/v1/models/sentiment:predict",
            {"content": b'{"instances": [', "headers": {"content-type": "application/json"}},
            400,
            "Unrecognized request format",
        ),
        (
            "/v2/models/sentiment/infer",
            {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}},
            400,
            "malformed JSON",
        ),
        (
            "/v1/models/sentiment:predict",
            {"json": {"texts": ["x"]}},
            400,
            "instances: field required",
        ),
        (
            "/v1/models/sentiment:predict",
            {"json": {"instances": "x"}},
            400,
            "instances: expected a list",
        ),
        (
            "/v1/models/sentiment:predict",
            {"json": {"instances": [1]}},
            400,
            "instances[0]: expected a string",
        ),
        (
            "/v1/models/sentiment:predict",
            {"json": {"instances": []}},
            400,
            "instances: must not be empty",
        ),
        (
            "/v2/models/sentiment/infer",
            {"json": {"inputs": [{"name": "text", "shape": [1], "data": ["x"]}]}},
            400,
            "inputs[0].datatype",
        ),
        (
            "/v2/models/sentiment/infer",
            {
                "json": {
                    "inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.5]}]
                }
            },
            400,
            "inputs[0].datatype: expected BYTES, got FP32",
        ),
        (
            "/v2/models/sentiment/infer",
            {
                "json": {
                    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["x"]}]
                }
            },
            400,
            "inputs[0].shape",
        ),
        (
            "/v2/models/sentiment/infer",
            {"json": {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [0], "data": []}]}},
            400,
            "inputs[0].data: must not be empty",
        ),
        ("/v2/models/sentiment/infer", {"json": {"inputs": "text"}}, 400, "inputs"),
        ("/v2/models/sentiment/infer", {"json": {}}, 400, "inputs: Field required"),
        (
            "/v1/models/sentiment:predict",
            {
                "content": b'{"instances": ["\xff\xfe"]}',
                "headers": {"content-type": "application/json"},
            },
            400,
            "UTF-8",
        ),
        (
            "/v2/models/sentiment/infer",
            {
                "content": b'{"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], '
                b'"data": ["\xff"]}]}',
                "headers": {"content-type": "application/json"},
            },
            400,
            "request body",
        ),
        ("/v3/unknown", {"json": {}}, 404, "Not Found"),
    ],
)
def test_bad_requests(
    http: httpx.Client, path: str, kwargs: dict, status: int, fragment: str
) -> None:
    r = http.post(path, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert fragment in r.json()["error"]


def test_body_over_limit_is_413(http: httpx.Client) -> None:
    big = {"instances": ["x" * 1000] * 1100}  # ~1.1 MB > 1 MiB default
    r = http.post("/v1/models/sentiment:predict", json=big)
    assert r.status_code == 413
    assert "larger than the limit of 1048576 bytes" in r.json()["error"]

    def chunks() -> Iterator[bytes]:  # no content-length: counted while streaming
        yield b'{"instances": ['
        for _ in range(1100):
            yield b'"' + b"y" * 1000 + b'",'
        yield b'"z"]}'

    r = http.post(
        "/v1/models/sentiment:predict",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413


def grpc_call(target: str, request):  # type: ignore[no-untyped-def]
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
        return pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=30)


def grpc_request(
    model: str = "sentiment",
    datatype: str = "BYTES",
    texts: list[bytes] | None = None,
    shape: list[int] | None = None,
):  # type: ignore[no-untyped-def]
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    texts = texts if texts is not None else [t.encode() for t in TEXTS]
    contents = (
        pb.InferTensorContents(bytes_contents=texts)
        if datatype == "BYTES"
        else pb.InferTensorContents(fp32_contents=[1.0])
    )
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="text",
                datatype=datatype,
                shape=shape or [len(texts) if datatype == "BYTES" else 1],
                contents=contents,
            )
        ],
    )


@pytest.mark.parametrize(
    ("request_kwargs", "code", "fragment"),
    [
        ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "nope"),
        (
            {"datatype": "FP32"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs[0].datatype: expected BYTES, got FP32",
        ),
        ({"shape": [5]}, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape"),
        ({"texts": []}, grpc.StatusCode.INVALID_ARGUMENT, "must not be empty"),
        ({"texts": [b"\xff\xfe"]}, grpc.StatusCode.INVALID_ARGUMENT, "not valid UTF-8"),
        ({"texts": [b"x" * 1000] * 1100}, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ],
)
def test_grpc_bad_requests(
    model_server: LocalServer, request_kwargs: dict, code: grpc.StatusCode, fragment: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        grpc_call(model_server.grpc_target, grpc_request(**request_kwargs))
    assert info.value.code() == code
    assert fragment in (info.value.details() or "")
    ok = grpc_call(model_server.grpc_target, grpc_request())
    assert [o.name for o in ok.outputs][:2] == ["label", "probabilities"]


def test_kserve_clients_unchanged(model_server: LocalServer, champion) -> None:  # type: ignore[no-untyped-def]
    from kserve import (
        InferenceGRPCClient,
        InferenceRESTClient,
        InferInput,
        InferRequest,
        RESTConfig,
    )

    async def both() -> tuple[list[str], list[str]]:
        tensor = InferInput("text", [3], "BYTES", TEXTS)
        request = InferRequest(model_name="sentiment", infer_inputs=[tensor])
        rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
        try:
            r = await rest.infer(model_server.http_url, request, model_name="sentiment")
        finally:
            await rest.close()
        tensor = InferInput("text", [3], "BYTES", [t.encode() for t in TEXTS])
        async with InferenceGRPCClient(model_server.grpc_target, retries=2) as grpc_client:
            g = await grpc_client.infer(InferRequest(model_name="sentiment", infer_inputs=[tensor]))
        as_str = lambda a: [x.decode() if isinstance(x, bytes) else str(x) for x in a]  # noqa: E731
        return as_str(r.get_output_by_name("label").as_numpy()), as_str(
            g.get_output_by_name("label").as_numpy()
        )

    rest_labels, grpc_labels = asyncio.run(both())
    assert rest_labels == grpc_labels == pyfunc_labels(champion.model_uri)


def test_triton_clients_unchanged(model_server: LocalServer, champion) -> None:  # type: ignore[no-untyped-def]
    probe = Path(__file__).with_name("triton_probe.py")
    result = subprocess.run(
        [sys.executable, str(probe), model_server.http_url.removeprefix("http://"),
         model_server.grpc_target, json.dumps(TEXTS)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    expected = pyfunc_labels(champion.model_uri)
    assert out["http_ready"] and out["grpc_ready"]
    assert out["http_metadata"]["inputs"][0]["datatype"] == "BYTES"
    assert out["http_labels"] == out["grpc_labels"] == expected
    assert out["http_probabilities_shape"] == out["grpc_probabilities_shape"] == [3, 3]
    assert np.allclose(out["grpc_row_sums"], 1, atol=1e-4)
