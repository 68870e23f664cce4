"""The shadow phase: pairing logged events, the pairwise judge (hand-computed values), the
phase's transitions, what a failed shadow records, and the receiver's tail."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest

from roost.monitor import events
from roost.monitor.journal import Record
from roost.monitor.tail import Tail
from roost.rollout import engine
from roost.rollout.analysis import Counts, Verdict
from roost.rollout.shadow import (
    Answer,
    Logged,
    ShadowThresholds,
    Tally,
    champion_inferences,
    failure,
    judge,
    sampled,
)
from roost.rollout.state import Phase, Plan, RolloutState, ShadowPlan

pytestmark = pytest.mark.unit

T = ShadowThresholds()  # agreement >= 0.95, JS distance <= 0.1, |conf shift| <= 0.1, ...


def logged(i: int, label: str, conf: float = 0.8) -> Logged:
    return Logged(f"e{i}", {"instances": [f"text {i}"]}, (label,), (conf,))


def answer(i: int, label: str, conf: float = 0.8, latency: float = 0.004) -> Answer:
    return Answer(f"e{i}", latency, (label,), (conf,))


def live(n: int, p99_bucket: str = "0.005") -> Counts:
    """The champion's own metrics: n answered requests, all under ``p99_bucket`` seconds."""
    return Counts(ok=float(n), latency={p99_bucket: float(n), "+Inf": float(n)})


def tally_of(pairs: list[tuple[str, str]], conf: tuple[float, float] = (0.8, 0.8)) -> Tally:
    tally = Tally()
    for i, (mine, theirs) in enumerate(pairs):
        tally.add(logged(i, mine, conf[0]), answer(i, theirs, conf[1]))
    return tally


# -- the judge, against values computed by hand ------------------------------------------------


def test_identical_answers_pass_with_agreement_one() -> None:
    tally = tally_of([("positive", "positive")] * 60 + [("negative", "negative")] * 40)
    result = judge(tally, live(100), T, min_pairs=100)
    assert result.verdict is Verdict.PASS, result.reason
    agreement = result.metric("agreement")
    assert agreement is not None and agreement.value == 1.0 and agreement.passed
    js = result.metric("js_distance")
    assert js is not None and js.value == 0.0
    shift = result.metric("confidence_shift")
    assert shift is not None and shift.value == pytest.approx(0.0)
    assert tally.confusion == {"positive": {"positive": 60}, "negative": {"negative": 40}}


def test_flipped_fraction_is_the_disagreement_and_fails() -> None:
    # 100 pairs: the champion says positive 50, negative 50; the challenger flips 20 of the
    # positives to negative. Agreement 80/100 = 0.8. Label distributions: champion
    # (0.5, 0.5), challenger (positive 0.3, negative 0.7). M = (0.4, 0.6).
    # JS divergence = 0.5*[0.5 log2(0.5/0.4) + 0.5 log2(0.5/0.6)]
    #               + 0.5*[0.3 log2(0.3/0.4) + 0.7 log2(0.7/0.6)]
    pairs = [("positive", "negative")] * 20 + [("positive", "positive")] * 30
    pairs += [("negative", "negative")] * 50
    tally = tally_of(pairs)
    result = judge(tally, live(100), T, min_pairs=100)
    assert result.verdict is Verdict.FAIL
    agreement = result.metric("agreement")
    assert agreement is not None and agreement.value == pytest.approx(0.8)
    assert agreement.passed is False
    divergence = 0.5 * (0.5 * math.log2(0.5 / 0.4) + 0.5 * math.log2(0.5 / 0.6)) + 0.5 * (
        0.3 * math.log2(0.3 / 0.4) + 0.7 * math.log2(0.7 / 0.6)
    )
    js = result.metric("js_distance")
    assert js is not None and js.value == pytest.approx(math.sqrt(divergence))
    # = 0.5 * 0.029447 + 0.5 * 0.031164 = 0.030306 bits; distance sqrt = 0.17408 > 0.1: fails
    assert js.value == pytest.approx(0.17408, abs=1e-4)
    assert js.passed is False
    assert tally.confusion["positive"] == {"negative": 20, "positive": 30}
    assert tally.disagreeing == [f"e{i}" for i in range(20)]
    record = failure(result, tally)
    assert record["metric"] == "agreement,js_distance"
    assert record["agreement"] == pytest.approx(0.8)
    assert record["disagreeing_ids"][:3] == ["e0", "e1", "e2"]
    assert record["stage"] == "shadow"


