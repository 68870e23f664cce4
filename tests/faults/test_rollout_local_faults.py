"""A canary rollout through the local backend with its predictors, nginx or MLflow failing.

Real parts only: two ``roost serve`` predictors and Debian's nginx started by the backend,
the session's MLflow server, synthetic REST traffic through nginx. The faults:

- a predictor's ``/metrics`` answering 500, resetting, slower than the scrape's timeout, or
  refusing connections: the fault proxy is put between the controller and the predictor
  (the server record in ``servers.json`` points at the proxy, which forwards the rest);
- a predictor SIGKILLed: the challenger's rolls the rollout back, the champion's is started
  again at once (nginx pointed at it, the weight kept);
- nginx's master SIGKILLed (its worker lives on with the ports), its config test failing (the
  binary is a wrapper that fails ``-t`` while a flag file exists) and its config directory
  unwritable (``nginx.conf.next`` is a directory);
- MLflow answering 500 to the verdict's tags and to the promotion's alias move, through a
  fault proxy in front of the session's server (the predictors load their model directly).

For each: the rollout never advances or promotes on missing data, @champion stays where it
was, the CLI ends with one ``error:`` line and exit 4, and once the fault clears the same
rollout (or, after a rollback, a new start) promotes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost import proc, registry, tracking
from roost.rollout.backends.local import LocalBackend
from roost.rollout.backends.nginx import ServerRecord
from roost.rollout.controller import Controller
from roost.rollout.state import Phase, RolloutState
from roost.rollout.traffic import SAMPLE_TEXTS, Traffic
from roost.rollout.variant import VARIANT_HEADER
from roost.train import TrainOutcome
from tests.conftest import make_settings
from tests.faults.conftest import CliResult, cli_env, endpoint, roost
from tests.faults.proxy import FaultProxy, fault_proxy

pytestmark = pytest.mark.faults

ROLLOUT: dict[str, Any] = {
    "backend": "local",
    "mode": "canary",  # these tests drive the canary steps (shadow: test_rollout_shadow.py)
    "steps": [50, 100],
    "window_s": 2.0,
    "check_interval_s": 0.5,
    "min_requests": 10,
    "max_failed_checks": 2,
    "poll_s": 0.1,
    "lease_s": 3.0,
    "ready_timeout_s": 300.0,  # a hold here never turns into a readiness rollback
}
METRICS = r"^/metrics"
ALIAS = endpoint("/api/2.0/mlflow/registered-models/alias")
SET_TAG = endpoint("/api/2.0/mlflow/model-versions/set-tag")
NGINX_WRAPPER = """#!/bin/sh
# Debian's nginx, except that its config test fails while {flag} exists (an injected fault).
if [ -e '{flag}' ]; then
  for arg in "$@"; do
    if [ "$arg" = "-t" ]; then
      echo "nginx: [emerg] injected fault: the configuration test fails" >&2
      exit 1
    fi
  done
