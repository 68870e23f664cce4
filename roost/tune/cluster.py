"""``roost tune --on k8s``: the study's workers as one Job built from the chart's template.

The chart renders ``tuning-job.yaml`` into the templates ConfigMap (the same path as the
training Job): image, resources, GPU, backoff, and the Optuna storage as a Secret reference.
This module renames it, sets ``parallelism`` to ``--parallel``, adds the caller's settings as
``ROOST_*`` variables (never the storage URL: it only comes from the Secret), submits it and
streams the workers' logs, reading each ``trial ...`` line back as progress.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from roost import k8s, k8s_jobs
from roost.config import Settings
from roost.errors import ConfigError

TEMPLATE = "tuning-job.yaml"
CONTAINER = "tune"
# Settings of the tune section that a worker pod gets from the caller (storage: never).
TUNE_FIELDS = (
    "study", "trials", "sampler", "pruner", "metric", "timeout_s", "seed", "heartbeat_s",
    "grace_s", "max_retry", "warm_start", "warm_start_top", "startup_trials", "warmup_epochs",
    "promote",
)  # fmt: skip
TRIAL_LINE = re.compile(
    r"^trial (?P<number>\d+) (?P<state>[A-Z]+) (?P<metric>\w+)=(?P<value>[-0-9.]+|-) "
    r"epochs=(?P<epochs>\d+) finished=(?P<finished>\d+)/(?P<target>\d+)"
)
SUMMARY_LINE = re.compile(r"^summary (?P<json>\{.*\})$")


def job_name(study: str, now: float | None = None) -> str:
    """roost-tune-<study>-20250101-120000-ab12, cut to a valid Job name (<= 63 chars)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now if now is not None else time.time()))
    slug = re.sub(r"[^a-z0-9-]+", "-", study.lower()).strip("-")[:20].strip("-") or "study"
    return f"roost-tune-{slug}-{stamp}-{secrets.token_hex(2)}"


def worker_env(settings: Settings) -> list[dict[str, str]]:
    """The caller's settings for the worker pods (pure): training sections + the study's."""
    if settings.tune.storage is not None:
        raise ConfigError(
            "tune.storage: in the cluster the workers read the storage from the chart's Secret "
            "(tuning.storage); unset it so no credential ends up in the Job spec"
        )
    env = k8s_jobs.training_env(settings)  # refuses local data paths
    cfg = settings.tune
    defaults = type(cfg)()
    for name in TUNE_FIELDS:
        value = getattr(cfg, name)
        if name == "study" or value != getattr(defaults, name):
            if value is None:
                continue
            env.append({"name": f"ROOST_TUNE__{name.upper()}", "value": k8s_jobs._env_value(value)})
    env.append(
        {
            "name": "ROOST_TUNE__SPACE",
            "value": json.dumps({k: v.model_dump(mode="json") for k, v in cfg.space.items()}),
        }
    )
    env.append({"name": "ROOST_TUNE__PARALLEL", "value": str(cfg.parallel)})
    return env


def tuning_manifest(base: dict[str, Any], name: str, settings: Settings) -> dict[str, Any]:
    """The chart's tuning Job renamed, with the study's settings and ``parallelism`` (pure)."""
    manifest = k8s_jobs.job_manifest(
        base, name, worker_env(settings), {"roost.io/submitted-by": "roost-cli"}, CONTAINER
    )
    manifest["spec"]["parallelism"] = settings.tune.parallel
    manifest["spec"].pop("completions", None)  # a work queue: done when a worker exits 0
    return manifest


@dataclass
class TuneReport:
    """What the workers' logs said: finished trials and the study's summary."""

    trials: dict[int, dict[str, Any]] = field(default_factory=dict)
    finished: int = 0
    target: int = 0
    best: tuple[int, float] | None = None
    summary: dict[str, Any] | None = None

    def feed(self, line: str, maximize: bool = True) -> bool:
        """Read one log line; True when it changed the report (pure)."""
        text = line.strip()
        if m := TRIAL_LINE.match(text):
            number = int(m["number"])
            value = None if m["value"] == "-" else float(m["value"])
            self.trials[number] = {"state": m["state"], "value": value, "epochs": int(m["epochs"])}
            self.finished = max(self.finished, int(m["finished"]))
            self.target = int(m["target"])
            if m["state"] == "COMPLETE" and value is not None and self._better(value, maximize):
                self.best = (number, value)
            return True
        if m := SUMMARY_LINE.match(text):
            self.summary = json.loads(m["json"])
            return True
        return False

    def _better(self, value: float, maximize: bool) -> bool:
        if self.best is None:
            return True
        return value > self.best[1] if maximize else value < self.best[1]


@dataclass
class ClusterStudy:
    job: k8s_jobs.JobResult
    report: TuneReport

    def to_dict(self) -> dict[str, Any]:
        r = self.report
        return {
            "job": self.job.name,
            "namespace": self.job.namespace,
            "succeeded": self.job.state.phase == "succeeded",
            "pods": self.job.pods,
            "finished": r.finished,
            "target": r.target,
            "best": {"trial": r.best[0], "value": r.best[1]} if r.best else None,
            "summary": r.summary,
            "seconds": round(self.job.seconds, 1),
        }


def run(
    settings: Settings,
    name: str,
    on_trial: Callable[[str, str, TuneReport], None] | None = None,
    on_status: Callable[[str, TuneReport], None] | None = None,
) -> ClusterStudy:
    """Submit the worker Job ``name``, follow its pods' logs until it ends, return the result."""
    from roost.tune.study import direction, target_trials

    cfg = settings.k8s
    maximize = direction(settings.tune.metric) == "maximize"
    worker_env(settings)  # bad settings fail before any API call
    api = k8s.load_client(cfg.context)
    templates = k8s.read_templates(api, cfg.namespace, cfg.templates_configmap)
    manifest = tuning_manifest(k8s.template(templates, TEMPLATE, "Job"), name, settings)
    report = TuneReport(target=target_trials(settings.tune))

    def line_seen(pod: str, line: str) -> None:
        if report.feed(line, maximize) and on_trial is not None and TRIAL_LINE.match(line.strip()):
            on_trial(pod, line.strip(), report)

    def status_seen(text: str) -> None:
        if on_status is not None:
            on_status(text, report)

    job = k8s_jobs.run_job(
        api, cfg.namespace, manifest, cfg.job_timeout_s, cfg.poll_s, line_seen, status_seen,
        container=CONTAINER,
    )  # fmt: skip
    return ClusterStudy(job, report)
