"""The whole loop on one machine: MLflow -> train -> gate -> shadow -> canary -> serve -> predict.

Every stage calls the same functions as the individual commands (``roost mlflow up``,
``roost train``, ``roost promote``, ``roost rollout start``, ``roost serve``, ``roost predict``);
the demo only sequences them, times them and stops what it started.

The first run on an empty store has no champion: the gated version becomes ``champion``. Later
runs make it the ``challenger``, shadow it (the champion's logged traffic replayed to it
through a payload receiver the demo starts, the answers judged pair by pair), then canary it
against the champion through the local backend (two model servers behind nginx) with short
windows and traffic the demo generates itself, and serve whichever version is champion
afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from roost import client, registry, tracking
from roost.config import Settings
from roost.rollout.traffic import SAMPLE_TEXTS
from roost.serving import local
from roost.train import TrainOutcome, TrainProgress, run_training

log = logging.getLogger(__name__)

# The demo's rollout: a short shadow phase, then short canary windows; enough generated
# traffic for a verdict at 10 %.
DEMO_ROLLOUT: dict[str, Any] = {
    "mode": "shadow-then-canary",
    "window_s": 8.0,
    "check_interval_s": 1.0,
    "min_requests": 20,
    "poll_s": 0.25,
}
DEMO_SHADOW: dict[str, Any] = {"duration_s": 6.0, "min_pairs": 60, "max_duration_s": 60.0}
DEMO_TRAFFIC_RPS = 50.0


@dataclass
class StageTiming:
    name: str
    seconds: float


@dataclass
class DemoReport:
    tracking_uri: str = ""
    started_tracking: bool = False
    run_id: str = ""
    test_accuracy: float = 0.0
    test_macro_f1: float = 0.0
    model: str = ""
    version: str = ""
    alias: str = ""
    gate_passed: bool = False
    gate_reason: str = ""
    champion_version: str = ""
    endpoints: dict[str, str] = field(default_factory=dict)
    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    rollout: dict[str, Any] | None = None
    stages: list[StageTiming] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mlflow_ui": self.tracking_uri,
            "run_id": self.run_id,
            "test_accuracy": self.test_accuracy,
            "test_macro_f1": self.test_macro_f1,
            "model": self.model,
            "version": self.version,
            "alias": self.alias,
            "gate": {"passed": self.gate_passed, "reason": self.gate_reason},
            "champion_version": self.champion_version,
            "endpoints": self.endpoints,
            "predictions": self.predictions,
            "rollout": self.rollout,
            "stages": {s.name: round(s.seconds, 2) for s in self.stages},
            "total_seconds": round(self.total_seconds, 2),
        }


Notify = Callable[[str], None]


def run_demo(
    settings: Settings,
    notify: Notify,
    train_progress: TrainProgress | None = None,
    keep_running: bool = False,
) -> DemoReport:
    report = DemoReport(model=settings.registry.model_name)

    @contextlib.contextmanager
    def stage(name: str, message: str) -> Iterator[None]:
        notify(message)
        start = time.perf_counter()
        yield
        report.stages.append(StageTiming(name, time.perf_counter() - start))

    server: local.LocalServer | None = None
    try:
        with stage("mlflow", "starting MLflow tracking server"):
            if settings.tracking.uri is None and tracking.running_server(settings) is None:
                tracking.up(settings)
                report.started_tracking = True
            report.tracking_uri = tracking.use(settings)

        with stage("train", "training the sentiment model"):
            outcome: TrainOutcome = run_training(settings, train_progress)
        report.run_id = outcome.run_id
        report.test_accuracy = outcome.test.accuracy
        report.test_macro_f1 = outcome.test.macro_f1

        cfg = settings.registry
        reg = registry.Registry(report.tracking_uri, cfg.model_name)
        champion = reg.version_for_alias(cfg.champion_alias)
        target = cfg.challenger_alias if champion else cfg.champion_alias
        with stage("promote", f"registering and gating against the champion (-> @{target})"):
            result = registry.promote(settings, run_id=outcome.run_id, alias=target)
        report.version = result.version
        report.alias = result.alias
        report.gate_passed = result.decision.passed
        report.gate_reason = result.decision.reason

        if champion and result.decision.passed:
            message = (
                f"shadow, then canary of v{result.version} against champion v{champion} "
                "(nginx, local)"
            )
            with stage("canary", message):
                report.rollout = run_canary(
                    settings, report.tracking_uri, result.version, outcome.run_id, notify,
                    keep_running,
                )  # fmt: skip

        with stage("serve", "starting the KServe model server on loopback"):
            state_dir = settings.state_dir.resolve()
            server = local.start(
                settings,
                f"models:/{settings.registry.model_name}@{settings.registry.champion_alias}",
                state_dir / "logs" / "demo-serve.log",
                tracking_uri=report.tracking_uri,
            ).wait_ready()
        reg = registry.Registry(report.tracking_uri, settings.registry.model_name)
        report.champion_version = reg.require_alias(settings.registry.champion_alias)
        report.endpoints = {
            "rest_v1": f"{server.http_url}/v1/models/{server.name}:predict",
            "rest_v2": f"{server.http_url}/v2/models/{server.name}/infer",
            "grpc_v2": server.grpc_target,
            "metrics": f"{server.http_url}/metrics",
        }

        with stage("predict", "predicting over REST v1, REST v2 and gRPC"):
            for protocol in client.Protocol:
                answer = client.predict(
                    SAMPLE_TEXTS, protocol, server.http_url, server.grpc_target, server.name
                )
                report.predictions[protocol.value] = [
                    {"text": p.text, "label": p.label, "confidence": round(p.confidence, 4)}
                    for p in answer.predictions
                ]
    finally:
        if server is not None and not keep_running:
            server.stop()
        if report.started_tracking and not keep_running:
            tracking.down(settings)
    return report


def run_canary(
    settings: Settings,
    tracking_uri: str,
    version: str,
    run_id: str,
    notify: Notify,
    keep_running: bool = False,
) -> dict[str, Any]:
    """Canary ``version`` through the local backend while sending it generated traffic."""
    from roost.monitor import local as receiver
    from roost.rollout import engine
    from roost.rollout.backends.local import LocalBackend
    from roost.rollout.controller import Controller
    from roost.rollout.state import RolloutState
    from roost.rollout.traffic import Traffic, first_answer_from, run_texts, start_canary_traffic
    from roost.rollout.traffic import summary as traffic_summary

    running = receiver.receiver_url(settings)
    started_receiver = running is None
    if running is None:
        notify("starting a payload receiver for the shadow phase (roost monitor up)")
        running = receiver.up(settings).url
    shadow = settings.rollout.shadow.model_copy(update={**DEMO_SHADOW, "receiver_url": running})
    canary_settings = settings.model_copy(
        update={"rollout": settings.rollout.model_copy(update={**DEMO_ROLLOUT, "shadow": shadow})}
    )
    backend = LocalBackend(canary_settings, tracking_uri)

    def on_event(state: RolloutState, event: dict[str, Any]) -> None:
        line = _event_line(event)
        if line:
            notify(f"  {line}")

    controller = Controller(
        canary_settings, backend, on_event=on_event, notify=lambda m: log.info("%s", m)
    )
    previous = backend.load_state()
    if previous is not None and not previous.terminal:
        notify(f"an earlier rollout of v{previous.version} was left in flight: aborting it")
        controller.request("abort", by="roost demo")
    reg = registry.Registry(tracking_uri, settings.registry.model_name)
    texts = run_texts(reg, run_id)
    state = controller.start(version)
    plan = state.plan
    notify(plan.describe())
    started = time.time()
    traffic: Traffic | None = None
    try:
        traffic = start_canary_traffic(
            controller, backend, canary_settings.serving.model_name, texts, DEMO_TRAFFIC_RPS
        )
        final = controller.run(timeout=plan.min_promotion_s * 3 + 180)
        answers = traffic.stop()
    finally:
        if traffic is not None:
            traffic.stop()
        if not keep_running:
            backend.shutdown()
            if started_receiver:
                receiver.down(settings)
    first = first_answer_from(answers, version, started)
    return {
        "id": final.id,
        "version": final.version,
        "champion_before": final.champion,
        "outcome": final.phase.value,
        "reason": final.history[-1].get("reason", "") if final.history else "",
        "failure": final.failure,
        "plan": plan.to_dict(),
        "steps": engine.steps_table(final),
        "shadow": engine.shadow_summary(final),
        "traffic": traffic_summary(answers),
        "first_canary_answer_s": None if first is None else round(first - started, 3),
        "proxy": backend.describe() if keep_running else {},
        "mlflow_run": final.run_id,
    }


def _event_line(event: dict[str, Any]) -> str | None:
    kind, weight = event["event"], event.get("weight")
    if kind == "shadow":
        return "shadow: the champion's logged traffic is replayed to the challenger"
    if event.get("stage") == "shadow" and kind in ("window", "check"):
        analysis = event.get("analysis") or {}
        checks = {c["name"]: c for c in analysis.get("checks") or []}
        agreement = (checks.get("agreement") or {}).get("value")
        verdict = "passed" if kind == "window" else "failed"
        return f"shadow {verdict}: agreement {agreement} ({analysis.get('reason', '')})"
    if kind == "weight":
        return f"{weight}% of requests to the challenger"
    if kind == "window":
        requests = ((event.get("analysis") or {}).get("requests") or {}).get("challenger")
        return f"window at {weight}% passed ({requests} canary requests)"
    if kind == "check":
        return f"check failed at {weight}%: {(event.get('analysis') or {}).get('reason', '')}"
    if kind in ("promoted", "rolled_back"):
        return f"{kind.replace('_', ' ')}: {event.get('reason', '')}"
    if kind == "hold":
        return f"holding {weight}%: {event.get('reason')}"
    return None
