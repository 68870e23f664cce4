"""The registry's own words: Markdown descriptions of the model and of each version.

A version's description is rendered from what the registry already records about it (the
``roost.gate.*`` and ``roost.rollout.*`` tags, its source run), so it is a view, not a
second copy: :func:`refresh_version` re-renders it whenever roost writes those tags
(register, gate, rollout progress and outcome). The registered model's description says
what the platform's aliases mean and what moves them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from roost.config import RegistrySettings

log = logging.getLogger(__name__)

MARKER = "_Written by roost"


def model_description(cfg: RegistrySettings) -> str:
    """Markdown for the registered model: its aliases and what moves them (pure)."""
    return "\n".join(
        [
            f"**{cfg.model_name}**: registered, gated and rolled out by roost.",
            "",
            "| alias | points at | moved by |",
            "|---|---|---|",
            f"| `@{cfg.champion_alias}` | the version production serves "
            f"(`models:/{cfg.model_name}@{cfg.champion_alias}`) | `roost promote` when the gate "
            "passes; a canary rollout that promotes (the old champion is tagged "
            "`roost.rollout=superseded`) |",
            f"| `@{cfg.challenger_alias}` | the version being canaried against the champion "
            f"| `roost promote --to {cfg.challenger_alias}` when the gate passes; removed when "
            "its rollout promotes or rolls back |",
            f"| `@{cfg.candidate_alias}` | the latest version the gate refused "
            f"| `roost promote` when the candidate does not beat the champion by "
            f"`registry.min_improvement` on `{cfg.gate_metric}` |",
            "",
            "Each version's description states its gate result, its rollout outcome and its "
            "training run; `roost lineage NAME/VERSION` shows the whole story.",
            "",
            f"{MARKER}; kept current on register, gate and rollout._",
        ]
    )


def _score(value: str | None) -> str:
    try:
        return f"{float(value):.4f}" if value not in (None, "none") else "none"  # type: ignore[arg-type]
    except ValueError:
        return str(value)


def version_description(tags: dict[str, str], run: dict[str, Any] | None) -> str:
    """Markdown for one version from its tags and its source run's summary (pure).

    ``run``: ``{"run_id", "name", "experiment_id", "metrics": {...}, "commit", "dirty"}``.
    Aliases are not repeated here: they move between versions, and the registry page
    shows them already.
    """
    lines: list[str] = []
    decision = tags.get("roost.gate.decision")
    if decision:
        metric = tags.get("roost.gate.metric", "?")
        champion = tags.get("roost.gate.champion_version", "none")
        against = (
            "no champion yet"
            if champion == "none"
            else f"champion v{champion} {_score(tags.get('roost.gate.champion_score'))}"
        )
        lines.append(
            f"**Gate: {decision}**: {metric} {_score(tags.get('roost.gate.candidate_score'))} "
            f"vs {against} (min improvement {tags.get('roost.gate.min_improvement', '?')}, "
            f"{tags.get('roost.gate.test_rows', '?')} test rows, "
            f"{tags.get('roost.gate.evaluated_at', '?')})."
        )
        if tags.get("roost.gate.reason"):
            lines.append(f"Reason: {tags['roost.gate.reason']}")
    else:
        lines.append("**Gate:** not evaluated.")
    lines.append("")
    outcome = tags.get("roost.rollout")
    if outcome == "superseded":
        lines.append(
            f"**Rollout: superseded** by v{tags.get('roost.rollout.superseded_by', '?')} "
            f"(rollout {tags.get('roost.rollout.id', '?')})."
        )
    elif outcome:
        steps = []
        i = 1
        while f"roost.rollout.step.{i}" in tags:
            try:
                row = json.loads(tags[f"roost.rollout.step.{i}"])
                steps.append(f"{row.get('weight')}% {row.get('verdict') or '…'}")
            except ValueError:
                pass
            i += 1
        when = tags.get("roost.rollout.finished_at") or tags.get("roost.rollout.updated_at", "?")
        lines.append(
            f"**Rollout: {outcome}** against v{tags.get('roost.rollout.champion', '?')} "
            f"({tags.get('roost.rollout.backend', '?')}, {when})"
            + (": " + " → ".join(steps) if steps else "")
            + "."
        )
        if tags.get("roost.rollout.reason"):
            lines.append(f"Reason: {tags['roost.rollout.reason']}")
    else:
        lines.append("**Rollout:** none yet.")
    lines.append("")
    if run is None:
        lines.append("**Training run:** not recorded.")
    else:
        link = f"#/experiments/{run['experiment_id']}/runs/{run['run_id']}"
        parts = [
            f"**Training run:** [{run.get('name') or run['run_id']}]({link}) (`{run['run_id']}`)"
        ]
        metrics = run.get("metrics") or {}
        if "test_accuracy" in metrics:
            parts.append(f"test accuracy {metrics['test_accuracy']:.4f}")
        if "test_macro_f1" in metrics:
            parts.append(f"macro-F1 {metrics['test_macro_f1']:.4f}")
        commit = run.get("commit")
        if commit:
            state = {True: "dirty", False: "clean"}.get(run.get("dirty"), "state not recorded")  # type: ignore[arg-type]
            parts.append(f"git `{commit[:12]}` ({state})")
        else:
            parts.append("no git commit recorded")
        lines.append(" · ".join(parts))
    lines.append("")
    lines.append(f"{MARKER} from this version's tags; updated on register, gate and rollout._")
    return "\n".join(lines)


def refresh_version(client: Any, model: str, version: str) -> str:
    """Re-render and store version ``version``'s description; returns the Markdown."""
    from mlflow.exceptions import MlflowException

    mv = client.get_model_version(model, version)
    tags = {str(k): str(v) for k, v in (mv.tags or {}).items()}
    run: dict[str, Any] | None = None
    run_id = mv.run_id or tags.get("roost.source_run")
    if run_id:
        try:
            found = client.get_run(run_id)
        except MlflowException:
            found = None
        if found is not None:
            run_tags = found.data.tags
            run = {
                "run_id": found.info.run_id,
                "name": found.info.run_name,
                "experiment_id": found.info.experiment_id,
                "metrics": dict(found.data.metrics),
                "commit": run_tags.get("mlflow.source.git.commit"),
                "dirty": {"true": True, "false": False}.get(run_tags.get("roost.git_dirty", "")),
            }
    text = version_description(tags, run)
    if (mv.description or "") != text:
        client.update_model_version(model, version, description=text)
    return text


def ensure_model(client: Any, cfg: RegistrySettings) -> None:
    """Write the registered model's description unless someone else wrote theirs."""
    model = client.get_registered_model(cfg.model_name)
    current = model.description or ""
    text = model_description(cfg)
    if current != text and (not current or MARKER in current):
        client.update_registered_model(cfg.model_name, description=text)
