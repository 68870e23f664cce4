"""The one interface every traffic backend implements.

A backend keeps the rollout's state where the traffic lives (InferenceService annotations,
a file beside the nginx config), sets the canary weight, says whether the canary serves it,
and yields the predictors' metrics. Everything else (analysis, decisions, registry
bookkeeping) is the engine's and the controller's, the same for every backend.
"""

from __future__ import annotations

import os
import socket
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

from roost.errors import RoostError, Unavailable
from roost.rollout.analysis import Snapshot
from roost.rollout.state import Command, RolloutState


class NotReady(Unavailable):
    """Retriable: the canary (or the proxy, or a pod) is not serving its weight yet."""


class MetricsUnavailable(Unavailable):
    """Retriable: Prometheus or a predictor's /metrics could not be read; hold the weight."""


class CanaryFailed(RoostError):
    """Fatal: the canary cannot serve at all (process exited, signature mismatch); roll back."""

    exit_code = 5
    http_status = 409


@dataclass(frozen=True)
class Readiness:
    ok: bool
    reason: str = ""


def owner_id() -> str:
    """Who drives a rollout: ``host:pid:token`` (the token tells restarts apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_alive_here(owner: str | None) -> bool | None:
    """False if ``owner`` is a process on this host that is gone; None if we cannot tell.

    An owner with this process's own pid but not its id cannot be told by its pid: another
    driver in this process, or an earlier run of the same pid (a restarted container, where
    the controller is PID 1 again under the same hostname). Its heartbeat decides: the lease
    of a dead run expires, a live driver keeps renewing it.
    """
    from roost import proc

    if not owner:
        return None
    parts = owner.split(":")
    if len(parts) < 2 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return None
    if int(parts[1]) == os.getpid():
        return None
    return proc.pid_alive(int(parts[1]))


class Backend(ABC):
    """Sets weights, reports readiness, yields metrics, and stores the rollout's state."""

    name: str

    # -- state, kept in the backend itself ---------------------------------------------------
    @abstractmethod
    def load_state(self) -> RolloutState | None:
        """The current (or last) rollout of this model, if any."""

    @abstractmethod
    def create_state(self, state: RolloutState) -> RolloutState:
        """Store a new rollout; :class:`roost.errors.Conflict` if one is in flight."""

    @abstractmethod
    def save_state(self, state: RolloutState) -> RolloutState:
        """Compare-and-swap on ``state.revision``; Conflict if someone else wrote since."""

    @abstractmethod
    def read_command(self) -> Command | None:
        """The latest manual override, if any."""

    @abstractmethod
    def write_command(self, command: Command) -> None:
        """Leave a manual override for whoever drives the rollout."""

    def owner_alive(self, owner: str | None) -> bool | None:
        return owner_alive_here(owner)

    # -- traffic --------------------------------------------------------------------------
    @abstractmethod
    def preflight(self) -> None:
        """Raise now if a rollout could not run at all (a missing tool, no such object)."""

    @abstractmethod
    def prepare(self, state: RolloutState) -> None:
        """Make sure champion and challenger can take traffic (idempotent)."""

    @abstractmethod
    def current_weight(self, state: RolloutState) -> int | None:
        """The weight the data plane applies to this rollout's challenger now (None: unknown)."""

    @abstractmethod
    def set_weight(self, state: RolloutState, weight: int) -> None:
        """Send ``weight`` percent of requests to the challenger."""

    @abstractmethod
    def ready(self, state: RolloutState) -> Readiness:
        """Does the canary serve ``state.weight``? Raise CanaryFailed if it never will."""

    @abstractmethod
    def scrape(self, state: RolloutState) -> Snapshot:
        """Cumulative metrics of champion and challenger; MetricsUnavailable if unreadable."""

    @abstractmethod
    def promote(self, state: RolloutState) -> None:
        """All traffic to the challenger for good (idempotent)."""

    @abstractmethod
    def retire(self, state: RolloutState) -> None:
        """After a rollback: the challenger gets nothing and is cleaned up (idempotent)."""

    # -- the shadow phase ------------------------------------------------------------------------
    def start_shadow(self, state: RolloutState) -> None:
        """The challenger up and ready at weight 0, so it can answer replayed requests."""
        self.prepare(state)

    def shadow_endpoint(self, state: RolloutState) -> str:
        """Base URL of the challenger's REST endpoint for replayed requests (NotReady if none)."""
        raise NotReady(f"the {self.name} backend cannot reach the challenger directly")

    def logged_model(self) -> str:
        """The model name the champion's payload events carry (``ce-inferenceservicename``)."""
        return "unknown"

    def describe(self) -> dict[str, str]:
        """Where traffic goes (URLs, object names) for status output."""
        return {}
