"""Lineage facts the MLflow tracking server and registry hold.

Each function reads one thing (a version, its training run, its tags, the runs tagged with
it) and returns plain dicts; what is absent goes to ``missing`` as a sentence.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from roost.registry import GATE_TAG, Registry

log = logging.getLogger(__name__)

# Tags this module reads (written by roost.train, roost.registry, roost.rollout).
GIT_COMMIT_TAGS = ("mlflow.source.git.commit", "roost.git_commit")
GIT_DIRTY_TAG = "roost.git_dirty"
JOB_TAG = "roost.k8s.job"
JOB_NAMESPACE_TAG = "roost.k8s.namespace"
ROLLOUT_TAG = "roost.rollout"
ROLLOUT_ARTIFACT = "rollout.json"
HEADLINE_METRICS = (
    "test_accuracy", "test_macro_f1", "val_loss", "val_accuracy", "best_epoch", "train_seconds",
)  # fmt: skip

# Features that record themselves against a version (other commands: tune, batch, monitor).
# They are found generically: version tags under ``roost.<feature>.`` and runs tagged with
# ``roost.model`` / ``roost.version`` whose ``roost.kind`` is the feature.
FEATURES = ("tune", "batch", "monitor")


def iso(ms: int | float | None) -> str | None:
    """Milliseconds since the epoch as ISO-8601 UTC (pure)."""
    if ms is None:
        return None
    import datetime as dt

    stamp = dt.datetime.fromtimestamp(float(ms) / 1000.0, tz=dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def run_link(experiment_id: str, run_id: str) -> str:
    """The MLflow UI route of a run, relative to the UI's address (pure)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def version_link(model: str, version: str) -> str:
    return f"#/models/{model}/versions/{version}"


def registered(reg: Registry, version: str, missing: list[str]) -> dict[str, Any]:
    """The registered version: aliases, source, status, dates, description."""
    mv = reg.get_version(version)  # NotFound (exit 3) if absent
    tags = dict(mv.tags or {})
    out: dict[str, Any] = {
        "model": reg.name,
        "version": str(mv.version),
        "aliases": sorted(mv.aliases or []),
        "status": mv.status,
        "created_at": iso(mv.creation_timestamp),
        "source": mv.source,
        "run_id": mv.run_id or tags.get("roost.source_run"),
        "description": mv.description or None,
        "ui": version_link(reg.name, str(mv.version)),
    }
    if not out["aliases"]:
        missing.append("no alias points at this version")
    return out


def version_tags(reg: Registry, version: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in (reg.get_version(version).tags or {}).items()}


