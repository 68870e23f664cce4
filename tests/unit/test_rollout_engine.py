"""The rollout policy as pure transitions: steps, verdicts, recovery, overrides, leases, tags."""

from __future__ import annotations

import dataclasses
import json

import pytest

from roost.config import load_settings
from roost.rollout import engine
from roost.rollout.analysis import Counts, Snapshot, Thresholds, Verdict, analyse
from roost.rollout.state import Command, Op, Phase, Plan, RolloutState

pytestmark = pytest.mark.unit

PLAN = Plan(steps=(10, 50, 100), window_s=10.0, check_interval_s=2.0, min_requests=20,
            max_failed_checks=2, ready_timeout_s=30.0)  # fmt: skip


def counts(n: int, errors: int = 0, labels: dict[str, float] | None = None) -> Counts:
    ok = n - errors
    return Counts(
        ok=ok, error=errors, latency={"0.005": ok * 0.9, "0.01": float(ok), "+Inf": float(ok)},
        labels=labels or {"negative": ok * 0.5, "neutral": ok * 0.3, "positive": ok * 0.2},
        confidence_sum=0.8 * ok, confidence_count=ok,
    )  # fmt: skip


class Sim:
    """Cumulative counters of two servers, growing by ``weight`` per tick (the traffic split)."""

    def __init__(self, rps: int = 50, error_share: float = 0.0, skew: bool = False) -> None:
        self.champion, self.challenger = Counts(), Counts()
        self.rps, self.error_share, self.skew = rps, error_share, skew

    def tick(self, weight: int, seconds: float) -> Snapshot:
        total = int(self.rps * seconds)
        canary = total * weight // 100
        errors = int(canary * self.error_share)
        labels = {"positive": float(canary - errors)} if self.skew else None
        self.challenger = self.challenger.plus(counts(canary, errors, labels))
        self.champion = self.champion.plus(counts(total - canary))
        return {"champ|1": self.champion, "chall|2": self.challenger}


def started(now: float = 0.0) -> RolloutState:
    return engine.start(PLAN, "sentiment", "2", "1", "local", now, "r1")


def drive(state: RolloutState, sim: Sim, until: float, dt: float = 1.0) -> RolloutState:
    """Play the controller: perform pending ops at once, observe and judge every ``dt``."""
    now = state.created_at
    while now < until and not state.terminal:
        now += dt
        if state.pending is not None:
            state = engine.commit(state, now)
            continue
        if state.phase is not Phase.PROGRESSING:
            continue
        snapshot = sim.tick(state.weight, dt)
        if state.window_started is None:
            state = engine.begin_window(state, snapshot, now)
            continue
        state = engine.observe(state, snapshot, now)
        if engine.check_due(state, now):
            champion, challenger = engine.sides(state)
            state = engine.judge(
                state, analyse(champion, challenger, PLAN.thresholds, PLAN.min_requests), now
            )
    return state


def test_plan_from_settings_and_its_timings() -> None:
    rollout = {
        "steps": [25, 50, 100],
        "window_s": 30,
        "check_interval_s": 5,
        "max_failed_checks": 3,
    }
    cfg = load_settings(None, {"rollout": rollout})
    plan = Plan.from_settings(cfg.rollout)
    assert plan.steps == (25, 50, 100)
    assert plan.min_promotion_s == 90 and plan.max_abort_s == 15
    assert "at least 3 x 30s = 90s" in plan.describe() and "at most 3 x 5s = 15s" in plan.describe()
    assert Plan.from_dict(plan.to_dict()) == plan


def test_a_new_rollout_asks_for_the_first_weight() -> None:
    state = started()
    assert state.phase is Phase.PROGRESSING and state.weight == 0
    assert state.pending == Op("set_weight", 10)
    assert state.history[0]["event"] == "started"


