"""What a tuning worker does next, decided from the study's trials alone (pure).

A study is done when ``target`` trials are *finished*: complete, pruned, or failed for good.
A trial failed because its worker died (stale heartbeat) and re-queued by the retry
callback is not finished: its retry (a WAITING trial) is. Workers run queued trials first,
start new ones while finished + running < target, and otherwise wait, so that a trial left
stale by a killed worker is still picked up again by a live one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

# Optuna keeps the numbers of the trials a retry replaces in this system attribute
# (RetryHeartbeatStaleTrialCallback); pinned optuna==5.0.0, tests/unit/test_tune.py guards it.
RETRY_HISTORY_ATTR = "retry_history"

Action = Literal["run", "wait", "done"]


@dataclass(frozen=True)
class TrialView:
    """The facts of one trial the policy needs."""

    number: int
    state: str  # optuna TrialState name: RUNNING, WAITING, COMPLETE, PRUNED, FAIL
    retry_history: tuple[int, ...] = ()  # the earlier trials this one retries


@dataclass(frozen=True)
class Tally:
    complete: int
    pruned: int
    failed: int  # failed for good (not re-queued)
    retried: int  # failed and re-queued
    running: int
    waiting: int

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


def tally(trials: Iterable[TrialView]) -> Tally:
    trials = list(trials)
    requeued = {n for t in trials for n in t.retry_history}
    counts = {"COMPLETE": 0, "PRUNED": 0, "RUNNING": 0, "WAITING": 0}
    failed = retried = 0
    for t in trials:
        if t.state == "FAIL":
            if t.number in requeued:
                retried += 1
            else:
                failed += 1
        elif t.state in counts:
            counts[t.state] += 1
    return Tally(
        counts["COMPLETE"], counts["PRUNED"], failed, retried, counts["RUNNING"], counts["WAITING"]
    )


def next_action(t: Tally, target: int, out_of_time: bool = False) -> Action:
    """``run`` one trial, ``wait`` for others, or ``done``."""
    if t.finished >= target or out_of_time:
        return "done"
    if t.waiting > 0 or t.finished + t.running < target:
        return "run"  # queued trials (warm start, retries) first: optuna pops WAITING ones
    return "wait"  # the rest is running elsewhere; if a worker dies, its retry is ours


def study_done(t: Tally, target: int) -> bool:
    return t.finished >= target and t.running == 0 and t.waiting == 0
