"""The rollout policy: pure transitions of a rollout's state (the data is in ``state.py``).

Nothing here does I/O or reads a clock; every function takes the time it needs (``now``) and
returns a new :class:`RolloutState`. The controller (``roost.rollout.controller``) calls these
and performs the one operation a state asks for (``state.pending``): set a weight, promote or
roll back. The state is written *before* an operation runs and the operation is committed
after it, so a driver that dies in between finds the operation pending and completes it
(checking the backend first, so a weight is never applied twice).

Stages of one rollout (Flagger-style), after an optional shadow phase (``plan.mode``)::

    [shadow: challenger up at weight 0, the champion's logged traffic replayed to it, pairs
     judged every check_interval_s -> pass after duration_s with min_pairs (mode shadow: the
     rollout ends shadow_passed) | fail: roll back, recorded shadow_failed]
    start -> set weight steps[0] -> canary ready -> window: check every check_interval_s
          -> window passed: next weight ... -> last window passed: promote
          -> max_failed_checks failing checks in a row: weight 0, roll back
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

from roost.rollout.analysis import Analysis, Counts, Snapshot, Verdict, by_side, increase
from roost.rollout.state import Command, Op, Phase, Plan, RolloutState

TAG = "roost.rollout"


def _replace(state: RolloutState, now: float, **changes: Any) -> RolloutState:
    return dataclasses.replace(state, updated_at=now, **changes)


def _event(
    state: RolloutState, now: float, event: str, **fields: Any
) -> tuple[dict[str, Any], ...]:
    entry = {"event": event, "at": round(now, 3), "step": state.step, "weight": state.weight}
    entry.update(fields)
    return (*state.history, entry)


# -- lifecycle ------------------------------------------------------------------------------


def start(
    plan: Plan,
    model: str,
    version: str,
    champion: str,
    backend: str,
    now: float,
    rollout_id: str,
) -> RolloutState:
    """A new rollout whose first operation is the shadow phase or the first canary weight."""
    first = Op("shadow", 0, "shadow phase") if plan.shadows else Op("set_weight", plan.steps[0])
    state = RolloutState(
        id=rollout_id, model=model, version=version, champion=champion, backend=backend,
        plan=plan, created_at=now, updated_at=now, pending=first,
    )  # fmt: skip
    return dataclasses.replace(
        state, history=_event(state, now, "started", champion=champion, plan=plan.to_dict())
    )


def needs_apply(op: Op, current_weight: int | None) -> bool:
    """After a restart: does the pending weight still have to be applied?"""
    return op.kind != "set_weight" or current_weight != op.weight


def commit(state: RolloutState, now: float) -> RolloutState:
    """The pending operation has been performed: record it and move on."""
    op = state.pending
    if op is None:
        return state
    if op.kind == "set_weight":
        applied = (*state.applied, {"weight": op.weight, "step": state.step, "at": round(now, 3)})
        moved = _replace(
            state, now, pending=None, weight=op.weight, weight_applied_at=now,
            window_started=None, last_check=None, failed_checks=0, last_scrape=None,
            window={}, last_analysis=None, holding=None, applied=applied,
        )  # fmt: skip
        return dataclasses.replace(moved, history=_event(moved, now, "weight"))
    if op.kind == "shadow":
        shadowing = _replace(
            state, now, pending=None, weight=0, weight_applied_at=now, window_started=None,
            last_check=None, failed_checks=0, last_scrape=None, window={}, last_analysis=None,
            holding=None,
            shadow={**(state.shadow or {}), "status": "running", "started_at": now,
                    "cursor": {}, "tally": {}},
        )  # fmt: skip
        return dataclasses.replace(shadowing, history=_event(shadowing, now, "shadow"))
    if op.kind == "finish":
        done = _replace(
            state, now, pending=None, phase=Phase.SHADOW_PASSED, weight=0, finished_at=now,
            holding=None,
        )  # fmt: skip
        return dataclasses.replace(done, history=_event(done, now, "finished", reason=op.reason))
    if op.kind == "promote":
        done = _replace(
            state, now, pending=None, phase=Phase.PROMOTED, weight=100, finished_at=now,
            holding=None,
        )  # fmt: skip
        return dataclasses.replace(done, history=_event(done, now, "promoted", reason=op.reason))
    done = _replace(
        state, now, pending=None, phase=Phase.ROLLED_BACK, weight=0, finished_at=now, holding=None
    )
    return dataclasses.replace(
        done, history=_event(done, now, "rolled_back", reason=op.reason, failure=state.failure)
    )


def weight_zeroed(state: RolloutState, now: float) -> RolloutState:
    """During a rollback: the canary already gets no traffic (bookkeeping may still be due)."""
    if state.weight == 0:
        return state
    zeroed = _replace(state, now, weight=0)
    return dataclasses.replace(zeroed, history=_event(zeroed, now, "weight"))


def begin_window(state: RolloutState, snapshot: Snapshot, now: float) -> RolloutState:
    """The canary serves its weight: start the analysis window from this baseline scrape."""
    started = _replace(
        state, now, window_started=now, last_check=now, last_scrape=snapshot, window={},
        failed_checks=0, holding=None,
    )  # fmt: skip
    return dataclasses.replace(
        started,
        history=_event(
            started, now, "serving", after_s=round(now - (state.weight_applied_at or now), 3)
        ),
    )


def observe(state: RolloutState, snapshot: Snapshot, now: float) -> RolloutState:
    """Add what happened since the last scrape to the window and to the champion reference."""
    delta = increase(state.last_scrape, snapshot)
    champion, challenger = by_side(delta, state.version)
    window = {
        "champion": state.window.get("champion", Counts()).plus(champion),
        "challenger": state.window.get("challenger", Counts()).plus(challenger),
    }
    holding = state.holding if hold_key(state) in ("window", "registry") else None
    return _replace(
        state, now, last_scrape=snapshot, window=window,
        reference=state.reference.plus(champion), holding=holding,
    )  # fmt: skip


def sides(state: RolloutState) -> tuple[Counts, Counts]:
    """(champion, challenger) to compare: the champion's window, or at high weights (when it
    gets too little traffic) everything the champion served during the rollout."""
    champion = state.window.get("champion", Counts())
    if champion.requests < state.plan.min_requests:
        champion = state.reference
    return champion, state.window.get("challenger", Counts())


def window_ends(state: RolloutState) -> float | None:
    return None if state.window_started is None else state.window_started + state.plan.window_s


def check_due(state: RolloutState, now: float) -> bool:
    if state.window_started is None or state.pending is not None:
        return False
    if state.phase is not Phase.PROGRESSING:
        return False
    last = state.last_check or state.window_started
    end = window_ends(state) or now
    return now - last >= state.plan.check_interval_s or (now >= end > last)


def next_check_at(state: RolloutState) -> float | None:
    if state.window_started is None:
        return None
    last = state.last_check or state.window_started
    end = window_ends(state) or last
    due = last + state.plan.check_interval_s
    return min(due, end) if end > last else due


def next_op(plan: Plan, step: int) -> tuple[int, Op]:
    """After step ``step`` passed: the next weight, or promotion after the last one."""
    if step + 1 < len(plan.steps):
        return step + 1, Op("set_weight", plan.steps[step + 1])
    return step, Op("promote", 100, "every window passed")


def checked(state: RolloutState, analysis: Analysis, now: float) -> RolloutState:
    """Record a check without deciding anything (used when the decision must wait)."""
    return _replace(state, now, last_check=now, last_analysis=analysis.to_dict())


def judge(state: RolloutState, analysis: Analysis, now: float) -> RolloutState:
    """Decide after one check: count failures, roll back, extend, advance or promote."""
    plan = state.plan
    state = checked(state, analysis, now)
    final = now >= (window_ends(state) or now)
    if analysis.verdict is Verdict.FAIL:
        failures = state.failed_checks + 1
        state = dataclasses.replace(
            state,
            failed_checks=failures,
            history=_event(state, now, "check", verdict="fail", analysis=analysis.to_dict()),
        )
        if failures >= plan.max_failed_checks:
            return rollback(state, now, analysis.reason, failure_of(analysis))
        return state
    if analysis.verdict is Verdict.INCONCLUSIVE:
        if final:
            return hold(state, f"window extended: {analysis.reason}", now, key="window")
        return state
    state = dataclasses.replace(state, failed_checks=0)
    if not final:
        return state
    step, op = next_op(plan, state.step)
    passed = dataclasses.replace(
        state,
        holding=None,
        history=_event(state, now, "window", verdict="pass", analysis=analysis.to_dict()),
    )
    if op.kind == "promote":
        return dataclasses.replace(passed, phase=Phase.PROMOTING, pending=op)
    return dataclasses.replace(passed, step=step, pending=op)


def shadowing(state: RolloutState) -> bool:
    """Is the rollout in its shadow phase (started, not yet decided)?"""
    return state.shadow is not None and state.shadow.get("status") == "running"


def judge_shadow(
    state: RolloutState,
    analysis: Analysis,
    tally: dict[str, Any],
    cursor: dict[str, Any],
    now: float,
    failure: dict[str, Any] | None = None,
) -> RolloutState:
    """Decide after one shadow check: fail at once, pass after ``duration_s``, or wait; a
    shadow without enough data at ``max_duration_s`` fails (missing data is never a pass)."""
    assert state.shadow is not None
    plan = state.plan.shadow
    shadow = {**state.shadow, "tally": tally, "cursor": cursor, "last_check": now}
    state = dataclasses.replace(checked(state, analysis, now), shadow=shadow)
    elapsed = now - float(shadow["started_at"])
    verdict = analysis.verdict
    if verdict is Verdict.INCONCLUSIVE and elapsed >= plan.max_duration_s:
        verdict = Verdict.FAIL
        analysis = dataclasses.replace(
            analysis,
            verdict=Verdict.FAIL,
            reason=f"no verdict after {plan.max_duration_s:g}s: {analysis.reason}",
        )
    if verdict is Verdict.FAIL:
        decided = {**shadow, "status": "failed", "decided_at": now}
        state = dataclasses.replace(
            state,
            shadow=decided,
            history=_event(
                state, now, "check", verdict="fail", analysis=analysis.to_dict(), stage="shadow"
            ),
        )
        record = dict(failure or {})
        record.update(reason=analysis.reason, stage="shadow")
        if not analysis.failed:
            record["metric"] = "pairs"
        return rollback(state, now, f"shadow failed: {analysis.reason}", record)
    if verdict is Verdict.INCONCLUSIVE or elapsed < plan.duration_s:
        return state
    decided = {**shadow, "status": "passed", "decided_at": now}
    passed = dataclasses.replace(
        state,
        shadow=decided,
        holding=None,
        history=_event(
            state, now, "window", verdict="pass", analysis=analysis.to_dict(), stage="shadow"
        ),
    )
    if state.plan.canaries:
        return dataclasses.replace(passed, pending=Op("set_weight", state.plan.steps[0]))
    return dataclasses.replace(passed, pending=Op("finish", 0, "shadow passed"))


def failure_of(analysis: Analysis) -> dict[str, Any]:
    """The failing metrics with their values, for the rolled-back version's tags."""
    failed = analysis.failed
    return {
        "metric": ",".join(c.name for c in failed) or "none",
        "checks": [c.to_dict() for c in failed],
        "requests": {
            "champion": analysis.champion_requests,
            "challenger": analysis.challenger_requests,
        },
    }


