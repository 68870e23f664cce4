"""A rollout as data: its plan, its phase, the one pending operation, its history.

Everything a driver needs to resume a rollout is in :class:`RolloutState`, serialised as one
JSON document that the backends keep (``store.py``). The transitions live in ``engine.py``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from roost.rollout.analysis import Counts, Snapshot, Thresholds
from roost.rollout.shadow import ShadowThresholds

if TYPE_CHECKING:
    from roost.config import RolloutSettings

OpKind = Literal["set_weight", "promote", "rollback", "shadow", "finish"]
Mode = Literal["shadow", "canary", "shadow-then-canary"]
MODES: tuple[Mode, ...] = ("shadow", "canary", "shadow-then-canary")
Action = Literal["pause", "resume", "abort", "promote"]
ACTIONS: tuple[Action, ...] = ("pause", "resume", "abort", "promote")


class Phase(StrEnum):
    PROGRESSING = "progressing"
    PAUSED = "paused"
    PROMOTING = "promoting"
    ROLLING_BACK = "rolling_back"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    SHADOW_PASSED = "shadow_passed"  # mode shadow: judged in the dark, passed, nothing exposed


TERMINAL = frozenset({Phase.PROMOTED, Phase.ROLLED_BACK, Phase.SHADOW_PASSED})


@dataclass(frozen=True)
class ShadowPlan:
    """The shadow phase: how long, how many pairs, which share of traffic, the thresholds."""

    duration_s: float = 60.0
    max_duration_s: float = 600.0
    min_pairs: int = 100
    sample_rate: float = 1.0
    timeout_s: float = 2.0
    concurrency: int = 4
    batch: int = 400
    settle_s: float = 1.0
    sample_ids: int = 20
    thresholds: ShadowThresholds = field(default_factory=ShadowThresholds)

    @classmethod
    def from_settings(cls, cfg: RolloutSettings) -> ShadowPlan:
        s = cfg.shadow
        return cls(
            duration_s=s.duration_s,
            max_duration_s=max(s.max_duration_s, s.duration_s),
            min_pairs=s.min_pairs,
            sample_rate=s.sample_rate,
            timeout_s=s.timeout_s,
            concurrency=s.concurrency,
            batch=s.batch,
            settle_s=s.settle_s,
            sample_ids=s.sample_ids,
            thresholds=ShadowThresholds(
                min_agreement=s.min_agreement,
                max_js_distance=s.max_js_distance,
                max_confidence_shift=s.max_confidence_shift,
                max_error_rate=s.max_error_rate,
                max_p99_ratio=s.max_p99_ratio,
                p99_slack_ms=s.p99_slack_ms,
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "thresholds"}
        return {**out, "thresholds": self.thresholds.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShadowPlan:
        defaults = cls()
        values: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            if name != "thresholds" and name in data:
                values[name] = type(getattr(defaults, name))(data[name])
        return cls(**values, thresholds=ShadowThresholds.from_dict(data.get("thresholds") or {}))


@dataclass(frozen=True)
class Plan:
    """A rollout as data: weights, how long each is held, how checks are judged."""

    steps: tuple[int, ...] = (10, 25, 50, 100)
    window_s: float = 60.0
    check_interval_s: float = 10.0
    min_requests: int = 50
    max_failed_checks: int = 2
    ready_timeout_s: float = 300.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    mode: Mode = "canary"  # a stored plan without a mode predates shadows: canary
    shadow: ShadowPlan = field(default_factory=ShadowPlan)

    @property
    def shadows(self) -> bool:
        return self.mode != "canary"

    @property
    def canaries(self) -> bool:
        return self.mode != "shadow"

    @classmethod
    def from_settings(cls, cfg: RolloutSettings, mode: Mode | None = None) -> Plan:
        return cls(
            mode=mode or cfg.mode,
            shadow=ShadowPlan.from_settings(cfg),
            steps=tuple(cfg.steps),
            window_s=cfg.window_s,
            check_interval_s=min(cfg.check_interval_s, cfg.window_s),
            min_requests=cfg.min_requests,
            max_failed_checks=cfg.max_failed_checks,
            ready_timeout_s=cfg.ready_timeout_s,
            thresholds=Thresholds(
                max_error_rate=cfg.max_error_rate,
                max_p99_ratio=cfg.max_p99_ratio,
                p99_slack_ms=cfg.p99_slack_ms,
                max_js_divergence=cfg.max_js_divergence,
                max_confidence_drop=cfg.max_confidence_drop,
            ),
        )

    @property
    def min_promotion_s(self) -> float:
        """Promotion takes at least one full window per step."""
        return self.window_s * len(self.steps)

    @property
    def max_abort_s(self) -> float:
        """Once the canary has min_requests and fails, it is rolled back within this."""
        return self.check_interval_s * self.max_failed_checks

    def describe(self) -> str:
        shadow = self.shadow
        first = (
            f"shadow: the challenger answers a copy of the champion's traffic for at least "
            f"{shadow.duration_s:g}s and {shadow.min_pairs} pairs (failing after "
            f"{shadow.max_duration_s:g}s without them)"
        )
        if self.mode == "shadow":
            return first + "; no client sees the challenger (mode shadow)"
        canary = self._describe_canary()
        return canary if self.mode == "canary" else f"{first}; then {canary}"

    def _describe_canary(self) -> str:
        weights = " -> ".join(f"{w}%" for w in self.steps)
        return (
            f"steps {weights}, {self.window_s:g}s each: promotion takes at least "
            f"{len(self.steps)} x {self.window_s:g}s = {self.min_promotion_s:g}s; a failing canary "
            f"is rolled back after {self.max_failed_checks} failed checks, at most "
            f"{self.max_failed_checks} x {self.check_interval_s:g}s = {self.max_abort_s:g}s after "
            f"it has {self.min_requests} requests"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": list(self.steps),
            "window_s": self.window_s,
            "check_interval_s": self.check_interval_s,
            "min_requests": self.min_requests,
            "max_failed_checks": self.max_failed_checks,
            "ready_timeout_s": self.ready_timeout_s,
            "thresholds": self.thresholds.to_dict(),
            "mode": self.mode,
            "shadow": self.shadow.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        mode = str(data.get("mode", "canary"))
        if mode not in MODES:
            raise ValueError(f"unknown rollout mode {mode!r}")
        return cls(
            mode=mode,  # type: ignore[arg-type]
            shadow=ShadowPlan.from_dict(data.get("shadow") or {}),
            steps=tuple(int(w) for w in data["steps"]),
            window_s=float(data["window_s"]),
            check_interval_s=float(data["check_interval_s"]),
            min_requests=int(data["min_requests"]),
            max_failed_checks=int(data["max_failed_checks"]),
            ready_timeout_s=float(data.get("ready_timeout_s", 300.0)),
            thresholds=Thresholds.from_dict(data.get("thresholds") or {}),
        )


@dataclass(frozen=True)
class Op:
    """The one operation a state asks the controller to perform next."""

    kind: OpKind
    weight: int
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "weight": self.weight, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Op:
        return cls(data["kind"], int(data["weight"]), str(data.get("reason", "")))


@dataclass(frozen=True)
class Command:
    """A manual override written next to the state by ``roost rollout pause|resume|...``."""

    id: str
    rollout_id: str
    action: Action
    at: float
    by: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Command:
        action = str(data["action"])
        if action not in ACTIONS:
            raise ValueError(f"unknown rollout action {action!r}")
        return cls(
            str(data["id"]), str(data["rollout_id"]), action,  # type: ignore[arg-type]
            float(data["at"]), str(data.get("by", "")),
        )  # fmt: skip


@dataclass(frozen=True)
class RolloutState:
    """Everything needed to resume a rollout; stored in the backend (annotation / file)."""

    id: str
    model: str
    version: str
    champion: str
    backend: str
    plan: Plan
    created_at: float
    phase: Phase = Phase.PROGRESSING
    step: int = 0
    weight: int = 0
    pending: Op | None = None
    weight_applied_at: float | None = None
    window_started: float | None = None
    last_check: float | None = None
    failed_checks: int = 0
    last_scrape: Snapshot | None = None
    window: dict[str, Counts] = field(default_factory=dict)
    reference: Counts = field(default_factory=Counts)
    last_analysis: dict[str, Any] | None = None
    holding: str | None = None
    failure: dict[str, Any] | None = None
    shadow: dict[str, Any] | None = None  # the shadow phase: started_at, cursor, tally, status
    history: tuple[dict[str, Any], ...] = ()
    applied: tuple[dict[str, Any], ...] = ()
    command_seen: str | None = None
    owner: str | None = None
    heartbeat: float | None = None
    revision: int = 0
    run_id: str | None = None
    recorded: int = 0
    updated_at: float | None = None
    finished_at: float | None = None

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    @property
    def target_weight(self) -> int:
        return self.plan.steps[min(self.step, len(self.plan.steps) - 1)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "champion": self.champion,
            "backend": self.backend,
            "plan": self.plan.to_dict(),
            "created_at": self.created_at,
            "phase": self.phase.value,
            "step": self.step,
            "weight": self.weight,
            "pending": self.pending.to_dict() if self.pending else None,
            "weight_applied_at": self.weight_applied_at,
            "window_started": self.window_started,
            "last_check": self.last_check,
            "failed_checks": self.failed_checks,
            "last_scrape": (
                None
                if self.last_scrape is None
                else {k: c.to_dict() for k, c in self.last_scrape.items()}
            ),
            "window": {k: c.to_dict() for k, c in self.window.items()},
            "reference": self.reference.to_dict(),
            "last_analysis": self.last_analysis,
            "holding": self.holding,
            "failure": self.failure,
            "shadow": self.shadow,
            "history": list(self.history),
            "applied": list(self.applied),
            "command_seen": self.command_seen,
            "owner": self.owner,
            "heartbeat": self.heartbeat,
            "revision": self.revision,
            "run_id": self.run_id,
            "recorded": self.recorded,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutState:
        scrape = data.get("last_scrape")
        return cls(
            id=str(data["id"]),
            model=str(data["model"]),
            version=str(data["version"]),
            champion=str(data["champion"]),
            backend=str(data["backend"]),
            plan=Plan.from_dict(data["plan"]),
            created_at=float(data["created_at"]),
            phase=Phase(data.get("phase", Phase.PROGRESSING.value)),
            step=int(data.get("step", 0)),
            weight=int(data.get("weight", 0)),
            pending=Op.from_dict(data["pending"]) if data.get("pending") else None,
            weight_applied_at=data.get("weight_applied_at"),
            window_started=data.get("window_started"),
            last_check=data.get("last_check"),
            failed_checks=int(data.get("failed_checks", 0)),
            last_scrape=(
                None if scrape is None else {k: Counts.from_dict(v) for k, v in scrape.items()}
            ),
            window={k: Counts.from_dict(v) for k, v in (data.get("window") or {}).items()},
            reference=Counts.from_dict(data.get("reference") or {}),
            last_analysis=data.get("last_analysis"),
            holding=data.get("holding"),
            failure=data.get("failure"),
            shadow=data.get("shadow"),
            history=tuple(data.get("history") or ()),
            applied=tuple(data.get("applied") or ()),
            command_seen=data.get("command_seen"),
            owner=data.get("owner"),
            heartbeat=data.get("heartbeat"),
            revision=int(data.get("revision", 0)),
            run_id=data.get("run_id"),
            recorded=int(data.get("recorded", 0)),
            updated_at=data.get("updated_at"),
            finished_at=data.get("finished_at"),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> RolloutState:
        return cls.from_dict(json.loads(text))
