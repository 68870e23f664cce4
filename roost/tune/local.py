"""``roost tune`` on one machine: K worker processes sharing the study's journal file.

The parent creates (or loads) the study and its MLflow parent run, starts K
``roost tune-worker`` processes with the settings in their environment, and then only
watches: it reports trial progress, fails trials whose worker stopped beating (and so
closes their MLflow run and queues the retry), starts a new worker in place of one that
died while trials remain, and finally logs the study's summary on the parent run.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roost import proc, tracking
from roost.config import Settings
from roost.errors import RoostError
from roost.tune import policy
from roost.tune import study as st

log = logging.getLogger(__name__)

ENV_SECTIONS = ("data", "model", "train", "tune", "registry")


@dataclass(frozen=True)
class TrialRow:
    """One trial as the progress display shows it."""

    number: int
    state: str
    params: dict[str, Any]
    value: float | None
    epoch: int | None
    retry_of: int | None


@dataclass(frozen=True)
class Progress:
    rows: list[TrialRow]
    tally: policy.Tally
    target: int
    best_number: int | None
    best_value: float | None
    workers: int
    maximize: bool = True


ProgressHandler = Callable[[Progress], None]


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def worker_env(settings: Settings, tracking_uri: str | None) -> dict[str, str]:
    """The settings a worker needs as ROOST_* variables (only what differs from defaults)."""
    env: dict[str, str] = {"ROOST_STATE_DIR": str(settings.state_dir.resolve())}
    for section in ENV_SECTIONS:
        values = getattr(settings, section).model_dump(
            mode="json", exclude_defaults=True, exclude={"space", "space_file", "worker"}
        )
        for key, value in sorted(values.items()):
            if value is not None:
                env[f"ROOST_{section.upper()}__{key.upper()}"] = _env_value(value)
    env["ROOST_TUNE__SPACE"] = json.dumps(
        {k: v.model_dump(mode="json") for k, v in settings.tune.space.items()}
    )
    env["ROOST_TUNE__STORAGE"] = st.storage_url(settings)
    env["ROOST_TRACKING__EXPERIMENT"] = settings.tracking.experiment
    if tracking_uri:
        env["ROOST_TRACKING__URI"] = tracking_uri
    return env


def progress_of(study: Any, target: int, workers: int) -> Progress:
    from optuna.trial import TrialState

    rows = []
    best_number: int | None = None
    best_value: float | None = None
    maximize = st.direction(study.user_attrs.get("metric", "val_macro_f1")) == "maximize"
    for t in study.get_trials(deepcopy=False):
        history = t.system_attrs.get(policy.RETRY_HISTORY_ATTR) or []
        value = t.value if t.state == TrialState.COMPLETE else None
        if value is not None and (
            best_value is None or (value > best_value if maximize else value < best_value)
        ):
            best_number, best_value = t.number, value
        last = max(t.intermediate_values) if t.intermediate_values else None
        shown = value
        if shown is None and last is not None:
            shown = t.intermediate_values[last]
        rows.append(
            TrialRow(
                t.number,
                t.state.name,
                dict(t.params),
                shown,
                last,
                history[-1] if history else None,
            )
        )
    return Progress(
        rows,
        policy.tally(st.trial_views(study)),
        target,
        best_number,
        best_value,
        workers,
        maximize,
    )


def run(
    settings: Settings,
    on_progress: ProgressHandler | None = None,
    stop: threading.Event | None = None,
) -> st.StudySummary:
    """Run (or continue) the study with ``tune.parallel`` worker processes; summarise it."""
    cfg = settings.tune
    stop = stop or threading.Event()
    st.check_space_for_sampler(cfg)
    started = time.monotonic()
    uri = tracking.use(settings)
    study = st.open_study(settings)
    study.set_user_attr("metric", cfg.metric)
    st.warm_start(settings, study)
    if not study.user_attrs.get(st.PARENT_RUN_ATTR):
        study.set_user_attr(st.PARENT_RUN_ATTR, st.ensure_parent_run(settings))
    else:
        st.ensure_parent_run(settings)  # marks a continued study's run RUNNING again
    target = st.target_trials(cfg)
    env = worker_env(settings, uri)
    logs_dir = settings.state_dir / "tune" / "logs"
    workers: list[proc.Background] = []
    spawned = 0
    max_spawns = cfg.parallel * (cfg.max_retry + 2)

    def spawn() -> None:
        nonlocal spawned
        spawned += 1
        log_file = logs_dir / f"{cfg.study}-worker-{spawned}.log"
        worker = proc.start_background(
            [sys.executable, "-m", "roost", "tune-worker"],
            log_file,
            env={**env, "ROOST_TUNE__WORKER": str(spawned - 1)},
        )
        log.info("worker started study=%s pid=%d log=%s", cfg.study, worker.pid, log_file)
        workers.append(worker)

    previous = _stop_on_sigterm(stop)
    try:
        while True:
            st.fail_stale_trials(study)  # also covers a lone worker that died mid-trial
            tally = policy.tally(st.trial_views(study))
            for worker in [w for w in workers if not w.alive()]:
                workers.remove(worker)
                code = worker.popen.returncode if worker.popen is not None else None
                if code != 0:
                    log.warning(
                        "worker died pid=%d code=%s log=%s", worker.pid, code, worker.log_file
                    )
            out_of_time = cfg.timeout_s is not None and time.monotonic() - started > cfg.timeout_s
            action = policy.next_action(tally, target, out_of_time)
            if on_progress is not None:
                on_progress(progress_of(study, target, len(workers)))
            if stop.is_set() or (action == "done" and not workers):
                break
            if action != "done":
                while len(workers) < cfg.parallel and spawned < max_spawns:
                    spawn()  # the first K, and one in place of each that died
                if not workers:
                    raise RoostError(
                        f"tuning workers keep failing ({spawned} started); see the logs "
                        f"in {logs_dir}"
                    )
            stop.wait(cfg.poll_s)
    finally:
        stopped = {f"{socket.gethostname()}:{w.pid}" for w in workers if w.alive()}
        for worker in workers:
            if worker.alive():
                worker.stop(timeout=10)
        if stopped:
            st.fail_trials_of(settings, study, stopped)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if on_progress is not None:
        on_progress(progress_of(study, target, 0))
    summary = st.summarize(settings, study)
    summary.seconds = time.monotonic() - started
    return summary


def _stop_on_sigterm(stop: threading.Event) -> Any:
    """SIGTERM ends the watch loop like Ctrl-C, so the workers are stopped, not orphaned."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())


def worker_main(settings: Settings, summarize: bool = False) -> int:
    """Entry point of one worker process (``roost tune-worker``).

    With ``summarize`` (the cluster's workers: no parent process watches them), the worker
    that finished the study's last trial logs the summary and, with ``tune.promote``, gates
    the best trial's model.
    """
    report = st.work(settings, on_trial=lambda line: print(line, flush=True))
    log.info("worker done trials=%d reason=%s", report.trials_run, report.reason)
    study = report.study
    if summarize and study is not None and st.is_finalizer(study, st.worker_id()):
        summary = st.summarize(settings, study)
        if settings.tune.promote:
            summary.promotion = st.promote_best(settings, summary)
        print(st.summary_line(summary), flush=True)
        print("summary " + json.dumps(summary.to_dict(), default=str), flush=True)
    return 0


def log_path(settings: Settings) -> Path:
    return settings.state_dir / "tune" / "logs"