fi
exec {nginx} "$@"
"""


@dataclass
class LocalCanary:
    controller: Controller
    backend: LocalBackend
    mlflow: FaultProxy
    registry: registry.Registry  # direct, no proxy: what really is in the registry
    champion: str
    challenger: str
    env: dict[str, str]
    nginx_flag: Path
    traffic: Traffic | None = None

    def state(self) -> RolloutState:
        state = self.backend.load_state()
        assert state is not None
        return state

    def tick_until(
        self, predicate: Callable[[RolloutState], bool], timeout: float, what: str
    ) -> RolloutState:
        """Tick the controller until ``predicate(state)`` holds."""

        def check() -> RolloutState | None:
            self.controller.tick()
            state = self.state()
            return state if predicate(state) else None

        return proc.wait_until(
            check, timeout, ROLLOUT["poll_s"], what=what,
            describe=lambda: f"{self.state().phase.value} at {self.state().weight}%: "
            f"{self.state().holding}",
        )  # fmt: skip

    def drive_for(self, seconds: float) -> RolloutState:
        """Tick for ``seconds`` (several analysis windows); return the state."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.controller.tick()
            time.sleep(ROLLOUT["poll_s"])
        return self.state()

    def begin(self) -> RolloutState:
        """Start the rollout; return once nginx serves 50% (no traffic yet: no verdict)."""
        self.controller.start(self.challenger)
        return self.tick_until(
            lambda s: s.weight == 50 and s.pending is None and self.backend.live() is not None,
            300, "the first weight",
        )  # fmt: skip

    def send_traffic(self) -> None:
        endpoint = self.backend.endpoint()
        assert endpoint is not None
        served = self.controller.settings.serving.model_name
        self.traffic = Traffic(endpoint, served, SAMPLE_TEXTS, rps=40).start()

    def weights_applied(self) -> list[int]:
        return [e["weight"] for e in self.backend.applied(self.state().id)]

    def aliases(self) -> dict[str, str]:
        return self.registry.aliases()

    def assert_held_at_50(self, state: RolloutState, reason: str) -> None:
        assert state.phase is Phase.PROGRESSING and state.weight == 50, (state.phase, state.weight)
        assert state.holding is not None and reason in state.holding, state.holding
        assert self.weights_applied() == [50]  # never advanced on missing data
        live = self.backend.live()
        assert live is not None and live["weight"] == 50, live
        assert self.aliases() == {"champion": self.champion, "challenger": self.challenger}

    def cli(self, *args: str) -> CliResult:
        return roost(self.env, "rollout", *args, self.registry.name)

    def promoted(self, result: CliResult) -> RolloutState:
        """The CLI's rerun after the fault cleared finished the rollout: promoted."""
        assert result.code == 0, result.stderr[-3000:]
        final = self.state()
        assert final.phase is Phase.PROMOTED, final.holding
        assert final.recorded == len(final.history)
        assert self.aliases().get("champion") == self.challenger
        live = self.backend.live()
        assert live is not None and live["champion"] == self.challenger, live
        return final


@pytest.fixture
def local_canary(
    state_dir: Path, tmp_path: Path, mlflow_server: tracking.ServerState, small_run: TrainOutcome
) -> Iterator[LocalCanary]:
    name = f"faults-local-{uuid.uuid4().hex[:8]}"
    flag = tmp_path / "nginx-config-test-fails"
    wrapper = tmp_path / "nginx"
    wrapper.write_text(NGINX_WRAPPER.format(flag=flag, nginx="/usr/sbin/nginx"))
    wrapper.chmod(0o755)
    rollout = {**ROLLOUT, "nginx": str(wrapper)}
    with fault_proxy(mlflow_server.uri) as mlflow_proxy:
        settings = make_settings(
            state_dir, mlflow_proxy.url, registry={"model_name": name}, rollout=rollout
        )
        direct = registry.Registry(mlflow_server.uri, name)
        champion = direct.register(small_run.model_uri)
        challenger = direct.register(small_run.model_uri)
        direct.set_alias("champion", champion)
        # The predictors load their model from MLflow directly; the controller goes through
        # the proxy.
        backend = LocalBackend(settings, tracking_uri=mlflow_server.uri, model=name)
        env = cli_env(
            state_dir, mlflow_proxy.url, ROOST_REGISTRY__MODEL_NAME=name,
            **{f"ROOST_ROLLOUT__{k.upper()}": json.dumps(v) for k, v in rollout.items()},
        )  # fmt: skip
        env["ROOST_ROLLOUT__BACKEND"] = "local"
        env["ROOST_ROLLOUT__MODE"] = "canary"
        env["ROOST_ROLLOUT__NGINX"] = str(wrapper)
        canary = LocalCanary(
            Controller(settings, backend), backend, mlflow_proxy, direct, champion, challenger,
            env, flag,
        )  # fmt: skip
        try:
            yield canary
        finally:
            if canary.traffic is not None:
                canary.traffic.stop()
            backend.shutdown()


def kill_group(pid: int) -> None:
    """SIGKILL a process the backend started and everything in its process group."""
    assert os.getpgid(pid) == pid, "not a group leader: refusing to kill its group"
    os.killpg(pid, signal.SIGKILL)
    proc.wait_until(lambda: not proc.pid_alive(pid), 30, 0.05, what=f"pid {pid} to die")


