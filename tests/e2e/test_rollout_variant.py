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
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost import client, proc, registry
from roost.config import Settings
from roost.rollout import engine
from roost.rollout import variant as pin
from roost.rollout.backends.local import LocalBackend
from roost.rollout.state import Plan, RolloutState
from roost.rollout.variant import VARIANT_HEADER
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

    def rest(self, headers: Any = None, v1: bool = False, text: str = TEXT) -> httpx.Response:
        if v1:
            path, body = f"/v1/models/{self.served}:predict", {"instances": [text]}
        else:
            path = f"/v2/models/{self.served}/infer"
            body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                "data": [text]}]}  # fmt: skip
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
        # nginx applies a reload asynchronously (new workers, then the old ones retire)
        live = proc.wait_until(
            lambda w=weight: (now := pinning.backend.live()) and now["weight"] == w and now,
            60, 0.1, what=f"nginx to serve weight {weight}",
            describe=lambda: str(pinning.backend.live()),
        )  # fmt: skip
        assert live["variants"] == {"champion": champion, "challenger": challenger}
        for value, version in (("champion", champion), ("challenger", challenger)):
            served = pinned_versions(pinning, value)
            assert served == {f"rest:{version}": PER_SIDE + 3, f"grpc:{version}": 3}, (
                weight, value, served,
            )  # fmt: skip
        for value, version in (("champion", champion), ("challenger", challenger)):
            for protocol in (client.Protocol.V2, client.Protocol.GRPC):  # roost's own client
                result = client.predict(
                    [TEXT], protocol, pinning.url, pinning.grpc_target, pinning.served,
                    headers=pin.headers(value),
                )  # fmt: skip
                assert result.model_version == version, (weight, value, protocol)
        unpinned = Counter(
            pinning.rest().headers.get(VERSION_HEADER) for _ in range(PER_SIDE)
        )  # the weighted split still decides for everyone else
        if weight == 0:
            assert unpinned == {champion: PER_SIDE}
        if weight == 100:
            assert unpinned == {challenger: PER_SIDE}
        seen[weight] = dict(unpinned)
    assert [e["weight"] for e in pinning.backend.applied(pinning.state.id)] == list(WEIGHTS[1:])
    # The CLI: `roost predict --variant` at 100 %, where only a pin reaches the champion.
    for value, version in (("champion", champion), ("challenger", challenger)):
        argv = [sys.executable, "-m", "roost", "predict", TEXT, "--url", pinning.url,
                "--model", pinning.served, "--variant", value, "--json"]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout)["model_version"] == version, value
    print(f"\nunpinned answers per weight (champion v{champion}, challenger v{challenger}): "
          f"{json.dumps(seen)}")  # fmt: skip


