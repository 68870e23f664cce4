"""A study: its Optuna object, the objective (one nested MLflow run per trial), the worker
loop, and the parent run's summary (best params and value, trials CSV, plots).

Imported only by ``roost tune`` and its workers: it pulls in optuna, mlflow and torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages import fail_stale_trials as fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from roost import data, tracking
from roost.config import Settings, TuneSettings
from roost.errors import ConfigError, NotFound
from roost.train import EpochStats, run_training
from roost.tune import policy, space
from roost.tune.storage import open_storage, redact

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
WORKER_ATTR = "worker"
STATE_TAG = "roost.tune.state"
STUDY_TAG = "roost.tune.study"
TRIAL_TAG = "roost.tune.trial"
KIND_STUDY = "tune-study"
KIND_TRIAL = "tune-trial"
JOURNAL = "studies.journal"

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Heartbeats and the retry callback are "experimental" in optuna 5.0 (pinned): say it once, here.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def storage_url(settings: Settings) -> str:
    """The study storage: ``tune.storage`` or one journal file for all local studies."""
    return settings.tune.storage or str((settings.state_dir / "tune" / JOURNAL).resolve())


def direction(metric: str) -> Literal["minimize", "maximize"]:
    return "minimize" if metric == "val_loss" else "maximize"


def target_trials(cfg: TuneSettings) -> int:
    """Trials to finish: ``tune.trials``, at most the grid's size for a grid search."""
    if cfg.sampler == "grid":
        return min(cfg.trials, space.grid_size(cfg.space))
    return cfg.trials