def rollback(
    state: RolloutState, now: float, reason: str, failure: dict[str, Any] | None = None
) -> RolloutState:
    """Weight 0 at once, then the registry bookkeeping (the pending rollback operation)."""
    if state.terminal or state.phase is Phase.ROLLING_BACK:
        return state
    return _replace(
        state, now, phase=Phase.ROLLING_BACK, pending=Op("rollback", 0, reason),
        failure=failure or {"metric": "none", "reason": reason},
    )  # fmt: skip


def hold(state: RolloutState, reason: str, now: float, key: str | None = None) -> RolloutState:
    """Keep the current weight and say why; one event per episode of the same cause (``key``),
    however often the reason's numbers change."""
    key = key or reason
    held = _replace(state, now, holding=reason)
    if state.holding is not None and hold_key(state) == key:
        return held
    return dataclasses.replace(held, history=_event(held, now, "hold", reason=reason, key=key))


def hold_key(state: RolloutState) -> str | None:
    """The cause of the current hold (None when not holding)."""
    if state.holding is None:
        return None
    last = next((e for e in reversed(state.history) if e["event"] == "hold"), None)
    return None if last is None else str(last.get("key", last.get("reason")))


def not_ready(state: RolloutState, reason: str, now: float) -> RolloutState:
    """The canary does not serve its weight yet: wait, up to ready_timeout_s, then roll back."""
    since = state.weight_applied_at or state.created_at
    if now - since > state.plan.ready_timeout_s:
        return rollback(
            state, now, f"canary not ready after {state.plan.ready_timeout_s:g}s: {reason}",
            {"metric": "readiness", "reason": reason},
        )  # fmt: skip
    return hold(state, f"waiting for the canary: {reason}", now, key="ready")


