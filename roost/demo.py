"""The whole loop on one machine: MLflow -> train -> gate -> serve -> predict.

Every stage calls the same functions as the individual commands (``roost mlflow up``,
``roost train``, ``roost promote``, ``roost serve``, ``roost predict``); the demo only
sequences them, times them and stops what it started.
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
from roost.serving import local
from roost.train import TrainOutcome, TrainProgress, run_training

log = logging.getLogger(__name__)

SAMPLE_TEXTS = [
    "I love how smooth the new update is, great job!",
    "The flight was delayed three hours and nobody told us anything.",
    "The meeting is scheduled for Tuesday at 10am.",
]


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

        with stage("promote", "registering and gating against the champion"):
            result = registry.promote(settings, run_id=outcome.run_id)
        report.version = result.version
        report.alias = result.alias
        report.gate_passed = result.decision.passed
        report.gate_reason = result.decision.reason

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