def metrics_behind_proxy(canary: LocalCanary, stack: ExitStack) -> FaultProxy:
    """Route the controller's calls to the challenger (``/metrics``, readiness) via a proxy."""
    topology = canary.backend.topology()
    assert topology is not None and topology.challenger is not None
    record: ServerRecord = topology.challenger
    proxy = stack.enter_context(fault_proxy(record.http_url))
    topology.challenger = dataclasses.replace(record, http_port=proxy.port)
    canary.backend._save_topology(topology)
    return proxy


def test_predictor_metrics_and_registry_faults_hold_then_the_rollout_promotes(
    local_canary: LocalCanary,
) -> None:
    canary = local_canary
    canary.begin()
    with ExitStack() as stack:
        metrics = metrics_behind_proxy(canary, stack)
        faults: list[tuple[str, Callable[[], object], float, str]] = [
            ("500", lambda: metrics.fail("GET", METRICS, 500), 3, "metrics unavailable"),
            ("reset", lambda: metrics.drop("GET", METRICS), 3, "metrics unavailable"),
            # slower than the scrape's 5 s timeout: each tick waits it out
            ("slow", lambda: metrics.delay("GET", METRICS, 8.0), 12, "metrics unavailable"),
            # refused: readiness cannot be read either; the weight is held all the same
            ("refused", metrics.refuse, 3, "waiting for the canary"),
        ]
        faults[0][1]()  # the first fault is in before any traffic: no window can pass before
        canary.send_traffic()
        for index, (name, inject, windows, reason) in enumerate(faults):
            if index > 0:
                inject()
            held = canary.drive_for(windows * ROLLOUT["window_s"])
            canary.assert_held_at_50(held, reason)
            if name != "refused":
                assert any(s.outcome != "forwarded" for s in metrics.hits("GET", METRICS)), name
            metrics.restore()

        # The CLI driving the same rollout while /metrics fails: one line, exit 4, in flight.
        metrics.fail("GET", METRICS, 500)
        result = canary.cli("resume", "--timeout", "6")
        assert result.code == 4, result.stderr[-3000:]
        line = result.one_error_line()
        assert "still progressing at 50%" in line and "stays in flight" in line, line
        canary.assert_held_at_50(canary.state(), "metrics unavailable")
        metrics.restore()

        # MLflow fails the verdict's tags: the weight does not move before the registry has it.
        canary.mlflow.fail("POST", SET_TAG, 500)
        canary.tick_until(
            lambda s: "registry unreachable" in (s.holding or ""), 120, "the verdict to be held"
        )
        canary.assert_held_at_50(canary.state(), "registry unreachable, holding 50%")
        canary.mlflow.restore()

        # MLflow fails the promotion's alias move: @champion and nginx's champion stay.
        canary.mlflow.fail("POST", ALIAS, 500)
        promoting = canary.tick_until(
            lambda s: s.phase is Phase.PROMOTING and "promote waits" in (s.holding or ""),
            180, "the promotion to be held",
        )  # fmt: skip
        assert promoting.weight == 100 and canary.weights_applied() == [50, 100]
        assert canary.aliases().get("champion") == canary.champion
        live = canary.backend.live()
        assert live is not None and live["champion"] == canary.champion, live
        canary.mlflow.restore()

        # The rerun after the faults cleared (the CLI, another driver) finishes the rollout.
        canary.promoted(canary.cli("resume", "--timeout", "120"))


def test_predictor_sigkilled_rolls_back_and_a_new_start_promotes(
    local_canary: LocalCanary,
) -> None:
    canary = local_canary
    canary.begin()
    topology = canary.backend.topology()
    assert topology is not None and topology.challenger is not None
    kill_group(topology.challenger.pid)
    canary.send_traffic()

    final = canary.tick_until(
        lambda s: s.phase is Phase.ROLLED_BACK and s.recorded == len(s.history),
        120, "the rollback",
    )  # fmt: skip
    assert final.failure is not None and final.failure["metric"] == "readiness", final.failure
    assert canary.weights_applied() == [50, 0]
    live = canary.backend.live()
    assert live is not None and live["weight"] == 0 and live["champion"] == canary.champion
    assert canary.aliases() == {"champion": canary.champion}  # @challenger removed
    tags = canary.registry.get_version(canary.challenger).tags or {}
    assert tags.get("roost.rollout") == "rolled_back", tags

    # The fault cleared (a new predictor): starting the version again promotes it.
    result = canary.cli("start", "--version", canary.challenger, "--timeout", "300")
    canary.promoted(result)