def test_a_good_canary_walks_every_step_then_promotes() -> None:
    state = drive(started(), Sim(), until=200)
    assert state.phase is Phase.PROMOTED and state.weight == 100
    assert [a["weight"] for a in state.applied] == [10, 50, 100]
    windows = [e for e in state.history if e["event"] == "window"]
    assert [w["weight"] for w in windows] == [10, 50, 100]
    assert all(w["verdict"] == "pass" for w in windows)
    # Each weight is held for at least one full window before the next.
    assert state.finished_at is not None and state.finished_at >= PLAN.min_promotion_s


def test_an_erroring_canary_is_rolled_back_at_the_first_step() -> None:
    state = drive(started(), Sim(error_share=0.3), until=200)
    assert state.phase is Phase.ROLLED_BACK and state.weight == 0
    assert [a["weight"] for a in state.applied] == [10]
    assert state.failure is not None and state.failure["metric"] == "error_rate"
    failed = state.failure["checks"][0]
    assert failed["name"] == "error_rate" and failed["challenger"] >= 0.2
    fails = [e for e in state.history if e["event"] == "check"]
    assert len(fails) == PLAN.max_failed_checks
    rolled = next(e for e in state.history if e["event"] == "rolled_back")
    serving = next(e for e in state.history if e["event"] == "serving")
    assert rolled["at"] - serving["at"] <= PLAN.window_s  # within one window


def test_a_skewed_canary_is_rolled_back_on_divergence() -> None:
    state = drive(started(), Sim(skew=True), until=200)
    assert state.phase is Phase.ROLLED_BACK
    assert state.failure is not None and state.failure["metric"] == "js_divergence"


def test_too_few_requests_holds_the_weight_and_never_promotes() -> None:
    state = drive(started(), Sim(rps=1), until=300)
    assert not state.terminal and state.weight == 10 and state.pending is None
    assert state.holding is not None and "too few requests" in state.holding
    assert [e["event"] for e in state.history].count("hold") == 1  # said once, not every check


def test_judge_counts_failures_before_rolling_back() -> None:
    state = drive(started(), Sim(), until=3)  # weight 10 committed, window started
    assert state.window_started is not None
    bad = analyse(counts(100), counts(40, errors=20), Thresholds(), 20)
    assert bad.verdict is Verdict.FAIL
    once = engine.judge(state, bad, 5.0)
    assert once.failed_checks == 1 and once.pending is None
    twice = engine.judge(once, bad, 7.0)
    assert twice.phase is Phase.ROLLING_BACK and twice.pending == Op("rollback", 0, bad.reason)
    good = analyse(counts(100), counts(40), Thresholds(), 20)
    assert engine.judge(once, good, 6.0).failed_checks == 0  # consecutive failures only


def test_a_weight_already_applied_before_a_crash_is_not_applied_again() -> None:
    pending = started()
    assert engine.needs_apply(pending.pending or Op("set_weight", 0), current_weight=None)
    assert engine.needs_apply(Op("set_weight", 10), current_weight=0)
    assert not engine.needs_apply(Op("set_weight", 10), current_weight=10)
    assert engine.needs_apply(Op("rollback", 0), current_weight=0)  # finalisers are idempotent
    # Committing twice (a resumed driver) still records the weight once.
    committed = engine.commit(pending, 1.0)
    assert engine.commit(committed, 2.0) == committed


def test_state_survives_a_round_trip_through_json() -> None:
    state = drive(started(), Sim(), until=25)
    again = RolloutState.loads(state.dumps())
    assert again == state
    assert json.loads(state.dumps())["phase"] == state.phase.value