def test_confidence_shift_is_the_signed_mean_difference() -> None:
    tally = tally_of([("positive", "positive")] * 100, conf=(0.9, 0.75))
    result = judge(tally, live(100), T, min_pairs=100)
    shift = result.metric("confidence_shift")
    assert shift is not None and shift.value == pytest.approx(-0.15)
    assert shift.passed is False and result.verdict is Verdict.FAIL
    within = judge(tally_of([("a", "a")] * 100, conf=(0.8, 0.85)), live(100), T, 100)
    assert within.verdict is Verdict.PASS


def test_challenger_errors_and_latency_against_the_champion() -> None:
    tally = Tally()
    for i in range(100):
        if i % 10 == 0:  # 10 of 100 replays time out: error rate 0.1 vs the champion's 0
            tally.add(logged(i, "a"), Answer(f"e{i}", 2.0, error="timeout"))
        else:
            tally.add(logged(i, "a"), answer(i, "a"))
    assert tally.pairs == 90 and tally.errors == {"timeout": 10}
    result = judge(tally, live(100), T, min_pairs=50)
    errors = result.metric("error_rate")
    assert errors is not None and errors.challenger == pytest.approx(0.1)
    assert errors.value == pytest.approx(0.1) and errors.passed is False
    p99 = result.metric("p99_latency_ms")
    # rank 0.99 * 100 = 99 lies in the 2.5 s bucket (90 answers <= 5 ms, 10 at 2 s): the
    # interpolated p99 is far above max(5 ms * 2, 5 ms + 50 ms).
    assert p99 is not None and p99.challenger is not None and p99.challenger > 1000
    assert p99.passed is False
    assert result.verdict is Verdict.FAIL
    # With the challenger server's own histogram (the replays measured inside it), that is
    # what p99 compares: 100 answers under 7.5 ms against the champion's 5 ms bucket passes.
    server = Counts(ok=100.0, latency={"0.0075": 100.0, "+Inf": 100.0})
    fair = judge(tally, live(100), T, min_pairs=50, challenger_live=server)
    p99 = fair.metric("p99_latency_ms")
    assert p99 is not None and p99.passed is True and p99.challenger is not None
    # rank 99 of 100 in the first bucket (0, 7.5 ms]: 7.5 * 0.99 = 7.425 ms; champion 4.95 ms
    assert p99.challenger == pytest.approx(7.425) and p99.champion == pytest.approx(4.95)


def test_a_challenger_that_always_fails_is_judged_without_pairs() -> None:
    tally = Tally()
    for i in range(120):
        tally.add(logged(i, "a"), Answer(f"e{i}", 0.01, error="http 500"))
    result = judge(tally, live(120), T, min_pairs=100)
    assert tally.pairs == 0
    assert result.verdict is Verdict.FAIL
    assert [c.name for c in result.failed] == ["error_rate"]


def test_missing_data_is_never_a_pass() -> None:
    # Too few pairs: inconclusive even though every pair agrees.
    few = judge(tally_of([("a", "a")] * 99), live(100), T, min_pairs=100)
    assert few.verdict is Verdict.INCONCLUSIVE and "99 < 100" in few.reason
    # Pairs enough, but the champion's own metrics are missing: no p99/error reference.
    blind = judge(tally_of([("a", "a")] * 100), Counts(), T, min_pairs=100)
    assert blind.verdict is Verdict.INCONCLUSIVE
    # Nothing at all.
    assert judge(Tally(), Counts(), T, 1).verdict is Verdict.INCONCLUSIVE