def test_nginx_killed_or_failing_to_reload_holds_and_heals(local_canary: LocalCanary) -> None:
    canary = local_canary
    canary.begin()

    # nginx's master SIGKILLed (its worker lives on, holding the ports): the controller stops
    # the orphaned worker and starts nginx again on its last config.
    old = canary.backend.proxy.pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    proc.wait_until(lambda: not proc.pid_alive(old), 30, 0.05, what="nginx's master to die")
    healed = canary.tick_until(
        lambda s: any("nginx was not running" in str(e.get("reason")) for e in s.history)
        and canary.backend.live() is not None,
        60, "nginx to be started again",
    )  # fmt: skip
    assert canary.backend.proxy.pid() not in (None, old)
    assert healed.phase is Phase.PROGRESSING and healed.weight == 50
    assert canary.weights_applied() == [50]
    live = canary.backend.live()
    assert live is not None and live["weight"] == 50, live

    # The champion's predictor SIGKILLed (nginx answers 502 for its half): the controller
    # starts its version again at once and points nginx at it, keeping the weight.
    topology = canary.backend.topology()
    assert topology is not None and topology.champion is not None
    dead = topology.champion
    kill_group(dead.pid)
    said: list[str] = []  # the holds the ticks went through (one hold event per cause)

    def restarted(state: RolloutState) -> bool:
        said.extend([state.holding or ""] + [str(e.get("reason")) for e in state.history])
        now = canary.backend.topology()
        return now is not None and now.champion is not None and now.champion.pid != dead.pid

    canary.tick_until(restarted, 120, "the champion to be started again")
    assert any(f"(pid {dead.pid}) exited; started it again" in reason for reason in said), said
    topology = canary.backend.topology()
    assert topology is not None and topology.champion is not None
    assert topology.champion.alive()
    assert topology.champion.version == canary.champion
    live = canary.backend.live()
    assert live is not None and live["weight"] == 50 and live["champion"] == canary.champion, live
    assert canary.weights_applied() == [50]  # no step was taken on the way
    served = canary.controller.settings.serving.model_name
    pinned = httpx.get(
        f"{canary.backend.endpoint()}/v2/models/{served}/ready",
        headers={VARIANT_HEADER: "champion"}, timeout=10,
    )  # fmt: skip
    assert pinned.status_code == 200, pinned.text  # through nginx, to the new server

    # Its config test fails when the next weight is written: nginx keeps serving 50%.
    canary.nginx_flag.touch()
    canary.send_traffic()
    canary.tick_until(
        lambda s: "config test failed" in (s.holding or ""), 120, "the step to be held"
    )
    canary.assert_held_at_50(canary.state(), "injected fault")
    status = canary.cli("status")
    assert status.code == 0, status.stderr
    shown = " ".join((status.stdout + status.stderr).split())  # the status goes to stderr
    assert "holding: waiting for the canary: nginx config test failed" in shown, shown
    canary.nginx_flag.unlink()

    # Its config directory cannot be written: the same.
    conf_next = canary.backend.dir / "nginx.conf.next"
    conf_next.unlink(missing_ok=True)
    conf_next.mkdir()
    canary.tick_until(
        lambda s: "cannot write the nginx config" in (s.holding or ""), 60, "the step to be held"
    )
    canary.assert_held_at_50(canary.state(), "cannot write the nginx config")
    conf_next.rmdir()

    final = canary.controller.run(timeout=180)
    assert final.phase is Phase.PROMOTED
    assert canary.weights_applied() == [50, 100]
    assert canary.aliases().get("champion") == canary.challenger
    live = canary.backend.live()
    assert live is not None and live["champion"] == canary.challenger, live
