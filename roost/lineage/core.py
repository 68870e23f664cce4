"""Assemble a version's lineage document from MLflow, the cluster and the local state."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from roost import tracking
from roost.config import Settings
from roost.errors import ConfigError
from roost.lineage import mlflow_facts as facts

log = logging.getLogger(__name__)

SCHEMA = "roost.lineage/v1"


@dataclass(frozen=True)
class Ref:
    """A registered version named as NAME@ALIAS, NAME/VERSION or a models:/ URI."""

    model: str
    version: str | None
    alias: str | None

    def __str__(self) -> str:
        return f"{self.model}@{self.alias}" if self.alias else f"{self.model}/{self.version}"


def parse_ref(text: str) -> Ref:
    """``sentiment@champion``, ``sentiment/3``, ``models:/sentiment@champion`` -> Ref (pure)."""
    rest = text.strip().removeprefix("models:/").strip("/")
    if "@" in rest:
        model, alias = rest.split("@", 1)
        if model and alias and "/" not in model:
            return Ref(model, None, alias)
    elif "/" in rest:
        model, version = rest.split("/", 1)
        if model and version.isdigit():
            return Ref(model, str(int(version)), None)
    raise ConfigError(
        f"cannot read {text!r} as a model version: expected NAME@ALIAS, NAME/VERSION or "
        "models:/NAME@ALIAS | models:/NAME/VERSION"
    )


def build(
    settings: Settings,
    ref: Ref,
    cluster_api: Any = None,
    request: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The lineage document of ``ref`` (one JSON-ready dict; facts absent are in ``missing``)."""
    from roost.lineage import cluster, local
    from roost.registry import Registry

    uri = tracking.use(settings)
    reg = Registry(uri, ref.model)
    version = ref.version if ref.alias is None else reg.require_alias(ref.alias)
    assert version is not None
    missing: list[str] = []
    registered = facts.registered(reg, version, missing)  # NotFound: exit 3, one line
    tags = facts.version_tags(reg, version)
    run = facts.training_run(reg, registered["run_id"], missing)
    gate = facts.gate(tags, missing)
    related = facts.related_runs(reg, version)
    rollouts = facts.rollouts(reg, related, tags)
    if not rollouts:
        missing.append("no rollout recorded")
    extras = facts.features(related, tags, run["tune"] if run else None)
    for feature, label in (
        ("tune", "tuning study"), ("batch", "batch runs"), ("monitor", "monitoring report"),
    ):  # fmt: skip
        if not extras[feature]["recorded"]:
            missing.append(f"{label}: none recorded")

    job = run["k8s_job"] if run else None
    in_cluster = cluster.cluster_facts(settings, ref.model, version, job, api=cluster_api)
    if not in_cluster["configured"]:
        missing.append(f"images and InferenceServices: {cluster.NO_CLUSTER}")
    elif not in_cluster["images"]:
        missing.append("no image digest reported by the cluster for this version")
    if run and not job:
        missing.append("training ran outside Kubernetes (no Job recorded): no training image")
    local_servers = local.local_serving(settings, ref.model, version)

    return {
        "schema": SCHEMA,
        "ref": str(ref),
        "tracking_uri": uri,
        "request": request,
        "version": {**registered, "superseded_by": facts.superseded(tags)},
        "training_run": run,
        "gate": gate,
        "rollouts": rollouts,
        "images": {
            "configured": in_cluster["configured"],
            "note": in_cluster.get("note"),
            "containers": in_cluster["images"],
        },
        "serving": {
            "inference_services": in_cluster["serving"],
            "local": local_servers,
            "cluster_errors": in_cluster.get("errors", []),
        },
        "tuning": extras["tune"],
        "batch": extras["batch"],
        "monitoring": extras["monitor"],
        "missing": missing,
    }