def apply_command(state: RolloutState, command: Command, now: float) -> RolloutState:
    """A manual override; each command id is acted on once."""
    if command.id == state.command_seen or command.rollout_id != state.id:
        return state
    seen = _replace(state, now, command_seen=command.id)
    if state.terminal:
        return seen
    who = f" by {command.by}" if command.by else ""
    event = _event(seen, now, command.action, by=command.by)
    if command.action == "pause" and state.phase is Phase.PROGRESSING:
        return dataclasses.replace(seen, phase=Phase.PAUSED, history=event)
    if command.action == "resume" and state.phase is Phase.PAUSED:
        return dataclasses.replace(
            seen, phase=Phase.PROGRESSING, window_started=None, last_check=None,
            last_scrape=None, window={}, failed_checks=0, history=event,
        )  # fmt: skip
    if command.action == "abort" and state.phase in (Phase.PROGRESSING, Phase.PAUSED):
        return rollback(
            dataclasses.replace(seen, history=event), now, f"aborted{who}",
            {"metric": "manual", "reason": f"aborted{who}"},
        )  # fmt: skip
    if command.action == "promote" and state.phase in (Phase.PROGRESSING, Phase.PAUSED):
        return dataclasses.replace(
            seen, phase=Phase.PROMOTING, pending=Op("promote", 100, f"promoted{who}"),
            history=event,
        )  # fmt: skip
    return seen


