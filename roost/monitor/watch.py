"""``roost monitor watch``: judge each closed window; after K breaches in a row, act.

Same discipline as the rollout controller (``roost.rollout.store``):

- the state is one JSON document (:class:`WatchState`), written atomically under a file
  lock with a compare-and-swap on ``revision``;
- one watcher drives at a time: it holds a lease (owner + expiry) that it renews every
  step; a second watcher waits until the lease expires (its holder died);
- the decision (:func:`decide`, pure) is saved as ``pending`` *before* any effect, with an
  action id; every effect is looked up by that id before it is done again (the training
  run and the model version are tagged ``roost.monitor.action_id``), so a watcher killed
  at any point and restarted finishes the same action: one retraining, not two.

Actions: ``alert`` (a log line, the ``roost_monitor_triggers_total`` counter, the record)
and ``retrain``: train on the reference data plus the labelled feedback (in-process), then
``promote --to challenger`` (the rollout controller takes it from there). Every trigger is
recorded as an MLflow run in ``monitor.experiment`` and as ``roost.monitor.trigger*`` tags
on the judged version. A cooldown follows every action.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roost.config import MonitorSettings, Settings
from roost.errors import Conflict
from roost.monitor.report import BREACH, OK, Window
from roost.rollout.store import atomic_write, file_lock

log = logging.getLogger(__name__)

ACTION_TAG = "roost.monitor.action_id"
TRIGGER_TAG = "roost.monitor.trigger"
HISTORY = 20


@dataclass(frozen=True)
class Pending:
    """A decided action, saved before anything is done about it."""

    id: str
    action: str
    version: str
    breached: list[str]
    values: dict[str, float | None]
    windows: list[str]
    decided_at: float
    run_id: str | None = None
    new_version: str | None = None


@dataclass(frozen=True)
class WatchState:
    model: str
    revision: int = 0
    owner: str | None = None
    lease_until: float = 0.0
    last_window_end: str | None = None
    consecutive: int = 0
    breach_windows: list[str] = field(default_factory=list)
    cooldown_until: float = 0.0
    pending: Pending | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def dumps(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def loads(cls, text: str) -> WatchState:
        doc = json.loads(text)
        pending = doc.pop("pending", None)
        return cls(**doc, pending=Pending(**pending) if pending else None)


# -- the policy (pure) -----------------------------------------------------------------------
def decide(
    state: WatchState,
    windows: list[Window],
    version: str,
    cfg: MonitorSettings,
    now: float,
    action_id: str,
) -> WatchState:
    """Fold the closed windows after ``state.last_window_end`` into the state.

    A breached window counts, a passing one resets the count, an insufficient one does
    neither (it is no evidence either way, and never a pass). At ``cfg.consecutive`` breaches
    in a row, out of cooldown and with nothing pending, the action becomes ``pending``.
    """
    consecutive, breach_windows, last = state.consecutive, list(state.breach_windows), None
    pending = state.pending
    for window in windows:
        if not window.closed or (state.last_window_end and window.end <= state.last_window_end):
            continue
        last = window.end
        verdict = window.verdict
        if verdict == BREACH:
            consecutive += 1
            breach_windows.append(window.start)
        elif verdict == OK:
            consecutive, breach_windows = 0, []
        if consecutive >= cfg.consecutive and pending is None and now >= state.cooldown_until:
            values = {
                name: stat.value
                for name, stat in window.statistics.items()
                if name in window.breached()
            }
            if "live_accuracy" in window.breached():
                values["live_accuracy"] = window.live.get("accuracy")
            pending = Pending(
                id=action_id, action=cfg.action, version=version, breached=window.breached(),
                values=values, windows=breach_windows[-cfg.consecutive:], decided_at=now,
            )  # fmt: skip
            consecutive, breach_windows = 0, []
    if last is None:
        return state
    return dataclasses.replace(
        state, last_window_end=last, consecutive=consecutive,
        breach_windows=breach_windows[-cfg.consecutive:], pending=pending,
    )  # fmt: skip


def finish(state: WatchState, now: float, cooldown_s: float, outcome: dict[str, Any]) -> WatchState:
    """The pending action is done: record it, start the cooldown."""
    assert state.pending is not None
    entry = {**dataclasses.asdict(state.pending), **outcome, "finished_at": now}
    return dataclasses.replace(
        state, pending=None, cooldown_until=now + cooldown_s,
        history=[*state.history, entry][-HISTORY:],
    )  # fmt: skip


# -- the state file ------------------------------------------------------------------------
class StateFile:
    """``<store>/watch/<model>.json`` under a file lock; saves are compare-and-swap."""

    def __init__(self, directory: Path, model: str) -> None:
        self.directory = directory
        self.path = directory / f"{model}.json"
        self.lock_file = directory / f".{model}.lock"
        self.model = model

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with file_lock(self.lock_file):
            yield

    def _read(self) -> WatchState:
        try:
            return WatchState.loads(self.path.read_text())
        except FileNotFoundError:
            return WatchState(self.model)

    def load(self) -> WatchState:
        with self.locked():
            return self._read()

    def save(self, state: WatchState) -> WatchState:
        with self.locked():
            current = self._read()
            if current.revision != state.revision:
                raise Conflict(
                    f"watch state of {self.model} changed since it was read "
                    f"(revision {current.revision}, ours {state.revision})"
                )
            stored = dataclasses.replace(state, revision=state.revision + 1)
            atomic_write(self.path, stored.dumps())
            return stored

    def acquire(self, owner: str, lease_s: float, now: float) -> WatchState | None:
        """Take or renew the lease; None while another live watcher holds it."""
        with self.locked():
            current = self._read()
            if current.owner not in (None, owner) and current.lease_until > now:
                return None
            stored = dataclasses.replace(
                current, owner=owner, lease_until=now + lease_s, revision=current.revision + 1
            )
            atomic_write(self.path, stored.dumps())
            return stored


# -- effects ---------------------------------------------------------------------------------
class _TagRun:
    """Training progress hook: tags the run with the action id as soon as it exists."""

    def __init__(self, action_id: str) -> None:
        self.action_id = action_id

    def epoch_started(self, epoch: int, epochs: int, batches: int) -> None:
        import mlflow

        mlflow.set_tag(ACTION_TAG, self.action_id)

    def batch_done(self, loss: float) -> None:
        pass

    def epoch_done(self, stats: Any) -> None:
        pass


def retrain_data(settings: Settings, store: str | Path, out: Path) -> tuple[Path, int]:
    """The reference data (its configured sample) plus every labelled logged text, as Parquet."""
    import pandas as pd

    from roost import data
    from roost.monitor.report import load_feedback, load_traffic

    cfg = settings.data
    frame = data.clean(
        data.read_table(data.resolve_uri(cfg), cfg.encoding),
        cfg.text_column, cfg.label_column, cfg.dedupe,
    )  # fmt: skip
    if cfg.max_rows is not None and cfg.max_rows < len(frame):
        frame = data._stratified_sample(frame, cfg.max_rows, cfg.seed)
    feedback = load_feedback(store)
    traffic = load_traffic(
        store, settings.registry.model_name, dt.datetime.fromtimestamp(0, dt.UTC)
    )
    labelled = (
        traffic[traffic.key.isin(feedback) & traffic.text.notna()] if len(traffic) else traffic
    )
    extra = pd.DataFrame(
        {data.TEXT: labelled.text.tolist() if len(labelled) else [],
         data.LABEL: [feedback[k] for k in labelled.key] if len(labelled) else []}
    )  # fmt: skip
    combined = pd.concat([frame[[data.TEXT, data.LABEL]], extra], ignore_index=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    combined.rename(columns={data.TEXT: "text", data.LABEL: "label"}).to_parquet(out, index=False)
    return out, len(extra)


class Watcher:
    """One watcher process: evaluate, decide, act, record."""

    def __init__(
        self,
        settings: Settings,
        store: str | Path,
        workdir: Path | None = None,
        receiver: str | None = None,
    ) -> None:
        """``store``: the Parquet parts (a directory or ``s3://``); ``workdir``: the local
        directory of the watch state and retraining data (default: ``store``, if local)."""
        from roost import tracking

        self.settings = settings
        self.cfg = settings.monitor
        self.store = str(store)
        if workdir is None:
            if self.store.startswith("s3://"):
                raise ValueError("a watcher over an s3:// store needs a local workdir")
            workdir = Path(self.store)
        self.workdir = workdir
        self.receiver = receiver
        self.model = settings.registry.model_name
        self.states = StateFile(workdir / "watch", self.model)
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
        self.tracking_uri = tracking.use(settings)
        self._profiles: dict[str, tuple[str, Any]] = {}

    # one iteration: returns the state after it (None: another watcher holds the lease)
    def step(self, now: float | None = None) -> WatchState | None:
        now = time.time() if now is None else now
        state = self.states.acquire(self.owner, self.cfg.lease_s, now)
        if state is None:
            return None
        if state.pending is not None:
            return self.act(state)
        from roost.monitor import report as reports
        from roost.registry import Registry

        alias = self.settings.registry.champion_alias
        version = Registry(self.tracking_uri, self.model).require_alias(alias)
        if version not in self._profiles:  # one download per judged version
            self._profiles[version] = reports.resolve_version(
                self.tracking_uri, self.model, version, None
            )[1:]
        run_id, reference = self._profiles[version]
        if self.receiver:
            reports.flush_receiver(self.receiver)
        moment = dt.datetime.fromtimestamp(now, dt.UTC)
        since = (
            dt.datetime.fromisoformat(state.last_window_end)
            if state.last_window_end
            else moment - dt.timedelta(seconds=self.cfg.window_s * 2)
        )
        result = reports.make_report(
            self.store, self.model, version, run_id, reference, since, moment,
            self.cfg.window_s, reports.Thresholds.from_settings(self.cfg),
        )  # fmt: skip
        if self.receiver:
            reports.push_gauges(self.receiver, result)
        new = decide(state, result.windows, version, self.cfg, now, uuid.uuid4().hex)
        if new is state:
            return state
        for w in result.windows:
            if w.closed and (not state.last_window_end or w.end > state.last_window_end):
                log.info(
                    "window model=%s version=%s start=%s texts=%d verdict=%s breached=%s",
                    self.model, version, w.start, w.events, w.verdict, ",".join(w.breached()),
                )  # fmt: skip
        stored = self.states.save(new)
        if stored.pending is not None and state.pending is None:
            log.warning(
                "trigger model=%s version=%s action=%s breached=%s id=%s",
                self.model, version, stored.pending.action, ",".join(stored.pending.breached),
                stored.pending.id,
            )  # fmt: skip
            return self.act(stored)
        return stored

    def act(self, state: WatchState) -> WatchState:
        pending = state.pending
        assert pending is not None
        outcome: dict[str, Any] = {}
        if pending.action == "retrain":
            state, outcome = self._retrain(state)
            pending = state.pending
            assert pending is not None
        outcome["record_run_id"] = self._record(pending, outcome)
        TRIGGERS.labels(model=self.model, action=pending.action).inc()
        return self.states.save(finish(state, time.time(), self.cfg.cooldown_s, outcome))

    def _retrain(self, state: WatchState) -> tuple[WatchState, dict[str, Any]]:
        from mlflow import MlflowClient

        from roost import registry
        from roost.train import run_training

        pending = state.pending
        assert pending is not None
        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        workdir = self.workdir / "watch" / "actions" / pending.id
        run_id = pending.run_id or self._finished_run(client, pending.id)
        extra = None
        if run_id is None:
            path, extra = retrain_data(self.settings, self.store, workdir / "data.parquet")
            overrides = self.settings.model_copy(deep=True)
            overrides.data.uri = str(path)
            overrides.data.text_column, overrides.data.label_column = "text", "label"
            overrides.data.max_rows = None
            overrides.train.checkpoint_dir = str(workdir / "checkpoint")
            log.info(
                "retraining model=%s action=%s feedback_rows=%d", self.model, pending.id, extra
            )
            if self.cfg.train_on == "k8s":
                from roost.monitor.k8s_retrain import retrain_job

                run_id = retrain_job(self.settings, self.store, pending.id, path)
            else:
                run_id = run_training(overrides, _TagRun(pending.id)).run_id
            client.set_tag(run_id, ACTION_TAG, pending.id)
            state = self.states.save(
                dataclasses.replace(state, pending=dataclasses.replace(pending, run_id=run_id))
            )
            pending = state.pending
            assert pending is not None
        version = pending.new_version or self._tagged_version(client, pending.id)
        decision = None
        if version is None:
            result = registry.promote(
                self.settings, run_id=run_id, alias=self.settings.registry.challenger_alias
            )
            version = result.version
            decision = result.decision.reason
            client.set_model_version_tag(self.model, version, ACTION_TAG, pending.id)
            state = self.states.save(
                dataclasses.replace(
                    state, pending=dataclasses.replace(pending, new_version=version)
                )
            )
        aliases = registry.Registry(self.tracking_uri, self.model).aliases()
        landed = [a for a, v in aliases.items() if v == version]
        log.warning("retrained model=%s version=%s aliases=%s", self.model, version, landed)
        return state, {"run_id": run_id, "new_version": version, "aliases": landed,
                       "gate": decision, "feedback_rows": extra}  # fmt: skip

    def _finished_run(self, client: Any, action_id: str) -> str | None:
        exp = client.get_experiment_by_name(self.settings.tracking.experiment)
        if exp is None:
            return None
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{ACTION_TAG}` = '{action_id}' and attributes.status = 'FINISHED'",
            max_results=1,
        )
        return str(runs[0].info.run_id) if runs else None

    def _tagged_version(self, client: Any, action_id: str) -> str | None:
        found = client.search_model_versions(
            f"name='{self.model}' and tags.`{ACTION_TAG}` = '{action_id}'"
        )
        return str(found[0].version) if found else None

    def _record(self, pending: Pending, outcome: dict[str, Any]) -> str:
        """An MLflow run for the trigger, and tags on the judged version (idempotent by id)."""
        import mlflow
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        mlflow.set_tracking_uri(self.tracking_uri)
        experiment = mlflow.set_experiment(self.cfg.experiment)
        query = f"tags.`{ACTION_TAG}` = '{pending.id}' and tags.`roost.kind` = 'monitor-trigger'"
        existing = client.search_runs([experiment.experiment_id], query, max_results=1)
        if existing:
            run_id = str(existing[0].info.run_id)
        else:
            with mlflow.start_run(run_name=f"trigger-{self.model}-v{pending.version}") as run:
                mlflow.set_tags({
                    "roost.kind": "monitor-trigger", ACTION_TAG: pending.id,
                    "roost.model": self.model, "roost.version": pending.version,
                    "roost.monitor.action": pending.action,
                    "roost.monitor.breached": ",".join(pending.breached),
                })  # fmt: skip
                mlflow.log_metrics({k: v for k, v in pending.values.items() if v is not None})
                mlflow.log_dict({**dataclasses.asdict(pending), **outcome}, "monitor/trigger.json")
                run_id = run.info.run_id
        tags = {
            TRIGGER_TAG: pending.id,
            f"{TRIGGER_TAG}.action": pending.action,
            f"{TRIGGER_TAG}.metrics": ",".join(pending.breached),
            f"{TRIGGER_TAG}.values": json.dumps(pending.values),
            f"{TRIGGER_TAG}.run": run_id,
        }
        if outcome.get("new_version"):
            tags[f"{TRIGGER_TAG}.new_version"] = str(outcome["new_version"])
        for key, value in tags.items():
            client.set_model_version_tag(self.model, pending.version, key, value)
        return run_id

    def run(self, stop_after: float | None = None, once: bool = False) -> WatchState | None:
        """Step every ``poll_s`` until interrupted (or once, or after ``stop_after`` seconds)."""
        import threading

        deadline = None if stop_after is None else time.monotonic() + stop_after
        idle = threading.Event()
        state = None
        from roost.errors import RoostError

        while True:
            if once:
                return self.step()
            try:
                state = self.step()
            except RoostError as exc:
                # No champion yet, MLflow or the store briefly away: a long-running watcher
                # waits and tries again (a Deployment must not crash-loop on a fresh release).
                log.warning("waiting: %s", exc)
            if deadline is not None and time.monotonic() >= deadline:
                return state
            idle.wait(self.cfg.poll_s)


def _triggers() -> Any:
    from prometheus_client import Counter

    return Counter(
        "roost_monitor_triggers_total", "Watch triggers (K breached windows in a row).",
        ["model", "action"],
    )  # fmt: skip


TRIGGERS = _triggers()