def test_tally_round_trips_through_the_state_document() -> None:
    tally = tally_of([("a", "b"), ("a", "a")])
    assert Tally.from_dict(json.loads(json.dumps(tally.to_dict()))).to_dict() == tally.to_dict()


# -- pairing the logged events ------------------------------------------------------------------


def event(kind: str, event_id: str, data: Any, version: str | None = None) -> dict[str, Any]:
    attrs = {"inferenceservicename": "sentiment"}
    if version:
        attrs[events.VERSION_EXTENSION] = version
    return {"id": event_id, "type": kind, "attributes": attrs, "data": data}


def test_champion_inferences_joins_request_and_response_by_id() -> None:
    req, resp = events.REQUEST_TYPE, events.RESPONSE_TYPE
    v1_answer = {"predictions": [{"label": "positive", "confidence": 0.9}], "model_version": "1"}
    v2_answer = {
        "id": "b",
        "outputs": [
            {"name": "label", "data": ["negative", "neutral"]},
            {"name": "confidence", "data": [0.7, 0.6]},
        ],
    }
    log = [
        event(req, "a", {"instances": ["great"]}, "1"),
        event(resp, "a", v1_answer, "1"),
        event(req, "b", {"inputs": [{"name": "text", "data": ["bad", "meh"]}]}),
        event(resp, "b", v2_answer, "1"),
        event(req, "c", {"instances": ["replayed to the challenger"]}, "2"),
        event(resp, "c", v1_answer | {"model_version": "2"}, "2"),
        event(req, "d", {"instances": ["no answer logged yet"]}, "1"),
    ]
    found = champion_inferences(log, "1")
    assert [x.id for x in found] == ["a", "b"]
    assert found[0].labels == ("positive",) and found[0].confidences == (0.9,)
    assert found[1].labels == ("negative", "neutral") and found[1].confidences == (0.7, 0.6)


def test_sampling_is_deterministic_by_id() -> None:
    ids = [f"id-{i}" for i in range(2000)]
    chosen = [i for i in ids if sampled(i, 0.25)]
    assert chosen == [i for i in ids if sampled(i, 0.25)]
    assert 0.2 < len(chosen) / len(ids) < 0.3
    assert all(sampled(i, 1.0) for i in ids)


def test_receiver_tail_numbers_events_and_filters_by_model() -> None:
    tail = Tail(size=3)

    def rec(event_id: str, model: str) -> Record:
        attrs = {"inferenceservicename": model}
        return Record(event_id, events.REQUEST_TYPE, 1.0, attributes=attrs, data=b"{}")

    tail.add([rec("a", "m"), rec("b", "other"), rec("a", "m"), rec("c", "m")])
    doc = tail.read(0, 10, "m")
    assert [e["id"] for e in doc["events"]] == ["a", "c"]  # the duplicate of a stored once
    assert doc["next"] == 3 and doc["first"] == 1
    tail.add([rec("d", "m"), rec("e", "m")])  # the ring keeps the last 3
    doc = tail.read(3, 1, "m")
    assert [e["seq"] for e in doc["events"]] == [4] and doc["next"] == 4 and doc["first"] == 3
    # Events received before ``since`` (before a shadow began) are passed over, not counted.
    late = Record("f", events.REQUEST_TYPE, 9.0, attributes={"inferenceservicename": "m"})
    tail.add([late])
    doc = tail.read(0, 1, "m", since=5.0)
    assert [e["id"] for e in doc["events"]] == ["f"] and doc["next"] == 6


# -- the phase's transitions ----------------------------------------------------------------------