def make_sampler(cfg: TuneSettings, salt: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler; ``salt`` (the worker's number) keeps parallel seeded workers apart."""
    if cfg.sampler == "grid":
        # Every worker must shuffle the grid alike: a trial's grid_id indexes that order.
        return optuna.samplers.GridSampler(space.grid(cfg.space), seed=cfg.seed)
    seed = None if cfg.seed is None else cfg.seed + salt
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(cfg.trials // 3, 2)))


def max_epochs(settings: Settings) -> int:
    param = settings.tune.space.get("train.epochs")
    if isinstance(param, space.IntParam):
        return param.high
    if isinstance(param, space.CategoricalParam):
        return max(int(c) for c in param.choices)
    return settings.train.epochs


def make_pruner(settings: Settings) -> optuna.pruners.BasePruner:
    cfg = settings.tune
    if cfg.pruner == "median":
        # Steps are epoch numbers, from 1: epochs 1..warmup_epochs are never pruned.
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_epochs + 1
        )
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max_epochs(settings), reduction_factor=3
        )
    return optuna.pruners.NopPruner()


def epoch_value(stats: EpochStats, metric: str) -> float:
    value: float = getattr(stats, metric)
    return value


# -- MLflow ----------------------------------------------------------------------------------


_CLIENTS: dict[tuple[str | None, str], Any] = {}


def _client(settings: Settings) -> Any:
    """One MlflowClient per tracking server (resolved and health-checked once)."""
    from mlflow import MlflowClient

    key = (settings.tracking.uri, str(settings.state_dir))
    if key not in _CLIENTS:
        uri = tracking.use(settings)
        _CLIENTS[key] = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return _CLIENTS[key]


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    from mlflow.exceptions import MlflowException

    try:
        return str(client.create_experiment(name))
    except MlflowException:  # created by another worker meanwhile
        return str(client.get_experiment_by_name(name).experiment_id)


def ensure_parent_run(settings: Settings) -> str:
    """The study's parent run: found by tags, or created (the oldest wins a creation race)."""
    client = _client(settings)
    cfg = settings.tune
    exp_id = _experiment_id(client, settings.tracking.experiment)
    query = f"tags.`roost.kind` = '{KIND_STUDY}' and tags.`{STUDY_TAG}` = '{cfg.study}'"

    def oldest() -> Any:
        found = client.search_runs(
            [exp_id], filter_string=query, order_by=["attributes.start_time ASC"], max_results=5
        )
        return min(found, key=lambda r: (r.info.start_time, r.info.run_id)) if found else None

    run = oldest()
    if run is None:
        created = client.create_run(
            exp_id,
            run_name=f"study-{cfg.study}",
            tags={"roost.kind": KIND_STUDY, STUDY_TAG: cfg.study},
        )
        params = {
            "tune.sampler": cfg.sampler,
            "tune.pruner": cfg.pruner,
            "tune.metric": cfg.metric,
            "tune.direction": direction(cfg.metric),
            "tune.trials": cfg.trials,
            "tune.parallel": cfg.parallel,
            "tune.storage": redact(storage_url(settings)),
            "data.uri": data.resolve_uri(settings.data),
            "data.max_rows": settings.data.max_rows,
        }
        client.log_batch(created.info.run_id, params=_params(params))
        client.log_text(
            created.info.run_id, json.dumps(space.dump(cfg.space), indent=2), "space.json"
        )
        run = oldest()
        if run.info.run_id != created.info.run_id:
            client.delete_run(created.info.run_id)
    elif run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")  # the study continues
    return str(run.info.run_id)


def _params(values: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def close_trial_run(settings: Settings, run_id: str, state: str, reason: str = "") -> None:
    """Tag a trial's run with its final state and end it (never left RUNNING)."""
    client = _client(settings)
    client.set_tag(run_id, STATE_TAG, state)
    if reason:
        client.set_tag(run_id, "roost.tune.reason", reason[:500])
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")
    client.set_terminated(run_id, status)


class StaleTrialHandler:
    """Heartbeat-stale trial: close its MLflow run, then queue a retry (Optuna's callback)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=settings.tune.max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get(RUN_ATTR)
        log.warning(
            "trial lost its worker study=%s trial=%d worker=%s run_id=%s",
            study.study_name, trial.number, trial.user_attrs.get(WORKER_ATTR), run_id,
        )  # fmt: skip
        if run_id:
            close_trial_run(self.settings, str(run_id), "FAIL", "worker lost (no heartbeat)")
        self.retry(study, trial)


def fail_trials_of(settings: Settings, study: optuna.Study, workers: set[str]) -> list[int]:
    """Fail the running trials of stopped ``workers`` now (their runs closed, retries queued)
    instead of waiting ``grace_s`` for their heartbeats to go stale."""
    handler = StaleTrialHandler(settings)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(WORKER_ATTR) not in workers:
            continue
        try:
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it ended meanwhile
        handler(study, study._storage.get_trial(trial._trial_id))
        failed.append(trial.number)
    return failed


# -- the study -------------------------------------------------------------------------------


def open_study(settings: Settings, salt: int = 0) -> optuna.Study:
    """Create the study once or load it (``load_if_exists``): rerunning continues it."""
    cfg = settings.tune
    storage = open_storage(
        storage_url(settings), cfg.heartbeat_s, cfg.grace_s, StaleTrialHandler(settings)
    )
    return optuna.create_study(
        study_name=cfg.study,
        storage=storage,
        sampler=make_sampler(cfg, salt),
        pruner=make_pruner(settings),
        direction=direction(cfg.metric),
        load_if_exists=True,
    )


def warm_start(settings: Settings, study: optuna.Study) -> int:
    """Enqueue the best ``warm_start_top`` complete trials of ``tune.warm_start`` (same storage)."""
    cfg = settings.tune
    if not cfg.warm_start:
        return 0
    storage: BaseStorage = study._storage  # the same storage holds the earlier study
    try:
        earlier = optuna.load_study(study_name=cfg.warm_start, storage=storage)
    except KeyError:
        raise NotFound(f"--warm-start {cfg.warm_start}: no such study in the storage") from None
    done = [t for t in earlier.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    reverse = earlier.direction == optuna.study.StudyDirection.MAXIMIZE
    best = sorted(done, key=lambda t: t.value or 0.0, reverse=reverse)[: cfg.warm_start_top]
    queued = 0
    for trial in best:
        params = {k: v for k, v in trial.params.items() if k in cfg.space}
        study.enqueue_trial(
            params, user_attrs={"warm_start_from": trial.number}, skip_if_exists=True
        )
        queued += 1
    return queued


def trial_views(study: optuna.Study) -> list[policy.TrialView]:
    return [
        policy.TrialView(
            t.number,
            t.state.name,
            tuple(t.system_attrs.get(policy.RETRY_HISTORY_ATTR) or ()),
        )
        for t in study.get_trials(deepcopy=False)
    ]


def trial_settings(settings: Settings, values: dict[str, Any]) -> Settings:
    """The base settings with a trial's values on top (checked like any settings)."""
    base = settings.model_dump(mode="python")
    for section, fields in space.overrides(values).items():
        base[section].update(fields)
    base["train"]["checkpoint_dir"] = None
    return Settings.model_validate(base)


def worker_salt(index: int | None) -> int:
    """The worker's number (local workers), else a number from the pod's name (in a pod,
    every worker may be pid 1): seeded samplers stay reproducible with one local worker."""
    if index is not None:
        return index
    return zlib.crc32(worker_id().encode()) % 100_003


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Objective:
    """One trial: train with the drawn values, report ``metric`` per epoch, log a child run."""

    def __init__(self, settings: Settings, splits: data.Splits, parent_run_id: str) -> None:
        self.settings = settings
        self.splits = splits
        self.parent_run_id = parent_run_id
        self.worker = worker_id()

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = self.settings.tune
        trial.set_user_attr(WORKER_ATTR, self.worker)  # first: a stopped worker's trial is known
        values = space.suggest(trial, cfg.space)
        settings = trial_settings(self.settings, values)
        client = _client(settings)
        exp_id = _experiment_id(client, settings.tracking.experiment)
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "roost.kind": KIND_TRIAL,
            STUDY_TAG: cfg.study,
            TRIAL_TAG: str(trial.number),
            STATE_TAG: "RUNNING",
            "roost.tune.worker": self.worker,
        }
        run = client.create_run(exp_id, run_name=f"{cfg.study}-trial-{trial.number}", tags=tags)
        run_id = run.info.run_id
        trial.set_user_attr(RUN_ATTR, run_id)
        reported: list[float] = []

        def after_epoch(stats: EpochStats) -> None:
            value = epoch_value(stats, cfg.metric)
            reported.append(value)
            trial.report(value, stats.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"pruned after epoch {stats.epoch} ({cfg.metric}={value:.4f})"
                )

        try:
            outcome = run_training(
                settings, splits=self.splits, run_id=run_id, tags=tags, after_epoch=after_epoch
            )
        except optuna.TrialPruned as exc:
            close_trial_run(settings, run_id, "PRUNED", str(exc))
            raise
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", reason[:500])
            log.warning("trial failed study=%s trial=%d error=%s", cfg.study, trial.number, reason)
            close_trial_run(settings, run_id, "FAIL", reason)
            raise
        best = outcome.history[outcome.best_epoch - 1]
        value = epoch_value(best, cfg.metric)
        trial.set_user_attr("test_macro_f1", outcome.test.macro_f1)
        trial.set_user_attr("epochs_run", len(outcome.history))
        close_trial_run(settings, run_id, "COMPLETE")
        client.log_metric(run_id, "tune_value", value)
        return value


@dataclass
class WorkerReport:
    trials_run: int = 0
    reason: str = ""
    study: optuna.Study | None = None


def trial_line(trial: FrozenTrial, tally: policy.Tally, target: int, metric: str) -> str:
    """One line per finished trial in a worker's log (``roost tune --on k8s`` reads it back)."""
    value = (
        trial.value
        if trial.value is not None
        else (
            trial.intermediate_values[max(trial.intermediate_values)]
            if trial.intermediate_values
            else None
        )
    )
    shown = f"{value:.4f}" if value is not None else "-"
    return (
        f"trial {trial.number} {trial.state.name} {metric}={shown} "
        f"epochs={len(trial.intermediate_values)} finished={tally.finished}/{target}"
    )


def work(
    settings: Settings,
    stop: threading.Event | None = None,
    on_trial: Callable[[str], None] | None = None,
) -> WorkerReport:
    """A worker: run trials until the study has its finished trials (or time/stop ends it).

    ``on_trial`` gets :func:`trial_line` for each trial this worker finished.
    """
    cfg = settings.tune
    stop = stop or threading.Event()
    study = open_study(settings, salt=worker_salt(cfg.worker))
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if not parent:
        parent = ensure_parent_run(settings)
        study.set_user_attr(PARENT_RUN_ATTR, parent)
    splits = data.load_splits(settings.data)
    objective = Objective(settings, splits, str(parent))
    started = time.monotonic()
    target = target_trials(cfg)
    report = WorkerReport()
    while not stop.is_set():
        fail_stale_trials(study)
        out_of_time = cfg.timeout_s is not None and time.monotonic() - started > cfg.timeout_s
        action = policy.next_action(policy.tally(trial_views(study)), target, out_of_time)
        if action == "done":
            report.reason = "timeout" if out_of_time else "study finished"
            break
        if action == "wait":
            stop.wait(cfg.poll_s)
            continue
        before = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        report.trials_run += 1
        if on_trial is not None:
            trials = study.get_trials(deepcopy=False)
            tally = policy.tally(trial_views(study))
            for t in trials:
                mine = t.user_attrs.get(WORKER_ATTR) == objective.worker
                if mine and t.state.is_finished() and t.number not in before:
                    on_trial(trial_line(t, tally, target, cfg.metric))
    report.study = study
    return report


def is_finalizer(study: optuna.Study, worker: str) -> bool:
    """Whether ``worker`` finished the study's last trial: the one worker that summarises it."""
    views = trial_views(study)
    if not policy.study_done(policy.tally(views), 0):
        return False
    done = [
        t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.datetime_complete
    ]
    if not done:
        return False
    last = max(done, key=lambda t: (t.datetime_complete, t.number))
    return bool(last.user_attrs.get(WORKER_ATTR) == worker)


# -- the summary -----------------------------------------------------------------------------


@dataclass
class StudySummary:
    study: str
    storage: str
    parent_run_id: str
    target: int
    complete: int
    pruned: int
    failed: int
    retried: int
    epochs_run: int
    best: dict[str, Any] | None
    seconds: float = 0.0
    plots: list[str] = field(default_factory=list)
    promotion: dict[str, Any] | None = None
    errors: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "storage": self.storage,
            "parent_run_id": self.parent_run_id,
            "trials": {
                "target": self.target,
                "complete": self.complete,
                "pruned": self.pruned,
                "failed": self.failed,
                "retried": self.retried,
            },
            "epochs_run": self.epochs_run,
            "best": self.best,
            "plots": self.plots,
            "errors": {str(k): v for k, v in self.errors.items()},
            "seconds": round(self.seconds, 1),
            "promotion": self.promotion,
        }


