"""The side-effect layer of a rollout: read state, ask the engine, perform one operation.

One :meth:`Controller.tick` is one reconcile pass: load the state from the backend, take
the lease, apply a manual override, then either perform the pending operation or check
readiness, scrape, and judge. The state is saved *before* an operation (it carries
``pending``) and after it (``commit``), so a driver killed at any point is resumed by the next
one at the same step; a pending weight is applied only if the backend does not already
serve it. Retriable trouble (canary not ready, Prometheus or MLflow unreachable) holds the
current weight and is recorded as such; fatal trouble (the canary cannot run, its signature
differs) rolls back.

``start`` / ``run`` drive one rollout (the CLI), ``watch`` is the controller loop that starts a
rollout whenever the ``challenger`` alias points at a new version, and ``request`` leaves a
manual override (pause, resume, abort, promote) for whoever drives.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from roost import proc
from roost.config import Settings
from roost.errors import (
    ConfigError,
    Conflict,
    NotFound,
    RolloutAborted,
    RoostError,
    Timeout,
    TrackingUnavailable,
    Unavailable,
)
from roost.rollout import engine
from roost.rollout.analysis import Counts, analyse
from roost.rollout.backends.base import Backend, CanaryFailed, Readiness, owner_id
from roost.rollout.record import Recorder
from roost.rollout.state import Action, Command, Mode, Phase, Plan, RolloutState

log = logging.getLogger(__name__)

OnEvent = Callable[[RolloutState, dict[str, Any]], None]
Notify = Callable[[str], None]
FINISHED = ("promoted", "rolled_back", "superseded", "shadow_passed", "shadow_failed")

# Fields whose change alone does not need a write to the backend (observations in between
# checks are kept in memory; the saved pair (window, last_scrape) is always consistent).
_VOLATILE = {"last_scrape", "window", "reference", "updated_at", "heartbeat", "revision"}


def _essence(state: RolloutState) -> dict[str, Any]:
    return {k: v for k, v in state.to_dict().items() if k not in _VOLATILE}


class Controller:
    """Drives rollouts of one registered model through one backend."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        recorder: Recorder | None = None,
        *,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        on_event: OnEvent | None = None,
        notify: Notify | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.rollout
        self.model = settings.registry.model_name
        self.backend = backend
        self.recorder = recorder or Recorder(settings, self.model)
        self.owner = owner or owner_id()
        self.clock = clock
        self.on_event = on_event
        self.notify = notify or (lambda message: log.info("%s", message))
        self.stop = stop or threading.Event()
        self._memo: RolloutState | None = None
        self._saved_heartbeat: float | None = None
        self._seen: dict[str, int] = {}
        self._said: set[str] = set()

    # -- helpers ----------------------------------------------------------------------------
    def _say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            self.notify(message)

    def _load(self) -> RolloutState | None:
        stored = self.backend.load_state()
        memo = self._memo
        if (
            stored is not None
            and memo is not None
            and (memo.id, memo.revision) == (stored.id, stored.revision)
        ):
            return memo  # ours, with observations not worth a write yet
        return stored

    def _save(self, state: RolloutState, force: bool = False) -> RolloutState:
        memo = self._memo
        stale = (
            state.heartbeat is None
            or self._saved_heartbeat is None
            or state.heartbeat - self._saved_heartbeat > self.cfg.lease_s / 3
        )
        if (
            not force
            and memo is not None
            and memo.id == state.id
            and memo.revision == state.revision
            and _essence(memo) == _essence(state)
            and not stale
        ):
            self._memo = state
            return state
        saved = self.backend.save_state(state)
        self._memo = saved
        self._saved_heartbeat = saved.heartbeat
        self._emit(saved)
        return saved

    def _emit(self, state: RolloutState) -> None:
        seen = self._seen.get(state.id, 0)
        for event in state.history[seen:]:
            if self.on_event is not None:
                self.on_event(state, event)
        self._seen[state.id] = len(state.history)

    # -- starting ---------------------------------------------------------------------------
    def start(self, version: str | None = None, mode: Mode | None = None) -> RolloutState:
        """Begin a rollout of ``version`` (default: the ``challenger`` alias).

        Raises Conflict if one is in flight, NotFound without a champion, RolloutAborted if
        the challenger's signature differs from the champion's, ConfigError for a shadow
        phase without a payload receiver to read the champion's traffic from.
        """
        plan = Plan.from_settings(self.cfg, mode)
        receiver = None
        if plan.shadows:
            from roost.rollout.replay import receiver_url

            receiver = receiver_url(self.settings)
            if receiver is None:
                raise ConfigError(
                    f"rollout mode {plan.mode} needs the champion's payload log: start a "
                    "receiver (`roost monitor up`) or set rollout.shadow.receiver_url / "
                    "monitor.url; or use --mode canary"
                )
        cfg = self.settings.registry
        reg = self.recorder.registry()
        version = version or reg.require_alias(cfg.challenger_alias)
        reg.get_version(version)
        champion = reg.version_for_alias(cfg.champion_alias)
        if champion is None:
            raise NotFound(
                f"{self.model} has no @{cfg.champion_alias} to canary against: "
                "promote a first version with `roost promote`"
            )
        if champion == version:
            raise Conflict(f"{self.model} v{version} is already @{cfg.champion_alias}")
        current = self.backend.load_state()
        if current is not None and not current.terminal:
            from roost.rollout.store import in_flight_message

            raise Conflict(in_flight_message(current))
        mismatch = engine.signature_mismatch(
            _signature(reg.model_uri(champion)), _signature(reg.model_uri(version))
        )
        if mismatch:
            reg.set_tags(version, {engine.TAG: "rolled_back", f"{engine.TAG}.reason": mismatch})
            if reg.version_for_alias(cfg.challenger_alias) == version:
                reg.delete_alias(cfg.challenger_alias)
            raise RolloutAborted(f"{self.model} v{version} not canaried: {mismatch}")
        self.backend.preflight()  # e.g. nginx installed: fail before anything is written
        now = self.clock()
        state = engine.start(
            plan, self.model, version, champion, self.backend.name, now, uuid.uuid4().hex[:12]
        )
        shadow = None
        if receiver is not None:
            shadow = {
                "status": "pending",
                "receiver": receiver,
                "model": self.backend.logged_model(),
            }
        state = dataclasses.replace(state, owner=self.owner, heartbeat=now, shadow=shadow)
        state = self.backend.create_state(state)  # Conflict if another start won the race
        self._memo = state
        self._emit(state)
        self.notify(f"rollout {state.id}: {self.model} v{version} against champion v{champion}")
        self.notify(plan.describe())
        try:
            if reg.version_for_alias(cfg.challenger_alias) != version:
                reg.set_alias(cfg.challenger_alias, version)
            run_id = self.recorder.ensure_run(state)
            state = self._save(dataclasses.replace(state, run_id=run_id), force=True)
        except Unavailable as exc:
            self.notify(f"registry unreachable, recording later: {exc}")
        return state

    # -- one reconcile pass -------------------------------------------------------------------
    def tick(self) -> RolloutState | None:
        state = self._load()
        if state is None:
            return None
        if state.terminal:
            return self._record(state)
        now = self.clock()
        claimed = engine.claim(
            state, self.owner, now, self.cfg.lease_s, self.backend.owner_alive(state.owner)
        )
        if claimed is None:
            self._say_once(f"rollout {state.id} is driven by {state.owner}; not touching it")
            return state
        state = claimed
        command = self.backend.read_command()
        if command is not None:
            state = engine.apply_command(state, command, now)
        state = self._save(state)
        if state.pending is None and state.phase is Phase.PROGRESSING:
            state = self._step(state, now)
        if state.pending is not None:
            state = self._perform(state)
            if state.phase is Phase.PROGRESSING and state.pending is None:
                state = self._step(state, self.clock())  # start the window without a poll
        return self._record(state)

    def _step(self, state: RolloutState, now: float) -> RolloutState:
        if engine.shadowing(state):
            return self._shadow(state, now)
        return self._analyse(state, now)

    def _shadow(self, state: RolloutState, now: float) -> RolloutState:
        """One pass of the shadow phase: replay what the champion logged since the last check
        to the challenger, add the pairs to the tally, judge it."""
        from roost.rollout import shadow as judge
        from roost.rollout.replay import Batch, Cursor, Feed, replay

        try:
            readiness = self.backend.ready(state)
        except CanaryFailed as exc:
            failure = {"metric": "readiness", "reason": str(exc), "stage": "shadow"}
            return self._save(engine.rollback(state, now, str(exc), failure))
        except Unavailable as exc:
            readiness = Readiness(False, str(exc))
        if not readiness.ok:
            return self._save(engine.not_ready(state, readiness.reason, now))
        try:
            snapshot = self.backend.scrape(state)  # the champion's own latency and errors
        except Unavailable as exc:
            reason = f"metrics unavailable, shadow waits: {exc}"
            return self._save(engine.hold(state, reason, now, key="metrics"))
        if state.window_started is None:
            return self._save(engine.begin_window(state, snapshot, now))
        state = engine.observe(state, snapshot, now)
        if not engine.check_due(state, now):
            return self._save(state)
        assert state.shadow is not None
        plan = state.plan.shadow
        cursor = Cursor.from_dict(state.shadow.get("cursor"))
        tally = judge.Tally.from_dict(state.shadow.get("tally"))
        feed = Feed(str(state.shadow["receiver"]), str(state.shadow["model"]))
        batch: Batch | None = None
        inferences: list[judge.Logged] = []
        answers: list[judge.Answer | None] = []
        try:
            since = float(state.shadow["started_at"])  # the champion's traffic from now on
            batch = feed.read(cursor, plan.batch, plan.settle_s, now, since)
            inferences = judge.champion_inferences(batch.events, state.champion, plan.sample_rate)
            if inferences:
                endpoint = self.backend.shadow_endpoint(state)
                name = self.settings.serving.model_name
                # a third of the lease: the heartbeat is saved at least that often
                budget = self.cfg.lease_s / 3
                answers = replay(
                    inferences, endpoint, name, plan.timeout_s, plan.concurrency, budget
                )
        except Unavailable as exc:  # judged on what it has: max_duration_s still ends it
            state = engine.hold(state, f"shadow waits: {exc}", now, key="shadow")
            batch, inferences, answers = None, [], []
        if batch is not None and batch.restarted:
            self.notify(f"rollout {state.id}: the payload receiver restarted; following it anew")
        for logged, answer in zip(inferences, answers, strict=True):
            if answer is not None:  # None: not sent, the pass's time ran out
                tally.add(logged, answer, plan.sample_ids)
        champion = state.window.get("champion") or Counts()
        challenger = state.window.get("challenger")  # its server's metrics: the replays
        analysis = judge.judge(tally, champion, plan.thresholds, plan.min_pairs, challenger)
        decided = engine.judge_shadow(
            state, analysis, tally.to_dict(),
            (batch.cursor if batch is not None else cursor).to_dict(), now,
            judge.failure(analysis, tally),
        )  # fmt: skip
        if decided.pending is not None and decided.pending.kind != "rollback":
            try:
                self.recorder.sync(decided)
            except Unavailable as exc:
                reason = f"registry unreachable, shadow verdict waits: {exc}"
                return self._save(
                    engine.hold(engine.checked(state, analysis, now), reason, now, key="registry")
                )
            decided = dataclasses.replace(decided, recorded=len(decided.history))
        return self._save(decided)

    def _analyse(self, state: RolloutState, now: float) -> RolloutState:
        try:
            readiness = self.backend.ready(state)
        except CanaryFailed as exc:
            failure = {"metric": "readiness", "reason": str(exc)}
            return self._save(engine.rollback(state, now, str(exc), failure))
        except Unavailable as exc:
            readiness = Readiness(False, str(exc))
        if not readiness.ok:
            return self._save(engine.not_ready(state, readiness.reason, now))
        try:
            snapshot = self.backend.scrape(state)
        except Unavailable as exc:
            reason = f"metrics unavailable, holding {state.weight}%: {exc}"
            return self._save(engine.hold(state, reason, now, key="metrics"))
        if state.window_started is None:
            return self._save(engine.begin_window(state, snapshot, now))
        state = engine.observe(state, snapshot, now)
        if not engine.check_due(state, now):
            return self._save(state)
        champion, challenger = engine.sides(state)
        plan = state.plan
        analysis = analyse(champion, challenger, plan.thresholds, plan.min_requests)
        decided = engine.judge(state, analysis, now)
        if decided.pending is not None and decided.pending.kind != "rollback":
            # The verdict reaches the registry before the weight moves; if it cannot, hold.
            try:
                self.recorder.sync(decided)
            except Unavailable as exc:
                reason = f"registry unreachable, holding {state.weight}%: {exc}"
                checked = engine.checked(state, analysis, now)
                decided = engine.hold(checked, reason, now, key="registry")
            else:
                decided = dataclasses.replace(decided, recorded=len(decided.history))
        return self._save(decided)

    def _perform(self, state: RolloutState) -> RolloutState:
        op = state.pending
        assert op is not None
        now = self.clock()
        try:
            if op.kind == "shadow":
                self.backend.start_shadow(state)
            elif op.kind == "finish":
                self.backend.retire(state)
            elif op.kind == "set_weight":
                self.backend.prepare(state)
                current = self.backend.current_weight(state)
                if engine.needs_apply(op, current):
                    self.backend.set_weight(state, op.weight)
                else:
                    self.notify(f"{op.weight}% is already applied (resumed); not applying it again")
            elif op.kind == "rollback":
                if self.backend.current_weight(state) != 0:
                    self.backend.set_weight(state, 0)
                state = self._save(engine.weight_zeroed(state, self.clock()))
                self.recorder.rolled_back(state)
                self.backend.retire(state)
            else:
                self.recorder.promote(state)
                self.backend.promote(state)
        except CanaryFailed as exc:
            failure = {"metric": "readiness", "reason": str(exc)}
            return self._save(engine.rollback(state, now, str(exc), failure))
        except (Unavailable, Timeout) as exc:
            if op.kind in ("set_weight", "shadow"):
                return self._save(engine.not_ready(state, str(exc), now))
            reason = f"{op.kind} waits: {exc}"
            return self._save(engine.hold(state, reason, now, key=op.kind))
        return self._save(engine.commit(state, self.clock()), force=True)

    def _record(self, state: RolloutState) -> RolloutState:
        """Bring the registry up to date with the history (best effort; retried next tick)."""
        if state.recorded >= len(state.history):
            return state
        try:
            if state.run_id is None:
                state = dataclasses.replace(state, run_id=self.recorder.ensure_run(state))
            self.recorder.sync(state)
        except Unavailable as exc:
            self._say_once(f"registry unreachable, recording later: {exc}")
            return state
        try:
            return self._save(dataclasses.replace(state, recorded=len(state.history)), force=True)
        except Conflict:
            return state

    # -- loops --------------------------------------------------------------------------------
    def _delay(self, state: RolloutState | None) -> float:
        delay = self.cfg.poll_s
        if state is not None:
            due = engine.next_check_at(state)
            if due is not None:
                delay = min(delay, max(due - self.clock(), 0.0))
        return max(delay, 0.05)

    def run(self, timeout: float | None = None) -> RolloutState:
        """Drive the current rollout until it is promoted or rolled back (or ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                state = self.tick()
            except Conflict as exc:
                log.info("state changed under us, re-reading: %s", exc)
                self._memo = None
                if deadline is not None and time.monotonic() >= deadline:
                    raise Timeout(
                        f"rollout of {self.model}: its state kept changing under this driver "
                        f"for {timeout:g}s ({exc})"
                    ) from None
                if self.stop.wait(min(self.cfg.poll_s, 0.2)):
                    raise RoostError("stopped") from None
                continue
            if state is None:
                raise NotFound(f"no rollout of {self.model}")
            if state.terminal and state.recorded >= len(state.history):
                return state
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(
                    f"rollout of {state.model} v{state.version} still {state.phase.value} at "
                    f"{state.weight}% after {timeout:g}s; it stays in flight: "
                    f"`roost rollout resume {state.model}` or `roost rollout watch` continues it"
                )
            if self.stop.wait(self._delay(state)):
                raise RoostError("stopped")

    def watch(self, timeout: float | None = None, once: bool = False) -> None:
        """Controller loop: drive the rollout in flight, start one when @challenger moves."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.stop.is_set():
            state: RolloutState | None = None
            try:
                state = self.tick()
                if state is None or (state.terminal and state.recorded >= len(state.history)):
                    started = self._maybe_start(state)
                    state = started or state
            except Conflict as exc:
                self._memo = None
                log.info("conflict, retrying: %s", exc)
            except (Unavailable, Timeout, NotFound, ConfigError) as exc:
                self._say_once(f"waiting: {exc}")
            except RolloutAborted as exc:
                self.notify(str(exc))
            if once:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"watch ended after {timeout:g}s (--timeout)")
            self.stop.wait(self._delay(state))

    def _maybe_start(self, last: RolloutState | None) -> RolloutState | None:
        cfg = self.settings.registry
        reg = self.recorder.registry()
        version = reg.version_for_alias(cfg.challenger_alias)
        if version is None or version == reg.version_for_alias(cfg.champion_alias):
            return None
        if last is not None and last.version == version:
            return None
        outcome = (reg.get_version(version).tags or {}).get(engine.TAG)
        if outcome in FINISHED:
            self._say_once(
                f"@{cfg.challenger_alias} is v{version}, already {outcome}: not starting again "
                f"(use `roost rollout start {self.model} --version {version}` to retry)"
            )
            return None
        self.notify(f"@{cfg.challenger_alias} moved to v{version}: starting a rollout")
        return self.start(version)

    # -- manual overrides ---------------------------------------------------------------------
    def request(self, action: Action, by: str = "", wait_s: float = 60.0) -> RolloutState:
        """Leave ``action`` for the driver; act on it here if nobody drives. Waits until done."""
        state = self.backend.load_state()
        if state is None:
            raise NotFound(f"no rollout of {self.model}")
        if state.terminal:
            raise Conflict(
                f"the rollout of {self.model} v{state.version} already ended ({state.phase.value})"
            )
        command = Command(uuid.uuid4().hex[:12], state.id, action, self.clock(), by)
        self.backend.write_command(command)
        deadline = time.monotonic() + wait_s

        def handled() -> RolloutState | None:
            current = self.backend.load_state()
            if current is None:
                return None
            if current.command_seen == command.id and (current.pending is None or current.terminal):
                return current
            if current.terminal and current.id == state.id:
                return current
            try:
                self.tick()  # a live driver keeps its lease and does it; otherwise we do
            except Conflict:
                self._memo = None
            return None

        remaining = max(deadline - time.monotonic(), 0.1)
        return proc.wait_until(
            handled, remaining, self.cfg.poll_s / 4, what=f"the rollout to {action}",
            describe=lambda: f"state {self.backend.load_state()!r:.200}",
        )  # fmt: skip


def _signature(model_uri: str) -> dict[str, Any] | None:
    """The MLflow signature of a registered version (None if it has none)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from roost.tracking import registry_error

    try:
        info = mlflow.models.get_model_info(model_uri)
    except MlflowException as exc:
        # Unreadable is not "no signature": the check would pass a mismatched challenger.
        raise registry_error(exc, f"reading the signature of {model_uri}") from None
    except OSError as exc:
        raise TrackingUnavailable(f"cannot read the signature of {model_uri}: {exc}") from None
    return None if info.signature is None else dict(info.signature.to_dict())