def claim(
    state: RolloutState, owner: str, now: float, lease_s: float, owner_alive: bool | None
) -> RolloutState | None:
    """Take (or keep) the right to drive this rollout; None while another driver holds it.

    A lease is free when unowned, ours, or held by a process known to be dead
    (``owner_alive`` False: same host, pid gone); a live process on this host keeps it; an
    owner we cannot see (another host) keeps it until its heartbeat is ``lease_s`` old.
    """
    if state.owner not in (None, owner):
        fresh = state.heartbeat is not None and now - state.heartbeat < lease_s
        if owner_alive is True or (fresh and owner_alive is None):
            return None
    return dataclasses.replace(state, owner=owner, heartbeat=now)


def signature_mismatch(
    champion: Mapping[str, Any] | None, challenger: Mapping[str, Any] | None
) -> str | None:
    """Why the challenger cannot take the champion's traffic (inputs/outputs differ), or None.

    Signatures are MLflow's ``ModelSignature.to_dict()``; a missing one cannot be compared.
    """
    if not champion or not challenger:
        return None
    for part in ("inputs", "outputs"):
        if champion.get(part) != challenger.get(part):
            return (
                f"model signature {part} differ: champion {champion.get(part)} vs "
                f"challenger {challenger.get(part)}"
            )
    return None


# -- what to record -------------------------------------------------------------------------


def _iso(t: float | None) -> str:
    if t is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def document(state: RolloutState) -> dict[str, Any]:
    """What every JSON view of a rollout says (``rollout status --json``, the run's artifact)."""
    return {
        "id": state.id,
        "model": state.model,
        "version": state.version,
        "champion": state.champion,
        "backend": state.backend,
        "phase": state.phase.value,
        "weight": state.weight,
        "plan": state.plan.to_dict(),
        "failure": state.failure,
        "created_at": state.created_at,
        "finished_at": state.finished_at,
        "history": list(state.history),
    }


def steps_table(state: RolloutState) -> list[dict[str, Any]]:
    """One row per weight the canary held: when, for how long, what was measured, verdict."""
    rows: list[dict[str, Any]] = []
    for event in state.history:
        kind = event["event"]
        if kind == "shadow":
            rows.append({
                "step": "shadow", "weight": 0, "applied_at": event["at"], "serving_after_s": None,
                "verdict": None, "decided_at": None, "analysis": None, "reason": "",
            })  # fmt: skip
        elif kind == "weight":
            rows.append({
                "step": event["step"] + 1 if event["weight"] else None,
                "weight": event["weight"], "applied_at": event["at"], "serving_after_s": None,
                "verdict": None, "decided_at": None, "analysis": None, "reason": "",
            })  # fmt: skip
        elif not rows:
            continue
        elif kind == "serving":
            rows[-1]["serving_after_s"] = event.get("after_s")
        elif kind in ("window", "check"):
            rows[-1].update(
                verdict=event.get("verdict"), decided_at=event["at"], analysis=event.get("analysis")
            )
        elif kind in ("promoted", "rolled_back", "finished"):
            rows[-1]["reason"] = event.get("reason", "")
            rows[-1]["outcome"] = kind
    return rows