def epochs_run(trials: list[FrozenTrial]) -> int:
    """Epochs trained over all trials (each reported one intermediate value per epoch)."""
    return sum(len(t.intermediate_values) for t in trials)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not done:
        return None
    return study.best_trial


# plot name -> (optuna.visualization.matplotlib function, complete trials it needs)
PLOTS = {
    "optimization_history": ("plot_optimization_history", 1),
    "parallel_coordinate": ("plot_parallel_coordinate", 1),
    "param_importances": ("plot_param_importances", 2),
}


def summarize(settings: Settings, study: optuna.Study) -> StudySummary:
    """Log the study's result on its parent run and end it: best params/value, CSV, plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.exceptions import MlflowException
    from optuna.visualization import matplotlib as ovm

    cfg = settings.tune
    parent = str(study.user_attrs.get(PARENT_RUN_ATTR) or ensure_parent_run(settings))
    client = _client(settings)
    trials = study.get_trials(deepcopy=False)
    counts = policy.tally(trial_views(study))
    best = best_trial(study)
    summary = StudySummary(
        study=cfg.study,
        storage=redact(storage_url(settings)),
        parent_run_id=parent,
        target=target_trials(cfg),
        complete=counts.complete,
        pruned=counts.pruned,
        failed=counts.failed,
        retried=counts.retried,
        epochs_run=epochs_run(trials),
        best=None,
        errors={
            t.number: str(t.user_attrs.get("error", "worker lost"))
            for t in trials
            if t.state == TrialState.FAIL
        },
    )
    metrics: dict[str, float] = {
        "trials_complete": counts.complete,
        "trials_pruned": counts.pruned,
        "trials_failed": counts.failed,
        "trials_retried": counts.retried,
        "epochs_run": summary.epochs_run,
    }
    if best is not None:
        summary.best = {
            "trial": best.number,
            "value": best.value,
            "metric": cfg.metric,
            "params": best.params,
            "run_id": best.user_attrs.get(RUN_ATTR),
            "test_macro_f1": best.user_attrs.get("test_macro_f1"),
        }
        metrics.update({"best_value": float(best.value or math.nan), "best_trial": best.number})
        tags = {f"best.{k}": str(v) for k, v in best.params.items()}
        tags["roost.tune.best_run_id"] = str(best.user_attrs.get(RUN_ATTR))
        for key, value in tags.items():
            client.set_tag(parent, key, value)
        try:  # params are write-once in MLflow: a continued study keeps them as tags only
            client.log_batch(
                parent, params=_params({f"best.{k}": v for k, v in best.params.items()})
            )
        except MlflowException:
            log.info("best params of study=%s changed; see the best.* tags", cfg.study)
        client.log_dict(
            parent,
            {"trial": best.number, "value": best.value, "params": best.params},
            "best_params.json",
        )
    client.log_batch(parent, metrics=[_metric(k, float(v)) for k, v in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "trials.csv"
        study.trials_dataframe().to_csv(csv, index=False)
        client.log_artifact(parent, str(csv))
    for name, (function, needed) in PLOTS.items():
        if counts.complete < needed:
            continue
        try:
            axes = getattr(ovm, function)(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info("plot skipped plot=%s reason=%s", name, exc)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        client.log_figure(parent, figure, f"plots/{name}.png")
        plt.close(figure)
        summary.plots.append(f"plots/{name}.png")
    client.set_terminated(parent, "FINISHED")
    return summary


def _metric(key: str, value: float) -> Any:
    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), 0)


def promote_best(settings: Settings, summary: StudySummary) -> dict[str, Any]:
    """Register the best complete trial's own model and gate it (moves ``challenger`` on pass)."""
    from roost import registry

    if summary.best is None or not summary.best.get("run_id"):
        raise NotFound(f"study {summary.study} has no complete trial to promote")
    result = registry.promote(
        settings, run_id=str(summary.best["run_id"]), alias=settings.registry.challenger_alias
    )
    return result.summary()


def check_space_for_sampler(cfg: TuneSettings) -> None:
    """Fail before any worker starts: a grid needs a finite space."""
    if cfg.sampler == "grid":
        space.grid(cfg.space)
    if not cfg.space:
        raise ConfigError("tune.space: empty")


def summary_line(summary: StudySummary) -> str:
    best = summary.best
    if best is None:
        return f"study {summary.study} done: no complete trial"
    return (
        f"study {summary.study} done: best trial {best['trial']} {best['metric']}="
        f"{best['value']:.4f} run {best['run_id']} parent {summary.parent_run_id}"
    )
