"""Retraining in the cluster: the watcher's ``retrain`` action as the chart's training Job.

The same path as ``roost train --on k8s`` (:mod:`roost.k8s_jobs`): the caller's training
settings become ``ROOST_*`` variables (``training_env``), the chart's Job template from the
templates ConfigMap is renamed and given them (``job_manifest``), ``run_job`` creates it and
follows its pods, and the run is found in MLflow by the Job's tag (``find_run``), never read
from a log.

What differs is only what the watcher needs:

* the training data (the reference sample plus the labelled logged texts) is uploaded to the
  event store's S3 prefix first (``<store>/retrain/<action>/data.parquet``), because a pod
  cannot read the watcher's disk;
* the Job's name comes from the action id (``roost-retrain-<id>``), so a watcher that was
  killed after creating the Job and restarted finds the Job (HTTP 409 on create) and follows
  it instead of training twice.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from roost.config import Settings
from roost.errors import ConfigError, Conflict

log = logging.getLogger(__name__)

JOB_PREFIX = "roost-retrain"
SUBMITTED_BY = "roost-monitor"
ACTION_LABEL = "roost.io/monitor-action"


def job_name(action_id: str) -> str:
    """A DNS-1123 name that is the same for every attempt of one action (pure)."""
    safe = "".join(c for c in action_id.lower() if c.isalnum())[:20]
    return f"{JOB_PREFIX}-{safe}"


def data_uri(store: str, action_id: str) -> str:
    if not store.startswith("s3://"):
        raise ConfigError(
            "monitor watch --on k8s: the training pod reads its data from S3; set "
            "monitor.store to an s3:// prefix"
        )
    return f"{store.rstrip('/')}/retrain/{action_id}/data.parquet"


def job_settings(settings: Settings, uri: str) -> Settings:
    """The watcher's settings with the uploaded data; the chart picks the checkpoint prefix."""
    out = settings.model_copy(deep=True)
    out.data.uri = uri
    out.data.text_column, out.data.label_column = "text", "label"
    out.data.max_rows = None
    out.train.checkpoint_dir = None
    return out


def retrain_job(settings: Settings, store: str, action_id: str, data: Path) -> str:
    """Upload ``data``, run (or rejoin) the action's training Job; returns its MLflow run id."""
    from roost import k8s, k8s_jobs, storage, tracking

    uri = data_uri(store, action_id)
    train_settings = job_settings(settings, uri)
    env = k8s_jobs.training_env(train_settings)  # bad settings fail before anything is created
    storage.write_bytes(uri, data.read_bytes())
    cfg = settings.k8s
    api = k8s.load_client(cfg.context)
    templates = k8s.read_templates(api, cfg.namespace, cfg.templates_configmap)
    base = k8s.template(templates, k8s.TEMPLATE_JOB, "Job")
    name = job_name(action_id)
    labels = {
        "roost.io/submitted-by": SUBMITTED_BY,
        ACTION_LABEL: name.removeprefix(f"{JOB_PREFIX}-"),
    }
    manifest = k8s_jobs.job_manifest(base, name, env, labels)

    def on_line(pod: str, line: str) -> None:
        log.info("%s %s", pod, line)

    def on_status(text: str) -> None:
        log.info("retraining Job %s/%s: %s", cfg.namespace, name, text)

    try:
        result = k8s_jobs.run_job(
            api, cfg.namespace, manifest, cfg.job_timeout_s, cfg.poll_s, on_line, on_status
        )
    except Conflict:
        # Created by this action before a restart: follow it, never create a second one.
        log.warning("retraining Job %s/%s exists: following it", cfg.namespace, name)
        result = _follow(api, cfg.namespace, name, cfg.job_timeout_s, cfg.poll_s, on_status)
    experiment = k8s_jobs.job_experiment(manifest) or settings.tracking.experiment
    run = k8s_jobs.find_run(tracking.resolve_uri(settings), experiment, name)
    log.info("retraining Job %s finished: run %s (%.0fs)", name, run.run_id, result.seconds)
    return run.run_id


def _follow(
    api: Any, namespace: str, name: str, timeout_s: float, poll_s: float, on_status: Any
) -> Any:
    import time

    from roost import k8s_jobs

    # run_job's own follower (pods, logs, failure reasons), without the create.
    return k8s_jobs._follow_job(  # the same follower as `train --on k8s`
        api, namespace, name, time.monotonic(), timeout_s, poll_s, None, on_status,
        time.sleep, time.monotonic, k8s_jobs.CONTAINER,
    )  # fmt: skip