@dataclass(frozen=True)
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_post(pinning: Pinning, header_lines: list[bytes]) -> Raw:
    """A REST v2 request written byte for byte on a socket: the header values reach nginx
    exactly as given (an HTTP client library would refuse or normalise the odd ones)."""
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                   "data": [TEXT]}]}).encode()  # fmt: skip
    port = int(pinning.url.rsplit(":", 1)[1])
    head = [
        f"POST /v2/models/{pinning.served}/infer HTTP/1.1".encode(),
        b"Host: 127.0.0.1",
        b"Content-Type: application/json",
        f"Content-Length: {len(body)}".encode(),
        b"Connection: close",
        *header_lines,
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":  # one chunk is enough for these bodies
        size, _, rest = payload.partition(b"\r\n")
        payload = rest[: int(size, 16)]
    return Raw(int(lines[0].split()[1]), headers, payload)


def pin_line(value: bytes) -> list[bytes]:
    return [VARIANT_HEADER.encode() + b":" + value]


ACCEPTED = {
    b"Challenger": "challenger",
    b"CHAMPION": "champion",
    b"cHaLlEnGeR": "challenger",
    b"   challenger   ": "challenger",  # whitespace around a value is not part of it (RFC 9110)
    b"\tchampion": "champion",
    b" \tChampion\t ": "champion",
    b"": None,  # empty: the same as no header, the weighted split
}
REFUSED = [
    b"bogus",
    b"champion,challenger",
    b"champion challenger",
    b"challenger;q=1",
    b"challengers",
    b"xchampion",
    b"prev",
    b"latest",
    b"../../etc/passwd",
    b"' or 1=1 --",
    b'"}; return 200 "x',
    b"$roost_route",
    b"roost_challenger",
    b"challenger%00",
    b"ch\xc3\xa1mpion",  # UTF-8
    b"\xff\xfechampion",  # not UTF-8 at all
    b"x" * 4000,
]


def test_hostile_header_values(pinning: Pinning) -> None:
    pinning.backend.set_weight(pinning.state, 50)
    versions = {"champion": pinning.champion, "challenger": pinning.challenger}
    for value, side in ACCEPTED.items():
        for _ in range(6):
            answer = raw_post(pinning, pin_line(value))
            assert answer.status == 200, (value, answer.status, answer.body[:200])
            if side is not None:
                assert answer.headers[VERSION_HEADER] == versions[side], value
    for value in REFUSED:
        answer = raw_post(pinning, pin_line(value))
        assert answer.status == 400, (value, answer.status, answer.body[:200])
        assert answer.headers["content-type"] == "application/json"
        error = json.loads(answer.body)["error"]
        assert error.startswith(f"{VARIANT_HEADER}: unknown value"), error
        assert VERSION_HEADER not in answer.headers  # refused at the proxy: no server saw it
        assert "x-roost-route" not in answer.headers
        if all(0x20 <= b < 0x7F for b in value):  # what gRPC metadata can carry
            code, details, _ = pinning.grpc(((VARIANT_HEADER, value.decode()),))
            assert code == "INVALID_ARGUMENT" and details.startswith(VARIANT_HEADER), value
    # Two headers: nginx 1.22 (Debian bookworm) reads the first, newer ones join them with
    # ", " (then: refused, like "champion,challenger" above). Never the second one alone.
    both = raw_post(pinning, pin_line(b"champion") + pin_line(b"challenger"))
    assert (both.status, both.headers.get(VERSION_HEADER)) in {
        (200, pinning.champion), (400, None),
    }, both  # fmt: skip
    print(f"\ntwo x-roost-variant headers: HTTP {both.status}, "
          f"answered by {both.headers.get(VERSION_HEADER)}")  # fmt: skip


def test_without_a_challenger_a_challenger_pin_is_refused(pinning: Pinning) -> None:
    pinning.backend.set_weight(pinning.state, 0)
    pinning.backend.retire(pinning.state)  # what a rollback ends with: no challenger server
    alone = {"champion": pinning.champion, "challenger": None}
    proc.wait_until(  # nginx applies the reload asynchronously
        lambda: (now := pinning.backend.live()) and now["variants"] == alone, 60, 0.1,
        what="nginx to serve the champion alone", describe=lambda: str(pinning.backend.live()),
    )  # fmt: skip
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


def test_pins_hold_while_the_controller_steps_a_real_rollout(
    pinning: Pinning, settings: Settings, state_dir: Path, champion: Champion
) -> None:
    """`roost rollout start` (a real controller process, with its own generated traffic) steps
    a new challenger through 10/25/50/100 % while pinned requests run beside it: at every
    weight each pin is answered by its side, and none fails."""
    source = load_source(pinning.settings, champion.model_uri, champion.outcome.run_id)
    version = register_copy(pinning.settings, source)
    current = registry.Registry(str(settings.tracking.uri), MODEL).require_alias("champion")
    expected = {"champion": current, "challenger": version}
    # Pinned requests count in each side's metrics like any other, and this client sends both
    # sides the same share whatever the weight: with one repeated text it skewed the
    # challenger's label mix enough to fail the JS check (a real effect, in docs/rollout.md).
    # The client cycles the test texts instead; the JS bound is loosened as this test checks
    # routing, not the analysis.
    rollout = {"steps": [10, 25, 50, 100], "window_s": 3.0, "check_interval_s": 0.5,
               "min_requests": 10, "max_failed_checks": 2, "poll_s": 0.25,
               "max_js_divergence": 0.5}  # fmt: skip
    env = {
        **os.environ,
        "ROOST_STATE_DIR": str(state_dir),
        "MLFLOW_TRACKING_URI": str(settings.tracking.uri),
        "ROOST_REGISTRY__MODEL_NAME": MODEL,
        **{f"ROOST_ROLLOUT__{k.upper()}": json.dumps(v) for k, v in rollout.items()},
    }
    argv = [sys.executable, "-m", "roost", "--log-format", "json", "rollout", "start", MODEL,
            "--version", version, "--mode", "canary",  # pins at every canary weight
            "--traffic-rps", "20", "--json", "--timeout", "240"]  # fmt: skip
    answers: list[tuple[float, float, str, int, str | None]] = []
    stop = threading.Event()

    def pinned_traffic() -> None:
        sides = ("champion", "challenger")
        i = 0
        while not stop.is_set():
            side = sides[i % 2]
            i += 1
            sent = time.time()
            try:
                text = source.texts[i % len(source.texts)]
                response = pinning.rest({VARIANT_HEADER: side}, text=text)
                status, served = response.status_code, response.headers.get(VERSION_HEADER)
            except httpx.HTTPError:
                status, served = 0, None
            answers.append((sent, time.time(), side, status, served))
            stop.wait(0.05)  # the pace of this client (about 15 requests/s), not a wait

    worker = threading.Thread(target=pinned_traffic, daemon=True)
    worker.start()
    try:
        result = subprocess.run(argv, env=env, capture_output=True, timeout=300, check=False)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(result.stdout)
    assert document["phase"] == "promoted" and document["version"] == version
    state = pinning.backend.load_state()
    assert state is not None and state.version == version
    applied = pinning.backend.applied(state.id)
    assert [e["weight"] for e in applied] == rollout["steps"]
    # The last window passed before the promotion rewrote the proxy: the end of the check.
    passed = [e for e in state.history if e["event"] == "window" and e["weight"] == 100]
    assert passed, state.history
    bounds = [float(e["at"]) for e in applied] + [float(passed[-1]["at"])]
    per_weight = {}
    for entry, start, end in zip(applied, bounds, bounds[1:], strict=False):
        inside = [a for a in answers if a[0] >= start and a[1] <= end]
        for side in ("champion", "challenger"):
            mine = [a for a in inside if a[2] == side]
            assert mine, (entry["weight"], side, len(inside))
            assert {(a[3], a[4]) for a in mine} == {(200, expected[side])}, (entry, side, mine)
        per_weight[entry["weight"]] = len(inside)
    print(f"\npinned requests answered by their side per weight: {json.dumps(per_weight)}")
