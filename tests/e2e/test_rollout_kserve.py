"""The same engine through the KServe backend, against recorded API responses on loopback.

A fake API server (``rollout_fakes.FakeKube``) replays the recorded InferenceService and applies
the controller's server-side-apply patches; a fake Prometheus serves counters that follow
KServe's traffic split. The registry is the real MLflow server of the session.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as kube_client

from roost import proc, registry
from roost.config import Settings
from roost.errors import Conflict, TrackingUnavailable
from roost.rollout import engine
from roost.rollout.backends.kserve import KServeBackend
from roost.rollout.controller import Controller
from roost.rollout.record import Recorder
from roost.rollout.state import Phase, Plan, RolloutState
from roost.rollout.store import STATE_ANNOTATION
from tests.conftest import Champion, make_settings
from tests.e2e.rollout_fakes import Behaviour, FakeKube, FakePrometheus
from tests.e2e.rollout_helpers import Source, load_source, register_copy

pytestmark = pytest.mark.e2e

MODEL = "sentiment-kserve"
ROLLOUT: dict[str, Any] = {
    "mode": "canary",  # these tests drive the canary steps (shadow: test_rollout_shadow.py)
    "steps": [25, 50, 100],
    "window_s": 1.5,
    "check_interval_s": 0.3,
    "min_requests": 20,
    "poll_s": 0.1,
    "storage_uri": "s3://roost-artifacts/models/{model}/{version}",
}


@dataclass
class Cluster:
    settings: Settings
    kube: FakeKube
    prometheus: FakePrometheus
    backend: KServeBackend
    registry: registry.Registry
    source: Source

    def controller(self, **kwargs: Any) -> Controller:
        return Controller(self.settings, self.backend, **kwargs)

    def state(self) -> RolloutState | None:
        return self.backend.load_state()


@pytest.fixture(scope="module")
def source(state_dir: Path, settings: Settings, champion: Champion) -> Source:
    return load_source(settings, champion.model_uri, champion.outcome.run_id)


@pytest.fixture
def cluster(state_dir: Path, settings: Settings, source: Source) -> Iterator[Cluster]:
    assert settings.tracking.uri is not None
    kube = FakeKube()
    prometheus = FakePrometheus(kube, model="sentiment")
    rollout_settings = make_settings(
        state_dir, settings.tracking.uri, registry={"model_name": MODEL},
        rollout={**ROLLOUT, "prometheus_url": prometheus.url},
        k8s={"namespace": "roost", "inference_service": "sentiment"},
    )  # fmt: skip
    configuration = kube_client.Configuration(host=kube.server.url)
    api = kube_client.ApiClient(configuration)
    template = ROLLOUT["storage_uri"]
    backend = KServeBackend(
        rollout_settings, api, lambda v: template.format(model="sentiment", version=v), MODEL
    )
    reg = registry.Registry(settings.tracking.uri, MODEL)
    # The recorded InferenceService serves s3://.../sentiment/1: make v1 of MODEL that champion.
    if reg.version_for_alias("champion") is None:
        reg.set_alias("champion", register_copy(rollout_settings, source))
    try:
        yield Cluster(rollout_settings, kube, prometheus, backend, reg, source)
    finally:
        api.close()
        prometheus.close()
        kube.close()


def _champion_is_v(cluster: Cluster, version: str) -> None:
    """Point the recorded object's storage URI at the registry champion's version."""
    uri = ROLLOUT["storage_uri"].format(model="sentiment", version=version)
    cluster.kube.base["spec"]["predictor"]["model"]["storageUri"] = uri
    cluster.kube.revisions = {uri: "sentiment-predictor-00003"}


def _serving(cluster: Cluster) -> RolloutState | None:
    state = cluster.state()
    return state if state is not None and state.window_started is not None else None


def _holding(cluster: Cluster, cause: str) -> RolloutState | None:
    state = cluster.state()
    return state if state is not None and cause in (state.holding or "") else None


def test_kserve_rollout_promotes_with_ssa_patches_and_annotation_state(cluster: Cluster) -> None:
    champion = cluster.registry.require_alias("champion")
    _champion_is_v(cluster, champion)
    version = register_copy(cluster.settings, cluster.source)
    events: list[str] = []
    controller = cluster.controller(on_event=lambda s, e: events.append(e["event"]))

    state = controller.start(version)
    # A concurrent writer changes the object between our read and our apply: 409, retried.
    cluster.kube.faults.append(("roost-rollout-state", 409, "status-409-conflict.json"))
    outcome: dict[str, RolloutState] = {}
    runner = threading.Thread(target=lambda: outcome.update(final=controller.run(timeout=60)))
    runner.start()
    try:
        # Prometheus goes away in the first window: the weight is held, never advanced.
        first = proc.wait_until(lambda: _serving(cluster), 30, 0.02, what="the first window")
        cluster.prometheus.down()
        proc.wait_until(lambda: _holding(cluster, "metrics unavailable"), 30, 0.02)
        long_after = (first.window_started or 0) + 2 * first.plan.window_s
        proc.wait_until(lambda: time.time() > long_after, 30, 0.05, what="two windows")
        held = cluster.state()
        assert held is not None and held.weight == 25 and held.pending is None
        assert cluster.kube.weights_applied() == [25]
    finally:
        cluster.prometheus.up()
        runner.join(timeout=90)
    final = outcome["final"]

    assert final.phase is Phase.PROMOTED and final.id == state.id
    assert cluster.kube.weights_applied() == [25, 50, 100, None]  # each once, then no canary field
    obj = cluster.backend.get()
    assert "canaryTrafficPercent" not in obj["spec"]["predictor"]  # the manager dropped it
    model = obj["spec"]["predictor"]["model"]
    assert model["storageUri"].endswith(f"/sentiment/{version}")
    assert {"name": "ROOST_SERVING__MODEL_VERSION", "value": version} in model["env"]
    assert model["resources"]["requests"]["cpu"] == "500m"  # the deployer's fields survive
    stored = json.loads(cluster.kube.annotations()[STATE_ANNOTATION])
    assert stored["phase"] == "promoted" and stored["id"] == state.id
    # Tag routing (prev/latest, for Knative-Serving-Tag pins) rides along with every weight.
    assert cluster.kube.annotations()["serving.kserve.io/enable-tag-routing"] == "true"
    assert any(p.status == 409 for p in cluster.kube.patches)
    assert "hold" in events
    hold = next(e for e in final.history if e["event"] == "hold")
    assert "metrics unavailable" in hold["reason"] and hold["weight"] == 25
    assert cluster.registry.aliases().get("champion") == version
    assert cluster.registry.get_version(version).tags["roost.rollout"] == "promoted"


def test_kserve_rollback_sets_zero_then_restores_the_champion(cluster: Cluster) -> None:
    champion = cluster.registry.require_alias("champion")
    _champion_is_v(cluster, champion)
    version = register_copy(cluster.settings, cluster.source)  # same weights, served badly:
    cluster.prometheus.behaviour[version] = Behaviour(error_rate=0.2)
    controller = cluster.controller()
    controller.start(version)
    final = controller.run(timeout=60)

    assert final.phase is Phase.ROLLED_BACK
    assert final.failure is not None and final.failure["metric"] == "error_rate"
    assert cluster.kube.weights_applied() == [25, 0, None]
    obj = cluster.backend.get()
    assert obj["spec"]["predictor"]["model"]["storageUri"].endswith(f"/sentiment/{champion}")
    assert "canaryTrafficPercent" not in obj["spec"]["predictor"]
    assert cluster.kube.split() == {champion: 100}
    aliases = cluster.registry.aliases()
    assert aliases.get("champion") == champion and "challenger" not in aliases
    assert cluster.registry.get_version(version).tags["roost.rollout.failed_metric"] == "error_rate"


def test_registry_unreachable_holds_the_weight(cluster: Cluster, settings: Settings) -> None:
    champion = cluster.registry.require_alias("champion")
    _champion_is_v(cluster, champion)
    version = register_copy(cluster.settings, cluster.source)
    controller = cluster.controller()
    controller.start(version)
    dead = make_settings(
        cluster.settings.state_dir, f"http://127.0.0.1:{proc.free_port()}",
        registry={"model_name": MODEL}, rollout=ROLLOUT,
    )  # fmt: skip
    working = controller.recorder
    controller.recorder = Recorder(dead, MODEL)
    with pytest.raises(TrackingUnavailable):
        controller.recorder.registry()

    def registry_hold() -> RolloutState | None:
        controller.tick()
        return _holding(cluster, "registry unreachable")

    held = proc.wait_until(registry_hold, 30, 0.1, what="a registry hold")
    assert held.weight == 25 and held.pending is None  # the window passed but nothing moved
    for _ in range(10):
        controller.tick()
    assert cluster.kube.weights_applied() == [25]
    controller.recorder = working
    final = controller.run(timeout=60)
    assert final.phase is Phase.PROMOTED
    assert cluster.kube.weights_applied() == [25, 50, 100, None]


def test_pause_resume_and_promote_from_another_process(cluster: Cluster) -> None:
    champion = cluster.registry.require_alias("champion")
    _champion_is_v(cluster, champion)
    version = register_copy(cluster.settings, cluster.source)
    driver = cluster.controller()
    driver.start(version)
    outcome: dict[str, RolloutState] = {}
    runner = threading.Thread(target=lambda: outcome.update(final=driver.run(timeout=60)))
    runner.start()
    operator = cluster.controller()  # another owner: it may only leave commands
    try:
        proc.wait_until(lambda: _serving(cluster), 30, 0.02, what="the first window")
        paused = operator.request("pause", by="ops", wait_s=20)
        assert paused.phase is Phase.PAUSED and paused.weight == 25
        long_after = time.time() + 2 * paused.plan.window_s
        proc.wait_until(lambda: time.time() > long_after, 30, 0.05, what="two windows")
        still = cluster.state()
        assert still is not None and still.phase is Phase.PAUSED and still.weight == 25
        resumed = operator.request("resume", by="ops", wait_s=20)
        assert resumed.phase is Phase.PROGRESSING
        promoted = operator.request("promote", by="ops", wait_s=20)
        assert promoted.phase is Phase.PROMOTED
    finally:
        runner.join(timeout=90)
    final = outcome["final"]
    assert final.phase is Phase.PROMOTED
    assert [e["event"] for e in final.history if e["event"] in ("pause", "resume", "promote")] == [
        "pause", "resume", "promote",
    ]  # fmt: skip
    assert cluster.kube.weights_applied() == [
        25,
        None,
    ]  # promoted from 25 %, no steps skipped twice
    assert cluster.registry.aliases().get("champion") == version
    assert "promoted by ops" in cluster.registry.get_version(version).tags["roost.rollout.reason"]


class Crash(BaseException):
    """The process dies here (nothing after this line runs, nothing is cleaned up)."""


class CrashAfterApplying(KServeBackend):
    """The real backend, dying right after its ``n``-th weight reached the API server."""

    n = 2

    def set_weight(self, state: RolloutState, weight: int) -> None:
        super().set_weight(state, weight)
        self.n -= 1
        if self.n == 0:
            raise Crash


def _dead_owner() -> str:
    import socket
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:gone"


def test_a_crash_between_apply_and_commit_does_not_apply_the_weight_twice(
    cluster: Cluster,
) -> None:
    champion = cluster.registry.require_alias("champion")
    _champion_is_v(cluster, champion)
    version = register_copy(cluster.settings, cluster.source)
    b = cluster.backend
    crashing = CrashAfterApplying(b.settings, b.api, b.storage_uri, MODEL)
    first = Controller(cluster.settings, crashing, owner=_dead_owner())
    first.start(version)
    with pytest.raises(Crash):
        proc.wait_until(lambda: first.tick() and None, 60, 0.05, what="the crash")
    crashed = cluster.state()
    assert crashed is not None and crashed.weight == 25
    assert crashed.pending is not None and crashed.pending.weight == 50  # written, not committed
    assert cluster.kube.weights_applied() == [25, 50]  # ...but the API server already has it

    final = cluster.controller().run(timeout=60)  # a new driver (the old pid is gone)
    assert final.phase is Phase.PROMOTED
    assert cluster.kube.weights_applied() == [25, 50, 100, None]  # 50 was not applied again
    assert [a["weight"] for a in final.applied] == [25, 50, 100]


def test_a_second_rollout_is_refused_while_one_is_in_flight(cluster: Cluster) -> None:
    champion = cluster.registry.require_alias("champion")
    _champion_is_v(cluster, champion)
    plan = Plan.from_settings(cluster.settings.rollout)
    outcomes: list[str] = []

    def create(n: int) -> None:
        state = engine.start(plan, MODEL, "9", champion, "kserve", 0.0, f"r{n}")
        try:
            cluster.backend.create_state(state)
            outcomes.append("created")
        except Conflict as exc:
            assert "already in flight" in str(exc)
            outcomes.append("refused")

    threads = [threading.Thread(target=create, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["created", "refused"]


def test_metrics_straight_from_the_predictor_pods(cluster: Cluster) -> None:
    """No Prometheus: list the predictor pods, scrape each running one's /metrics."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    exposition = CollectorRegistry()
    counter = Counter("roost_inference_requests", "", ["model", "version", "protocol", "outcome"],
                      registry=exposition)  # fmt: skip
    counter.labels("sentiment", "1", "v2", "ok").inc(7)
    body = generate_latest(exposition)

    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = make_settings(
            cluster.settings.state_dir, cluster.settings.tracking.uri,
            registry={"model_name": MODEL}, rollout={"metrics_port": server.server_address[1]},
        )  # fmt: skip
        backend = KServeBackend(settings, cluster.backend.api, cluster.backend.storage_uri, MODEL)
        state = engine.start(Plan(), MODEL, "2", "1", "kserve", 0.0, "r")
        snapshot = backend.scrape(state)
        running = "sentiment-predictor-00003-deployment-6d5f9c7b8-x2k4p"
        assert set(snapshot) == {f"{running}|1"}  # the Pending pod is skipped
        assert snapshot[f"{running}|1"].ok == 7
    finally:
        server.shutdown()
        server.server_close()
