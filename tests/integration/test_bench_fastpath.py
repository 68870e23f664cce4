"""The serving fast path answers exactly as KServe's full path does.

Two real servers for the champion: the shared one (fast path on, the default) and one with
``ROOST_SERVING__FAST_PATH=false``. Every request shape and every bad request must get the
same status, headers and body from both.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from roost import proc
from roost.config import Settings
from roost.serving.local import LocalServer
from tests.conftest import serve_champion

pytestmark = pytest.mark.integration

TEXTS = ["I love this airline!", "Worst delay ever, thanks @united", "ok http://t.co/x"]


@pytest.fixture(scope="module")
def slow_server(settings: Settings, champion: Any, state_dir: Path) -> Iterator[LocalServer]:
    log = state_dir / "logs" / "model-server-full-path.log"
    yield from serve_champion(settings, log, env={"ROOST_SERVING__FAST_PATH": "false"})


def v2(data: Any, shape: list[int], **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape, "data": data}],
            **extra}  # fmt: skip


REQUESTS: list[tuple[str, dict[str, Any] | bytes]] = [
    ("/v2/models/sentiment/infer", v2(TEXTS[:1], [1])),
    ("/v2/models/sentiment/infer", v2(TEXTS, [3], id="req-9")),
    ("/v2/models/sentiment/infer", v2([[t] for t in TEXTS], [3, 1])),
    ("/v2/models/sentiment/infer", v2(TEXTS, [3], outputs=[{"name": "label"}])),
    ("/v2/models/sentiment/infer", v2(TEXTS, [3], parameters={"custom": 1})),
    ("/v1/models/sentiment:predict", {"instances": [TEXTS[0], {"text": TEXTS[1]}]}),
    # bad requests: the fast path must leave them to KServe's path, errors unchanged
    ("/v2/models/sentiment/infer", v2([1.5], [1])),
    ("/v2/models/sentiment/infer", v2(["x"], [2])),
    ("/v2/models/sentiment/infer", v2([], [0])),
    ("/v2/models/sentiment/infer", {"inputs": "text"}),
    ("/v2/models/sentiment/infer", b'{"inputs": ['),
    ("/v1/models/sentiment:predict", {"instances": []}),
    ("/v1/models/sentiment:predict", {"instances": [1]}),
    ("/v1/models/sentiment:predict", b'{"instances": ["\xff\xfe"]}'),
]


def post(url: str, path: str, body: dict[str, Any] | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(
            url + path, content=body, headers={"content-type": "application/json"}, timeout=30
        )
    return httpx.post(url + path, json=body, timeout=30)


def same_json(a: Any, b: Any) -> bool:
    """Equal, floats to 1e-6 (torch may round a text differently in another batch)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-6
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.mark.parametrize(("path", "body"), REQUESTS)
def test_rest_answers_match_kserves_path(
    model_server: LocalServer, slow_server: LocalServer, path: str, body: Any
) -> None:
    fast = post(model_server.http_url, path, body)
    full = post(slow_server.http_url, path, body)
    assert fast.status_code == full.status_code, (fast.text, full.text)
    for header in ("content-type", "x-roost-model-version", "x-roost-model-alias"):
        assert fast.headers.get(header) == full.headers.get(header), header
    assert same_json(fast.json(), full.json()), (fast.text, full.text)


def grpc_infer(target: str, request: pb.ModelInferRequest) -> dict[str, Any] | str:
    with grpc.insecure_channel(target) as channel:
        try:
            response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return MessageToDict(response)


@pytest.mark.parametrize("texts", [[TEXTS[0].encode()], [t.encode() for t in TEXTS], [b"\xff"], []])
def test_grpc_answers_match_kserves_path(
    model_server: LocalServer, slow_server: LocalServer, texts: list[bytes]
) -> None:
    request = pb.ModelInferRequest(
        model_name="sentiment",
        id="g-1",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="text", datatype="BYTES", shape=[len(texts)],
                contents=pb.InferTensorContents(bytes_contents=texts),
            )
        ],
    )  # fmt: skip
    fast = grpc_infer(model_server.grpc_target, request)
    full = grpc_infer(slow_server.grpc_target, request)
    assert same_json(fast, full), (fast, full)


def test_concurrent_requests_get_their_own_answers(model_server: LocalServer) -> None:
    texts = [f"{t} #{i}" for i in range(40) for t in TEXTS]
    alone = [
        post(model_server.http_url, "/v2/models/sentiment/infer", v2([t], [1])).json()
        for t in texts[:12]
    ]

    async def together() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=model_server.http_url, timeout=30) as client:
            responses = await asyncio.gather(
                *(client.post("/v2/models/sentiment/infer", json=v2([t], [1])) for t in texts)
            )
        return [r.json() for r in responses]

    merged = asyncio.run(together())
    for one, batched in zip(alone, merged, strict=False):
        assert same_json(one["outputs"][0], batched["outputs"][0])
        probs = (one["outputs"][1]["data"], batched["outputs"][1]["data"])
        assert np.allclose(*probs, atol=1e-5)


def test_fast_path_requests_are_counted(model_server: LocalServer) -> None:
    pattern = re.compile(
        r'^roost_inference_requests_total\{[^}]*outcome="ok"[^}]*protocol="rest-v2"[^}]*\} '
        r"([0-9.e+]+)$|^roost_inference_requests_total\{[^}]*protocol=\"rest-v2\"[^}]*"
        r'outcome="ok"[^}]*\} ([0-9.e+]+)$',
        re.M,
    )

    def count() -> float:
        text = httpx.get(model_server.http_url + "/metrics", timeout=10).text
        return sum(float(a or b) for a, b in pattern.findall(text))

    before = count()
    for _ in range(5):
        post(model_server.http_url, "/v2/models/sentiment/infer", v2(TEXTS[:1], [1]))
    proc.wait_until(lambda: count() >= before + 5, timeout=10, what="metrics flushed")
    metrics = httpx.get(model_server.http_url + "/metrics", timeout=10).text
    assert "request_predict_seconds_count" in metrics
    assert "roost_prediction_confidence_count" in metrics
