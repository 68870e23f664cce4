"""Registry bookkeeping of a rollout: aliases, version tags and one MLflow run per rollout.

What to record comes from the engine (``version_tags``, ``steps_table``); this module only
writes it. Every write is idempotent (tags and aliases are set to values, the JSON artifact is
replaced), so a driver that restarts may repeat it. An unreachable tracking server raises
:class:`roost.errors.TrackingUnavailable`; the controller then holds the weight.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from roost import descriptions, tracking
from roost.config import Settings
from roost.errors import TrackingUnavailable
from roost.rollout import engine
from roost.rollout.state import Phase, RolloutState

if TYPE_CHECKING:  # roost.registry imports pandas: only the commands that write records pay
    from roost.registry import Registry

log = logging.getLogger(__name__)

T = TypeVar("T")
ARTIFACT = "rollout.json"


class Recorder:
    """Writes a rollout's progress to the MLflow registry and its tracking run."""

    def __init__(self, settings: Settings, model: str | None = None) -> None:
        self.settings = settings
        self.model = model or settings.registry.model_name
        self._uri: str | None = None

    def registry(self) -> Registry:
        """A Registry client, after checking the tracking server answers."""
        from roost.registry import Registry

        if self._uri is None:
            self._uri = tracking.use(self.settings)  # also points mlflow's globals at it
        tracking.ensure_reachable(self._uri, min(self.settings.tracking.request_timeout_s, 5.0))
        return Registry(self._uri, self.model)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run one MLflow call; a failure while the server is down becomes TrackingUnavailable."""
        from mlflow.exceptions import MlflowException

        try:
            return fn()
        except MlflowException as exc:
            if self._uri is not None:
                tracking.ensure_reachable(self._uri, 2.0)
            raise TrackingUnavailable(f"MLflow call failed: {exc.message}") from None

    # -- the rollout's run ---------------------------------------------------------------------
    def ensure_run(self, state: RolloutState) -> str:
        """The MLflow run of this rollout (created on first use)."""
        if state.run_id:
            return state.run_id
        reg = self.registry()
        client = reg.client
        name = self.settings.rollout.experiment

        def create() -> str:
            from mlflow.exceptions import MlflowException

            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    return str(client.create_experiment(name))
                except MlflowException:  # created concurrently?
                    experiment = client.get_experiment_by_name(name)
                    if experiment is None:
                        raise  # no: the create itself failed
            return str(experiment.experiment_id)

        experiment_id = self._call(create)
        tags = {
            "mlflow.runName": f"rollout-{state.model}-v{state.version}",
            "roost.kind": "rollout",
            "roost.model": state.model,
            "roost.version": state.version,
            "roost.champion": state.champion,
            "roost.rollout.id": state.id,
            "roost.rollout.backend": state.backend,
        }
        run = self._call(lambda: client.create_run(experiment_id, tags=tags))
        run_id = str(run.info.run_id)
        plan = state.plan.to_dict()
        params = {f"plan.{k}": str(v) for k, v in plan.items() if k not in ("thresholds", "shadow")}
        params.update(
            {f"threshold.{k}": str(v) for k, v in state.plan.thresholds.to_dict().items()}
        )
        if state.plan.shadows:
            shadow = state.plan.shadow.to_dict()
            thresholds = shadow.pop("thresholds")
            params.update({f"shadow.{k}": str(v) for k, v in shadow.items()})
            params.update({f"shadow.threshold.{k}": str(v) for k, v in thresholds.items()})
        from mlflow.entities import Param

        self._call(
            lambda: client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        )
        return run_id

    def sync(self, state: RolloutState) -> None:
        """Tags on the version, new window metrics and the JSON history on the run."""
        reg = self.registry()
        tags = engine.version_tags(state)
        self._call(lambda: reg.set_tags(state.version, tags))
        self._call(lambda: descriptions.refresh_version(reg.client, reg.name, state.version))
        if state.run_id:
            self._log_run(reg, state)

    def _log_run(self, reg: Registry, state: RolloutState) -> None:
        from mlflow.entities import Metric

        assert state.run_id is not None
        run_id = state.run_id
        metrics: list[Metric] = []
        for event in state.history[state.recorded :]:
            if event["event"] not in ("window", "check") or not event.get("analysis"):
                continue
            stamp = int(event["at"] * 1000)
            step = int(event["step"])
            analysis = event["analysis"]
            metrics.append(Metric("weight", float(event["weight"]), stamp, step))
            for side, count in (analysis.get("requests") or {}).items():
                metrics.append(Metric(f"requests.{side}", float(count), stamp, step))
            for check in analysis.get("checks", []):
                for side in ("champion", "challenger", "value"):
                    value = check.get(side)
                    if value is not None:
                        metrics.append(Metric(f"{check['name']}.{side}", float(value), stamp, step))
        if metrics:
            self._call(lambda: reg.client.log_batch(run_id, metrics=metrics))
        document = history_document(state)
        self._call(lambda: reg.client.log_dict(run_id, document, ARTIFACT))
        if state.terminal:
            # The outcome on the run too (shadow_failed: failing metric, values, ids).
            tags = engine.version_tags(state)
            keep = (
                "",
                ".failed_metric",
                ".failed_values",
                ".disagreeing_ids",
                ".shadow",
                ".reason",
            )
            run_tags = {k: v for k, v in tags.items() if k in {engine.TAG + s for s in keep}}
            self._call(lambda: [reg.client.set_tag(run_id, k, v) for k, v in run_tags.items()])
            ok = state.phase in (Phase.PROMOTED, Phase.SHADOW_PASSED)
            status = "FINISHED" if ok else "FAILED"
            end = int((state.finished_at or time.time()) * 1000)
            self._call(lambda: reg.client.set_terminated(run_id, status, end_time=end))

    # -- outcomes ------------------------------------------------------------------------------
    def promote(self, state: RolloutState) -> str | None:
        """Alias champion -> the challenger; previous champion tagged superseded."""
        cfg = self.settings.registry
        reg = self.registry()
        previous = self._call(lambda: reg.version_for_alias(cfg.champion_alias))
        self._call(lambda: reg.set_alias(cfg.champion_alias, state.version))
        for old in {previous, state.champion} - {None, state.version}:
            assert old is not None
            self._call(lambda old=old: reg.set_tags(old, engine.superseded_tags(state)))  # type: ignore[misc]
            self._call(lambda old=old: descriptions.refresh_version(reg.client, reg.name, old))  # type: ignore[misc]
        if self._call(lambda: reg.version_for_alias(cfg.challenger_alias)) == state.version:
            self._call(lambda: reg.delete_alias(cfg.challenger_alias))
        log.info("promoted model=%s version=%s previous=%s", state.model, state.version, previous)
        return previous

    def last_rollout(self, version: str | None = None) -> RolloutState | None:
        """The latest recorded rollout (of ``version``) from the registry and its run."""
        from mlflow.exceptions import MlflowException

        reg = self.registry()
        candidates = [
            v for v in self._call(reg.versions)
            if (v.tags or {}).get(f"{engine.TAG}.run_id")
            and (version is None or str(v.version) == version)
        ]  # fmt: skip
        if not candidates:
            return None
        latest = max(
            candidates, key=lambda v: (v.tags.get(f"{engine.TAG}.updated_at", ""), int(v.version))
        )
        run_id = latest.tags[f"{engine.TAG}.run_id"]
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = tracking.download_artifact(reg.client, run_id, ARTIFACT, tmp)
            except MlflowException as exc:
                raise TrackingUnavailable(f"MLflow call failed: {exc.message}") from None
            if path is None:
                return None
            document = json.loads(Path(path).read_text())
        return RolloutState.from_dict(document["state"]) if "state" in document else None

    def rolled_back(self, state: RolloutState) -> None:
        """Alias challenger removed (if it still points at this version)."""
        cfg = self.settings.registry
        reg = self.registry()
        if self._call(lambda: reg.version_for_alias(cfg.challenger_alias)) == state.version:
            self._call(lambda: reg.delete_alias(cfg.challenger_alias))
        log.info("rolled back model=%s version=%s", state.model, state.version)


def history_document(state: RolloutState) -> dict[str, Any]:
    """The JSON artifact: the plan, the outcome, one row per step and every event."""
    return {
        **engine.document(state),
        "steps": [engine.compact_row(row) for row in engine.steps_table(state)],
        # the whole state (without the last raw scrape), so `status` can rebuild it from here
        "state": dataclasses.replace(state, last_scrape=None).to_dict(),
    }