def version_tags(state: RolloutState) -> dict[str, str]:
    """Tags on the challenger's model version: the outcome, the position, one tag per step."""
    outcome = {
        Phase.PROMOTED: "promoted",
        Phase.ROLLED_BACK: "rolled_back",
        Phase.SHADOW_PASSED: "shadow_passed",
    }.get(state.phase, "in_progress")
    shadow_failed = (state.failure or {}).get("stage") == "shadow"
    if state.phase is Phase.ROLLED_BACK and shadow_failed:
        outcome = "shadow_failed"
    tags = {
        TAG: outcome,
        f"{TAG}.id": state.id,
        f"{TAG}.phase": state.phase.value,
        f"{TAG}.weight": str(state.weight),
        f"{TAG}.step": f"{min(state.step + 1, len(state.plan.steps))}/{len(state.plan.steps)}",
        f"{TAG}.champion": state.champion,
        f"{TAG}.backend": state.backend,
        f"{TAG}.mode": state.plan.mode,
        f"{TAG}.plan": json.dumps(state.plan.to_dict(), separators=(",", ":")),
        f"{TAG}.updated_at": _iso(state.updated_at),
    }
    if state.run_id:
        tags[f"{TAG}.run_id"] = state.run_id
    if state.holding:
        tags[f"{TAG}.holding"] = state.holding[:4000]
    for i, row in enumerate(steps_table(state), 1):
        tags[f"{TAG}.step.{i}"] = json.dumps(compact_row(row), separators=(",", ":"))[:4900]
    if state.shadow is not None:
        tags[f"{TAG}.shadow"] = json.dumps(shadow_summary(state), separators=(",", ":"))[:4900]
    if state.phase is Phase.ROLLED_BACK and state.failure:
        if shadow_failed:
            ids = state.failure.get("disagreeing_ids") or []
            tags[f"{TAG}.disagreeing_ids"] = ",".join(ids)[:4900]
        tags[f"{TAG}.failed_metric"] = str(state.failure.get("metric", "none"))
        tags[f"{TAG}.failed_values"] = json.dumps(
            state.failure.get("checks") or state.failure.get("reason", ""), separators=(",", ":")
        )[:4900]
    if state.terminal:
        reason = state.history[-1].get("reason", "") if state.history else ""
        tags[f"{TAG}.reason"] = str(reason)[:4900]
        tags[f"{TAG}.finished_at"] = _iso(state.finished_at)
    return tags


def shadow_summary(state: RolloutState) -> dict[str, Any]:
    """The shadow phase in a few numbers: status, pairs, agreement, confusion, timing."""
    shadow = state.shadow or {}
    tally = shadow.get("tally") or {}
    pairs = int(tally.get("pairs", 0))
    started = shadow.get("started_at")
    decided = shadow.get("decided_at")
    return {
        "status": shadow.get("status"),
        "pairs": pairs,
        "agreement": round(int(tally.get("agree", 0)) / pairs, 6) if pairs else None,
        "confusion": tally.get("confusion") or {},
        "errors": tally.get("errors") or {},
        "replayed": int((tally.get("challenger") or {}).get("ok", 0))
        + int((tally.get("challenger") or {}).get("error", 0)),
        "verdict_after_s": (
            None if started is None or decided is None else round(decided - started, 3)
        ),
    }


def compact_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A step row with the measured values only (for a tag, a table cell or a metric)."""
    out: dict[str, Any] = {
        "weight": row["weight"],
        "at": _iso(row.get("applied_at")),
        "verdict": row.get("verdict"),
    }
    if row.get("step") is not None:
        out["step"] = row["step"]  # "shadow", or the canary step's number
    analysis = row.get("analysis")
    if analysis:
        out["requests"] = analysis.get("requests")
        for check in analysis.get("checks", []):
            out[check["name"]] = {
                "champion": check.get("champion"),
                "challenger": check.get("challenger"),
                "value": check.get("value"),
                "passed": check.get("passed"),
            }
    if row.get("reason"):
        out["reason"] = row["reason"]
    return out


def superseded_tags(state: RolloutState) -> dict[str, str]:
    """Tags on the previous champion once the challenger is promoted."""
    return {TAG: "superseded", f"{TAG}.superseded_by": state.version, f"{TAG}.id": state.id}
