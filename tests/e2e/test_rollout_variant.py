"""A/B pinning by header through the local backend: real nginx, two real `roost serve` processes.

Two registered versions of the same model (a champion and a copy as challenger) run behind the
backend's nginx; the backend is driven through every weight a rollout steps through (0 before
the first step, then 10/25/50/100) and at each one requests pinned with ``x-roost-variant``
must be answered by the named side, identified by the server's own ``x-roost-model-version``
(REST) or ``model_version`` (gRPC). Then hostile header values, and pins without a challenger.

    .venv/bin/python -m pytest tests/e2e/test_rollout_variant.py -q
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost import registry
from roost.config import Settings
from roost.rollout import engine
from roost.rollout.backends.local import LocalBackend
from roost.rollout.backends.nginx import VARIANT_HEADER
from roost.rollout.state import Plan, RolloutState
from tests.conftest import Champion, make_settings
from tests.e2e.rollout_helpers import load_source, register_copy

pytestmark = pytest.mark.e2e

MODEL = "sentiment-ab"
WEIGHTS = (0, 10, 25, 50, 100)  # 0: the rollout prepared, before its first step
PER_SIDE = 12  # pinned REST requests per side and weight (plus v1 and gRPC ones)
TEXT = "the staff were friendly and the room was spotless"
VERSION_HEADER = "x-roost-model-version"


@dataclass
class Pinning:
    settings: Settings
    backend: LocalBackend
    state: RolloutState
    champion: str
    challenger: str

    @property
    def url(self) -> str:
        endpoint = self.backend.endpoint()
        assert endpoint is not None
        return endpoint

    @property
    def grpc_target(self) -> str:
        target = self.backend.grpc_endpoint()
        assert target is not None
        return target

    @property
    def served(self) -> str:
        return self.settings.serving.model_name

    def rest(self, headers: Any = None, v1: bool = False) -> httpx.Response:
        if v1:
            path, body = f"/v1/models/{self.served}:predict", {"instances": [TEXT]}
        else:
            path = f"/v2/models/{self.served}/infer"
            body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                "data": [TEXT]}]}  # fmt: skip
        return httpx.post(self.url + path, json=body, headers=headers, timeout=30)

    def grpc(self, metadata: tuple[tuple[str, str], ...]) -> tuple[str, str, str]:
        """(gRPC status name, details, model_version) of one ModelInfer call."""
        import grpc
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

        request = pb.ModelInferRequest(
            model_name=self.served,
            inputs=[pb.ModelInferRequest.InferInputTensor(
                name="text", datatype="BYTES", shape=[1],
                contents=pb.InferTensorContents(bytes_contents=[TEXT.encode()]),
            )],
        )  # fmt: skip
        with grpc.insecure_channel(self.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            try:
                response = stub.ModelInfer(request, timeout=30, metadata=metadata)
            except grpc.RpcError as exc:
                return exc.code().name, exc.details() or "", ""
        return "OK", "", response.model_version


@pytest.fixture(scope="module")
def pinning(state_dir: Path, settings: Settings, champion: Champion) -> Iterator[Pinning]:
    assert settings.tracking.uri is not None
    ab_settings = make_settings(state_dir, settings.tracking.uri, registry={"model_name": MODEL})
    source = load_source(ab_settings, champion.model_uri, champion.outcome.run_id)
    reg = registry.Registry(settings.tracking.uri, MODEL)
    first, second = register_copy(ab_settings, source), register_copy(ab_settings, source)
    reg.set_alias("champion", first)
    backend = LocalBackend(ab_settings, settings.tracking.uri)
    plan = Plan(steps=WEIGHTS[1:])
    state = engine.start(plan, MODEL, second, first, "local", time.time(), "ab-1")
    try:
        backend.prepare(state)  # both servers ready, nginx at weight 0
        yield Pinning(ab_settings, backend, state, first, second)
    finally:
        backend.shutdown()


def pinned_versions(pinning: Pinning, value: str) -> Counter[str]:
    """Who answered PER_SIDE REST v2 + 3 REST v1 + 3 gRPC requests pinned with ``value``."""
    served: Counter[str] = Counter()
    for i in range(PER_SIDE + 3):
        response = pinning.rest({VARIANT_HEADER: value}, v1=i >= PER_SIDE)
        assert response.status_code == 200, response.text
        served[f"rest:{response.headers.get(VERSION_HEADER)}"] += 1
    for _ in range(3):
        code, details, version = pinning.grpc(((VARIANT_HEADER, value),))
        assert code == "OK", details
        served[f"grpc:{version}"] += 1
    return served


def test_a_pinned_request_reaches_the_named_side_at_every_weight(pinning: Pinning) -> None:
    champion, challenger = pinning.champion, pinning.challenger
    seen: dict[int, dict[str, Any]] = {}
    for weight in WEIGHTS:
        if weight:
            pinning.backend.set_weight(pinning.state, weight)
        live = pinning.backend.live()
        assert live is not None and live["weight"] == weight, live
        assert live["variants"] == {"champion": champion, "challenger": challenger}
        for value, version in (("champion", champion), ("challenger", challenger)):
            served = pinned_versions(pinning, value)
            assert served == {f"rest:{version}": PER_SIDE + 3, f"grpc:{version}": 3}, (
                weight, value, served,
            )  # fmt: skip
        unpinned = Counter(
            pinning.rest().headers.get(VERSION_HEADER) for _ in range(PER_SIDE)
        )  # the weighted split still decides for everyone else
        if weight == 0:
            assert unpinned == {champion: PER_SIDE}
        if weight == 100:
            assert unpinned == {challenger: PER_SIDE}
        seen[weight] = dict(unpinned)
    assert [e["weight"] for e in pinning.backend.applied(pinning.state.id)] == list(WEIGHTS[1:])
    print(f"\nunpinned answers per weight (champion v{champion}, challenger v{challenger}): "
          f"{json.dumps(seen)}")  # fmt: skip


ACCEPTED = {
    "Challenger": "challenger",
    "CHAMPION": "champion",
    "  challenger  ": "challenger",  # HTTP strips surrounding whitespace from header values
    "": None,  # empty = no header: the weighted split
}
REFUSED = [
    "bogus",
    "champion,challenger",
    "champion challenger",
    "challenger;q=1",
    "challengers",
    "prev",
    "latest",
    "../../etc/passwd",
    "' or 1=1 --",
    '"}; return 200 "x',
    "$roost_route",
    "challenger%00",
    "x" * 4000,
]


def test_hostile_header_values(pinning: Pinning) -> None:
    pinning.backend.set_weight(pinning.state, 50)
    versions = {"champion": pinning.champion, "challenger": pinning.challenger}
    for value, side in ACCEPTED.items():
        for _ in range(6):
            response = pinning.rest({VARIANT_HEADER: value})
            assert response.status_code == 200, (value, response.text)
            if side is not None:
                assert response.headers[VERSION_HEADER] == versions[side], value
    for value in [*REFUSED, "chámpion".encode()]:
        response = pinning.rest([(VARIANT_HEADER.encode(), value.encode()
                                  if isinstance(value, str) else value)])  # fmt: skip
        assert response.status_code == 400, (value, response.status_code, response.text[:200])
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error.startswith(f"{VARIANT_HEADER}: unknown value"), error
        assert VERSION_HEADER not in response.headers  # refused at the proxy, no server saw it
        assert "x-roost-route" not in response.headers
        code, details, _ = pinning.grpc(((VARIANT_HEADER, value if isinstance(value, str)
                                          else "bad"),))  # fmt: skip
        assert code == "INVALID_ARGUMENT" and details.startswith(VARIANT_HEADER), (value, code)
    # Two headers: nginx 1.22 (Debian bookworm) reads the first, newer ones join them with
    # ", " (then: refused, like "champion,challenger" above). Never the second one alone.
    both = pinning.rest([(VARIANT_HEADER, "champion"), (VARIANT_HEADER, "challenger")])
    assert (both.status_code, both.headers.get(VERSION_HEADER)) in {
        (200, pinning.champion), (400, None),
    }, both.text  # fmt: skip


def test_without_a_challenger_a_challenger_pin_is_refused(pinning: Pinning) -> None:
    pinning.backend.set_weight(pinning.state, 0)
    pinning.backend.retire(pinning.state)  # what a rollback ends with: no challenger server
    live = pinning.backend.live()
    assert live is not None and live["variants"] == {"champion": pinning.champion,
                                                     "challenger": None}  # fmt: skip
    refused = pinning.rest({VARIANT_HEADER: "challenger"})
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error.startswith(f"{VARIANT_HEADER}: challenger:") and f"v{pinning.champion}" in error
    code, details, _ = pinning.grpc(((VARIANT_HEADER, "challenger"),))
    assert code == "FAILED_PRECONDITION" and "no challenger" in details
    assert pinned_versions(pinning, "champion") == {
        f"rest:{pinning.champion}": PER_SIDE + 3, f"grpc:{pinning.champion}": 3,
    }  # fmt: skip
    assert pinning.rest({VARIANT_HEADER: "nope"}).status_code == 400