SHADOW = ShadowPlan(duration_s=10.0, max_duration_s=30.0, min_pairs=100)
PLAN = Plan(steps=(25, 100), window_s=10.0, check_interval_s=2.0, min_requests=20,
            mode="shadow-then-canary", shadow=SHADOW)  # fmt: skip


def shadowing(plan: Plan = PLAN) -> RolloutState:
    state = engine.start(plan, "sentiment", "2", "1", "local", 0.0, "r1")
    assert state.pending is not None and state.pending.kind == "shadow"
    state = dataclasses.replace(state, shadow={"status": "pending", "receiver": "http://x"})
    state = engine.commit(state, 1.0)
    assert engine.shadowing(state) and state.weight == 0
    assert state.shadow is not None and state.shadow["receiver"] == "http://x"
    return state


def decide(state: RolloutState, tally: Tally, now: float) -> RolloutState:
    analysis = judge(tally, live(200), SHADOW.thresholds, SHADOW.min_pairs)
    return engine.judge_shadow(
        state, analysis, tally.to_dict(), {"epoch": "e", "seq": 9}, now, failure(analysis, tally)
    )


def test_shadow_passes_after_its_duration_then_the_canary_begins() -> None:
    state = shadowing()
    good = tally_of([("a", "a")] * 150)
    early = decide(state, good, 5.0)  # passing, but the phase lasts 10 s
    assert early.pending is None and engine.shadowing(early)
    passed = decide(early, good, 11.5)
    assert passed.pending is not None and passed.pending.kind == "set_weight"
    assert passed.pending.weight == 25
    assert passed.shadow is not None and passed.shadow["status"] == "passed"
    canary = engine.commit(passed, 12.0)
    rows = engine.steps_table(canary)
    assert [row["step"] for row in rows] == ["shadow", 1]
    assert rows[0]["verdict"] == "pass"
    assert engine.compact_row(rows[0])["agreement"]["value"] == 1.0
    assert json.loads(engine.version_tags(canary)["roost.rollout.shadow"])["pairs"] == 150


def test_mode_shadow_ends_shadow_passed() -> None:
    state = shadowing(dataclasses.replace(PLAN, mode="shadow"))
    passed = decide(state, tally_of([("a", "a")] * 150), 12.0)
    assert passed.pending is not None and passed.pending.kind == "finish"
    done = engine.commit(passed, 12.5)
    assert done.phase is Phase.SHADOW_PASSED and done.terminal
    assert engine.version_tags(done)["roost.rollout"] == "shadow_passed"


def test_a_failed_shadow_rolls_back_recorded_as_shadow_failed() -> None:
    state = shadowing()
    bad = tally_of([("a", "b")] * 30 + [("a", "a")] * 90)
    failed = decide(state, bad, 4.0)  # fails at once, before the duration
    assert failed.phase is Phase.ROLLING_BACK
    assert failed.pending is not None and failed.pending.kind == "rollback"
    done = engine.commit(failed, 4.5)
    tags = engine.version_tags(done)
    assert tags["roost.rollout"] == "shadow_failed"
    assert "agreement" in tags["roost.rollout.failed_metric"]
    values = json.loads(tags["roost.rollout.failed_values"])
    agreement = next(c for c in values if c["name"] == "agreement")
    assert agreement["value"] == pytest.approx(0.75)
    assert tags["roost.rollout.disagreeing_ids"].split(",")[:2] == ["e0", "e1"]
    assert [row["step"] for row in engine.steps_table(done)] == ["shadow"]


def test_a_shadow_without_enough_pairs_fails_at_its_max_duration() -> None:
    state = shadowing()
    thin = tally_of([("a", "a")] * 10)
    waiting = decide(state, thin, 20.0)
    assert waiting.pending is None and engine.shadowing(waiting)
    failed = decide(waiting, thin, 31.5)
    assert failed.phase is Phase.ROLLING_BACK
    assert failed.failure is not None and failed.failure["metric"] == "pairs"
    assert "no verdict after 30s" in failed.failure["reason"]