def test_manual_overrides_act_once() -> None:
    state = drive(started(), Sim(), until=5)
    pause = Command("c1", state.id, "pause", 5.0, "ops")
    paused = engine.apply_command(state, pause, 5.0)
    assert paused.phase is Phase.PAUSED and paused.command_seen == "c1"
    assert engine.apply_command(paused, pause, 6.0) == paused
    assert drive(paused, Sim(), until=100).weight == paused.weight  # no verdicts while paused
    resumed = engine.apply_command(paused, Command("c2", state.id, "resume", 7.0), 7.0)
    assert resumed.phase is Phase.PROGRESSING and resumed.window_started is None
    aborted = engine.apply_command(resumed, Command("c3", state.id, "abort", 8.0, "ops"), 8.0)
    assert aborted.phase is Phase.ROLLING_BACK and aborted.pending == Op(
        "rollback", 0, "aborted by ops"
    )
    promoted = engine.apply_command(resumed, Command("c4", state.id, "promote", 8.0), 8.0)
    assert promoted.pending is not None and promoted.pending.kind == "promote"
    other = engine.apply_command(state, Command("c5", "another-rollout", "abort", 8.0), 8.0)
    assert other == state


def test_canary_never_ready_is_rolled_back_after_the_ready_timeout() -> None:
    state = engine.commit(started(), 1.0)
    waiting = engine.not_ready(state, "revision not ready", 10.0)
    assert waiting.phase is Phase.PROGRESSING and waiting.holding is not None
    late = engine.not_ready(state, "revision not ready", 1.0 + PLAN.ready_timeout_s + 1)
    assert late.phase is Phase.ROLLING_BACK
    assert late.failure is not None and late.failure["metric"] == "readiness"


@pytest.mark.parametrize(
    ("owner", "heartbeat", "alive", "claimable"),
    [
        (None, None, None, True),
        ("me", 99.0, True, True),
        ("other", 99.0, True, False),  # live process on this host
        ("other", 99.0, None, False),  # another host, fresh lease
        ("other", 50.0, None, True),  # another host, lease expired
        ("other", 99.0, False, True),  # same host, process gone (SIGKILL)
    ],
)
def test_claim(
    owner: str | None, heartbeat: float | None, alive: bool | None, claimable: bool
) -> None:
    state = dataclasses.replace(started(), owner=owner, heartbeat=heartbeat)
    claimed = engine.claim(state, "me", 100.0, lease_s=30.0, owner_alive=alive)
    assert (claimed is not None) == claimable
    if claimed is not None:
        assert claimed.owner == "me" and claimed.heartbeat == 100.0


def test_what_is_recorded_on_a_rolled_back_version() -> None:
    state = drive(started(), Sim(error_share=0.5), until=200)
    tags = engine.version_tags(state)
    assert tags["roost.rollout"] == "rolled_back"
    assert tags["roost.rollout.failed_metric"] == "error_rate"
    values = json.loads(tags["roost.rollout.failed_values"])
    assert values[0]["name"] == "error_rate" and values[0]["challenger"] > values[0]["threshold"]
    step = json.loads(tags["roost.rollout.step.1"])
    assert (
        step["weight"] == 10 and step["verdict"] == "fail" and step["requests"]["challenger"] >= 20
    )
    assert all(len(v) <= 5000 for v in tags.values())  # MLflow's tag value limit
    assert engine.superseded_tags(state)["roost.rollout"] == "superseded"


def test_steps_table_has_one_row_per_weight() -> None:
    rows = engine.steps_table(drive(started(), Sim(), until=200))
    assert [(r["weight"], r["verdict"]) for r in rows] == [
        (10, "pass"),
        (50, "pass"),
        (100, "pass"),
    ]
    assert rows[-1]["outcome"] == "promoted"
    assert all(r["serving_after_s"] is not None for r in rows)


def test_signature_mismatch() -> None:
    a = {"inputs": '[{"type": "string", "name": "text"}]', "outputs": '["label", "prob_a"]'}
    assert engine.signature_mismatch(a, dict(a)) is None
    assert engine.signature_mismatch(a, None) is None
    b = {**a, "outputs": '["label", "prob_b"]'}
    assert "outputs differ" in (engine.signature_mismatch(a, b) or "")
