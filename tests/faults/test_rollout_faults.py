"""A canary rollout (KServe backend) with its metrics or its registry failing: it never promotes
on missing data, and @champion moves only once the registry took the verdict.

The Kubernetes API and Prometheus are the loopback fakes of tests/e2e (a recorded
InferenceService that KServe's reconciling is played on; counters that follow the traffic
split); the fault proxy sits in front of Prometheus and of the real MLflow server.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as kube_client

from roost import proc, registry, tracking
from roost.errors import TrackingUnavailable
from roost.rollout.backends.kserve import KServeBackend
from roost.rollout.controller import Controller
from roost.rollout.state import Phase, RolloutState
from roost.train import TrainOutcome
from tests.conftest import make_settings
from tests.e2e.rollout_fakes import FakeKube, FakePrometheus
from tests.faults.conftest import endpoint
from tests.faults.proxy import FaultProxy, fault_proxy

pytestmark = pytest.mark.faults

ROLLOUT: dict[str, Any] = {
    "mode": "canary",  # these tests drive the canary steps (shadow: test_rollout_shadow.py)
    "steps": [25, 50, 100],
    "window_s": 1.0,
    "check_interval_s": 0.25,
    "min_requests": 20,
    "poll_s": 0.05,
    "prometheus_timeout_s": 1.0,
    "storage_uri": "s3://roost-artifacts/models/{model}/{version}",
}
QUERY = r"^/api/v1/query"
ALIAS = endpoint("/api/2.0/mlflow/registered-models/alias")
EMPTY = json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}}).encode()


@dataclass
class Canary:
    kube: FakeKube
    prometheus: FaultProxy
    mlflow: FaultProxy
    controller: Controller
    registry: registry.Registry  # direct, no proxy: what really is in the registry
    champion: str
    challenger: str

    def state(self) -> RolloutState | None:
        return self.controller.backend.load_state()

    def drive_for(self, seconds: float) -> RolloutState:
        """Tick the controller for ``seconds`` (several analysis windows)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.controller.tick()
            time.sleep(ROLLOUT["poll_s"])
        state = self.state()
        assert state is not None
        return state


@pytest.fixture
def canary(
    state_dir: Path, mlflow_server: tracking.ServerState, small_run: TrainOutcome
) -> Iterator[Canary]:
    name = f"faults-canary-{uuid.uuid4().hex[:8]}"
    kube = FakeKube()
    prom = FakePrometheus(kube, model="sentiment")
    with fault_proxy(prom.url) as prom_proxy, fault_proxy(mlflow_server.uri) as mlflow_proxy:
        settings = make_settings(
            state_dir, mlflow_proxy.url, registry={"model_name": name},
            rollout={**ROLLOUT, "prometheus_url": prom_proxy.url},
            k8s={"namespace": "roost", "inference_service": "sentiment"},
        )  # fmt: skip
        direct = registry.Registry(mlflow_server.uri, name)
        champion = direct.register(small_run.model_uri)
        challenger = direct.register(small_run.model_uri)
        direct.set_alias("champion", champion)
        template = ROLLOUT["storage_uri"]
        uri = template.format(model="sentiment", version=champion)
        kube.base["spec"]["predictor"]["model"]["storageUri"] = uri  # the champion is served
        kube.revisions = {uri: "sentiment-predictor-00003"}
        api = kube_client.ApiClient(kube_client.Configuration(host=kube.server.url))
        backend = KServeBackend(
            settings, api, lambda v: template.format(model="sentiment", version=v), name
        )
        try:
            yield Canary(
                kube, prom_proxy, mlflow_proxy, Controller(settings, backend), direct,
                champion, challenger,
            )  # fmt: skip
        finally:
            api.close()
            prom.close()
            kube.close()


def finish(canary: Canary) -> RolloutState:
    """After the fault clears, the same rollout carries on and promotes."""
    canary.prometheus.restore()
    canary.mlflow.restore()
    final = canary.controller.run(timeout=90)
    assert final.phase is Phase.PROMOTED, final.holding
    assert canary.registry.aliases().get("champion") == canary.challenger
    return final


@pytest.mark.parametrize(
    "fault",
    ["empty-result", "500", "dropped", "slower-than-timeout", "not-json"],
)
def test_metrics_missing_never_promote(canary: Canary, fault: str) -> None:
    canary.controller.start(canary.challenger)

    def first_window() -> RolloutState | None:
        canary.controller.tick()
        state = canary.state()
        return state if state is not None and state.window_started is not None else None

    proc.wait_until(first_window, 30, ROLLOUT["poll_s"], what="the first window")
    if fault == "empty-result":
        canary.prometheus.fail("GET", QUERY, 200, body=EMPTY)
    elif fault == "500":
        canary.prometheus.fail("GET", QUERY, 500)
    elif fault == "dropped":
        canary.prometheus.drop("GET", QUERY)
    elif fault == "slower-than-timeout":
        canary.prometheus.delay("GET", QUERY, 3.0)
    else:
        canary.prometheus.fail("GET", QUERY, 200, body=b"<html>maintenance</html>")

    held = canary.drive_for(4 * ROLLOUT["window_s"])

    assert held.phase is Phase.PROGRESSING and held.weight == 25, held.phase
    assert canary.kube.weights_applied() == [25]  # never advanced on missing data
    assert canary.registry.aliases() == {
        "champion": canary.champion,
        "challenger": canary.challenger,
    }
    assert canary.prometheus.hits("GET", QUERY)

    final = finish(canary)
    assert canary.kube.weights_applied() == [25, 50, 100, None]
    assert final.weight == 100


@pytest.mark.parametrize(
    ("method", "fault"),
    [("POST", "500"), ("GET", "500"), ("POST", "drop")],
    ids=["alias-move-500", "alias-read-500", "alias-move-dropped"],
)
def test_registry_failing_at_promotion_holds_until_it_answers(
    canary: Canary, method: str, fault: str
) -> None:
    canary.controller.start(canary.challenger)
    # After start, the next alias call is the promotion's: fail it from now on.
    if fault == "drop":
        canary.mlflow.drop(method, ALIAS)
    else:
        canary.mlflow.fail(method, ALIAS, 500)

    def promotion_failed() -> bool:
        canary.controller.tick()
        return any(s.outcome != "forwarded" for s in canary.mlflow.hits(method, ALIAS))

    proc.wait_until(promotion_failed, 60, ROLLOUT["poll_s"], what="the promotion to be tried")
    held = canary.drive_for(2 * ROLLOUT["window_s"])

    assert held.phase is Phase.PROMOTING and "promote waits" in (held.holding or ""), (
        held.holding,
        [(e["event"], e.get("reason")) for e in held.history],
        canary.mlflow.hits(method, ALIAS),
    )
    assert canary.registry.aliases().get("champion") == canary.champion
    assert canary.kube.weights_applied() == [25, 50, 100]  # the spec still has the canary field
    final = finish(canary)
    assert canary.kube.weights_applied() == [25, 50, 100, None]
    assert final.recorded == len(final.history)


def test_start_with_the_champion_unreadable_creates_nothing(canary: Canary) -> None:
    canary.mlflow.fail("GET", ALIAS, 500)
    with pytest.raises(TrackingUnavailable, match="champion"):
        canary.controller.start(canary.challenger)
    assert canary.state() is None  # no rollout was created
    assert canary.kube.weights_applied() == []
    canary.mlflow.restore()
    canary.controller.start(canary.challenger)
    finish(canary)
