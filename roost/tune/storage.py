"""Optuna storages for workers in several processes or pods, with heartbeats.

* local: a journal file (:class:`optuna.storages.JournalStorage`, append-only, file-locked;
  made for several processes on one machine, unlike SQLite). Optuna 5.0 has no heartbeat
  for it, so :class:`HeartbeatJournalStorage` adds one: a running trial's worker records
  the time as a trial system attribute every ``heartbeat_s``; a trial silent for
  ``grace_s`` is stale. It implements optuna's ``BaseHeartbeat`` interface (pinned
  optuna==5.0.0), so ``optuna.storages.fail_stale_trials`` and the optimize loop treat it
  exactly like the RDB storage's heartbeat.
* cluster: :class:`optuna.storages.RDBStorage` on PostgreSQL, whose heartbeat is built in.

Either way a stale trial is failed, ``on_stale`` closes its MLflow run, and
:class:`optuna.storages.RetryHeartbeatStaleTrialCallback` queues it again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

HEARTBEAT_ATTR = "roost:heartbeat"
StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal storage whose running trials prove they are alive (see the module doc)."""

    def __init__(
        self,
        path: Path,
        heartbeat_s: int,
        grace_s: int,
        on_stale: StaleCallback | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(JournalFileBackend(str(path)))
        self.path = path
        self._heartbeat_s = heartbeat_s
        self._grace_s = grace_s
        self._on_stale = on_stale

    def record_heartbeat(self, trial_id: int) -> None:
        # The trial may have ended (or been failed as stale) between two beats.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            if now - last_sign_of_life(trial) > self._grace_s:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_s

    def get_heartbeat_stale_trial_callback(self) -> StaleCallback | None:
        return self._on_stale


def last_sign_of_life(trial: FrozenTrial) -> float:
    """The later of the trial's start and its last heartbeat (a retry inherits an old beat)."""
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    beat = trial.system_attrs.get(HEARTBEAT_ATTR)
    return max(started, float(beat) if isinstance(beat, int | float) else 0.0)


def is_journal(url: str) -> bool:
    return not url.partition("://")[1]


def open_storage(
    url: str, heartbeat_s: int, grace_s: int, on_stale: StaleCallback | None
) -> BaseStorage:
    """A journal file (a plain path) or an RDB URL (``postgresql://...``), both with heartbeats."""
    if is_journal(url):
        return HeartbeatJournalStorage(Path(url), heartbeat_s, grace_s, on_stale)
    kwargs: dict[str, Any] = {"engine_kwargs": {"pool_pre_ping": True}}
    return RDBStorage(
        url,
        heartbeat_interval=heartbeat_s,
        grace_period=grace_s,
        heartbeat_stale_trial_callback=on_stale,
        **kwargs,
    )


def redact(url: str) -> str:
    """The URL with any password replaced (for messages; credentials never reach logs)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"