def training_run(reg: Registry, run_id: str | None, missing: list[str]) -> dict[str, Any] | None:
    """Params, headline metrics, dataset inputs (digest, rows), git commit and dirty flag."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        missing.append("no training run recorded (the version was not registered from a run)")
        return None
    try:
        run = reg.client.get_run(run_id)
    except MlflowException:
        missing.append(f"training run {run_id} not found on the tracking server")
        return None
    tags = dict(run.data.tags)
    metrics = dict(run.data.metrics)
    commit = next((tags[t] for t in GIT_COMMIT_TAGS if tags.get(t)), None)
    dirty_raw = tags.get(GIT_DIRTY_TAG)
    dirty = {"true": True, "false": False}.get(dirty_raw or "")
    if commit is None:
        missing.append("no git commit recorded")
    if dirty is None:
        missing.append("whether the git tree was dirty is not recorded")
    headline = {k: metrics[k] for k in HEADLINE_METRICS if k in metrics}
    if "test_accuracy" not in headline and "test_macro_f1" not in headline:
        missing.append("no test metrics recorded on the training run")
    datasets = [_dataset(d) for d in (run.inputs.dataset_inputs if run.inputs else [])]
    if not datasets:
        missing.append("no dataset inputs recorded on the training run")
    job = tags.get(JOB_TAG)
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "started_at": iso(run.info.start_time),
        "ended_at": iso(run.info.end_time),
        "ui": run_link(run.info.experiment_id, run.info.run_id),
        "params": dict(sorted(run.data.params.items())),
        "metrics": headline,
        "datasets": datasets,
        "git": {"commit": commit, "dirty": dirty},
        "k8s_job": {"name": job, "namespace": tags.get(JOB_NAMESPACE_TAG)} if job else None,
        "tune": _prefixed(tags, "roost.tune.") or None,
    }


def _dataset(item: Any) -> dict[str, Any]:
    dataset = item.dataset
    context = next((t.value for t in item.tags or [] if t.key == "mlflow.data.context"), None)
    rows = None
    try:
        rows = json.loads(dataset.profile or "{}").get("num_rows")
    except ValueError:
        rows = None
    try:
        source = json.loads(dataset.source or "{}")
    except ValueError:
        source = dataset.source
    return {
        "context": context,
        "name": dataset.name,
        "digest": dataset.digest,
        "rows": rows,
        "source_type": dataset.source_type,
        "source": source.get("uri", source) if isinstance(source, dict) else source,
    }


def gate(tags: dict[str, str], missing: list[str]) -> dict[str, Any] | None:
    """The promotion gate's decision and both scores, from the version's tags (pure)."""
    prefix = f"{GATE_TAG}."
    found = _prefixed(tags, prefix)
    if not found:
        missing.append("no gate decision recorded")
        return None

    def number(key: str) -> float | None:
        value = found.get(key)
        try:
            return None if value in (None, "none") else float(value)  # type: ignore[arg-type]
        except ValueError:
            return None

    champion = found.get("champion_version")
    return {
        "decision": found.get("decision"),
        "metric": found.get("metric"),
        "candidate_score": number("candidate_score"),
        "champion_score": number("champion_score"),
        "champion_version": None if champion in (None, "none") else champion,
        "min_improvement": number("min_improvement"),
        "reason": found.get("reason"),
        "test_rows": int(found["test_rows"]) if found.get("test_rows", "").isdigit() else None,
        "evaluated_at": found.get("evaluated_at"),
        "evaluation_run": found.get("run_id"),
        "validation": found.get("validation"),
    }


def related_runs(reg: Registry, version: str) -> list[Any]:
    """Every run in any experiment tagged with this model version (rollouts, tune, batch...)."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in reg.client.search_experiments(ViewType.ACTIVE_ONLY)]
    if not experiments:
        return []
    name = reg.name.replace("'", "\\'")
    found = reg.client.search_runs(
        experiments,
        filter_string=f"tags.`roost.model` = '{name}' and tags.`roost.version` = '{version}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    return list(found)


def rollouts(reg: Registry, runs: Iterable[Any], tags: dict[str, str]) -> list[dict[str, Any]]:
    """Every rollout of the version: its MLflow run and the ``rollout.json`` history there."""
    from mlflow.exceptions import MlflowException

    out: list[dict[str, Any]] = []
    for run in runs:
        run_tags = run.data.tags
        if run_tags.get("roost.kind") != "rollout":
            continue
        document: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = reg.client.download_artifacts(run.info.run_id, ROLLOUT_ARTIFACT, tmp)
                document = json.loads(Path(path).read_text())
            except (MlflowException, OSError, ValueError):
                document = {}
        steps = document.get("steps") or []
        phase = document.get("phase")
        out.append(
            {
                "id": run_tags.get("roost.rollout.id") or document.get("id"),
                "run_id": run.info.run_id,
                "ui": run_link(run.info.experiment_id, run.info.run_id),
                "backend": run_tags.get("roost.rollout.backend") or document.get("backend"),
                "champion": run_tags.get("roost.champion") or document.get("champion"),
                "outcome": _outcome(phase, run.info.status),
                "phase": phase,
                "started_at": iso(run.info.start_time),
                "finished_at": iso(run.info.end_time) if run.info.end_time else None,
                "reason": _last_reason(document),
                "failure": document.get("failure"),
                "steps": [
                    {
                        "step": s.get("step"),
                        "weight": s.get("weight"),
                        "at": s.get("at"),
                        "verdict": s.get("verdict"),
                        "requests": s.get("requests"),
                        "reason": s.get("reason"),
                    }
                    for s in steps
                ],
                "history_recorded": bool(document),
            }
        )
    if not out and tags.get(ROLLOUT_TAG) not in (None, "superseded"):
        # Tags say there was one but its run is gone: report what the tags hold.
        out.append(
            {
                "id": tags.get(f"{ROLLOUT_TAG}.id"),
                "run_id": tags.get(f"{ROLLOUT_TAG}.run_id"),
                "ui": None,
                "backend": tags.get(f"{ROLLOUT_TAG}.backend"),
                "champion": tags.get(f"{ROLLOUT_TAG}.champion"),
                "outcome": tags.get(ROLLOUT_TAG),
                "phase": tags.get(f"{ROLLOUT_TAG}.phase"),
                "started_at": None,
                "finished_at": tags.get(f"{ROLLOUT_TAG}.finished_at"),
                "reason": tags.get(f"{ROLLOUT_TAG}.reason"),
                "failure": None,
                "steps": _tag_steps(tags),
                "history_recorded": False,
            }
        )
    return out


def _outcome(phase: str | None, status: str) -> str:
    if phase == "promoted":
        return "promoted"
    if phase == "rolled_back":
        return "rolled_back"
    if status == "RUNNING":
        return "in_progress"
    return phase or status.lower()


def _last_reason(document: dict[str, Any]) -> str | None:
    for event in reversed(document.get("history") or []):
        if event.get("event") in ("promoted", "rolled_back") and event.get("reason"):
            return str(event["reason"])
    return None


def _tag_steps(tags: dict[str, str]) -> list[dict[str, Any]]:
    steps = []
    i = 1
    while f"{ROLLOUT_TAG}.step.{i}" in tags:
        try:
            row = json.loads(tags[f"{ROLLOUT_TAG}.step.{i}"])
        except ValueError:
            row = {}
        keys = ("step", "weight", "at", "verdict", "requests", "reason")
        steps.append({k: row.get(k) for k in keys})
        i += 1
    return steps


def superseded(tags: dict[str, str]) -> str | None:
    if tags.get(ROLLOUT_TAG) == "superseded":
        return tags.get(f"{ROLLOUT_TAG}.superseded_by")
    return None


def features(
    runs: Iterable[Any], tags: dict[str, str], train_tune: dict[str, str] | None
) -> dict[str, dict[str, Any]]:
    """Tuning study, batch runs, monitoring report: tags and runs recorded against the version.

    Found by convention (``roost.<feature>.*`` version tags; runs tagged ``roost.model``,
    ``roost.version`` and ``roost.kind=<feature>``); ``recorded`` is False when there are none.
    """
    by_kind: dict[str, list[Any]] = {f: [] for f in FEATURES}
    for run in runs:
        kind = run.data.tags.get("roost.kind")
        if kind in by_kind:
            by_kind[kind].append(run)
    out: dict[str, dict[str, Any]] = {}
    for feature in FEATURES:
        version_tags = _prefixed(tags, f"roost.{feature}.")
        if feature == "tune" and train_tune:
            version_tags = {**train_tune, **version_tags}
        found_runs = [
            {
                "run_id": r.info.run_id,
                "name": r.info.run_name,
                "ui": run_link(r.info.experiment_id, r.info.run_id),
                "status": r.info.status,
                "started_at": iso(r.info.start_time),
                "tags": _prefixed(r.data.tags, f"roost.{feature}."),
                "metrics": dict(r.data.metrics),
            }
            for r in by_kind[feature]
        ]
        out[feature] = {
            "recorded": bool(version_tags or found_runs),
            "tags": version_tags,
            "runs": found_runs,
        }
    # A monitoring report is a point in time: the latest one is the one that matters.
    monitor_runs = out["monitor"]["runs"]
    out["monitor"]["latest"] = monitor_runs[-1] if monitor_runs else None
    return out


def _prefixed(tags: dict[str, str], prefix: str) -> dict[str, str]:
    return {k[len(prefix) :]: v for k, v in sorted(tags.items()) if k.startswith(prefix)}