def test_plan_round_trips_with_mode_and_shadow() -> None:
    assert Plan.from_dict(json.loads(json.dumps(PLAN.to_dict()))) == PLAN
    old = PLAN.to_dict()
    del old["mode"], old["shadow"]
    assert Plan.from_dict(old).mode == "canary"  # a stored plan from before shadows


def test_kserve_shadow_url_is_the_latest_tag_of_the_predictor() -> None:
    from roost.rollout.backends.base import NotReady
    from roost.rollout.backends.kserve import shadow_url

    traffic = [
        {"tag": "prev", "revisionName": "p-00001", "percent": 100, "url": "http://prev-p.ns"},
        {"tag": "latest", "revisionName": "p-00002", "percent": 0, "latestRevision": True,
         "url": "http://latest-p.ns"},
    ]  # fmt: skip
    obj = {"status": {"components": {"predictor": {"traffic": traffic}}}}
    assert shadow_url(obj) == "http://latest-p.ns"
    with pytest.raises(NotReady, match="enable-tag-routing"):
        shadow_url({"status": {"components": {"predictor": {"traffic": traffic[:1]}}}})


# -- the replay against a real HTTP server that hangs on some inputs ---------------------------


class _Challenger:
    """A loopback HTTP server answering REST v1; a text containing "hang" waits for release."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.release = threading.Event()
        release = self.release

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if b"hang" in body:
                    release.wait(120)  # far past the replay's timeout
                answer = json.dumps({"predictions": [{"label": "positive", "confidence": 0.9}]})
                data = answer.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def challenger() -> Any:
    server = _Challenger()
    yield server
    server.close()


def _logged_texts(texts: list[str]) -> list[Logged]:
    return [Logged(f"e{i}", {"instances": [t]}, ("positive",), (0.9,)) for i, t in enumerate(texts)]


def test_a_challenger_that_hangs_on_some_inputs_times_out_on_those_and_fails_the_shadow(
    challenger: _Challenger,
) -> None:
    from roost.rollout.replay import replay

    texts = [f"text {i} hang" if i % 4 == 0 else f"text {i}" for i in range(40)]
    answers = replay(_logged_texts(texts), challenger.url, "m", timeout_s=0.3, concurrency=4)
    assert not challenger.release.is_set()  # every hanging request was still hanging
    assert all(a is not None for a in answers)  # no budget: every inference was sent
    hung = [a for t, a in zip(texts, answers, strict=True) if "hang" in t]
    fine = [a for t, a in zip(texts, answers, strict=True) if "hang" not in t]
    assert [a.error for a in hung if a is not None] == ["timeout"] * 10
    assert all(a is not None and a.labels == ("positive",) and not a.error for a in fine)
    tally = Tally()
    for item, got in zip(_logged_texts(texts), answers, strict=True):
        assert got is not None
        tally.add(item, got)
    result = judge(tally, live(40), T, min_pairs=20)
    assert result.verdict is Verdict.FAIL  # 25 % of replays failed: error_rate, never a pass
    assert tally.errors == {"timeout": 10}


def test_a_replay_pass_is_bounded_by_its_budget_not_by_the_hanging_requests(
    challenger: _Challenger,
) -> None:
    """40 hanging inputs at 0.5 s each, 2 at a time, would take 10 s; the budget ends it first."""
    from roost.rollout.replay import replay

    texts = [f"text {i} hang" for i in range(40)]
    answers = replay(
        _logged_texts(texts), challenger.url, "m", timeout_s=0.5, concurrency=2, budget_s=1.0
    )
    assert not challenger.release.is_set()
    sent = [a for a in answers if a is not None]
    assert sent and all(a.error == "timeout" for a in sent)
    # each worker sends while the budget lasts, then stops: far fewer than 40 were sent
    assert len(sent) < len(texts), len(sent)
