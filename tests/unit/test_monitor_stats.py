"""Each drift / live-quality statistic against values computed by hand (pure functions)."""

from __future__ import annotations

import math

import pytest

from roost.monitor import stats
from roost.monitor.profile import Profile
from roost.monitor.report import BREACH, INSUFFICIENT, OK, Thresholds, Window, evaluate_window

pytestmark = pytest.mark.unit


def test_js_distance() -> None:
    assert stats.js_distance({"a": 3, "b": 3}, {"a": 1, "b": 1}) == 0.0
    assert stats.js_distance({"a": 5}, {"b": 2}) == pytest.approx(1.0)  # disjoint: the maximum
    # p = (1/2, 1/2), q = (1, 0), m = (3/4, 1/4):
    # KL(p||m) = 1/2 log2(2/3) + 1/2 log2(2) = 0.2075187; KL(q||m) = log2(4/3) = 0.4150375
    # JSD = (0.2075187 + 0.4150375) / 2 = 0.3112781; distance = sqrt(JSD) = 0.5579230
    assert stats.js_distance({"a": 1, "b": 1}, {"a": 4}) == pytest.approx(0.5579230, abs=1e-6)
    assert stats.js_distance({"a": 1}, {}) is None  # an empty window has no distribution
    assert stats.js_distance({}, {"a": 1}) is None


def test_psi() -> None:
    # (0.9 - 0.5) ln(0.9/0.5) + (0.1 - 0.5) ln(0.1/0.5) = 0.2351147 + 0.6437752
    assert stats.psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.8788898, abs=1e-6)
    # a one-sided window: the empty bin is floored at 1e-4
    # 0.5 ln(2) + (1e-4 - 0.5) ln(1e-4 / 0.5) = 0.3465736 + 4.2577449
    assert stats.psi([0.5, 0.5], [1.0, 0.0]) == pytest.approx(4.6043185, abs=1e-6)
    assert stats.psi([0.2, 0.8], [0.2, 0.8]) == 0.0


def test_length_bins_and_psi() -> None:
    assert stats.quantile_edges([float(x) for x in range(1, 11)], bins=2) == [5.5]
    assert stats.quantile_edges([3.0] * 10) == [3.0]  # ties: one edge, two bins
    assert stats.quantile_edges([]) == []
    assert stats.bin_shares([1, 2, 3, 4], [2]) == [0.5, 0.5]  # right-closed: 2 is in bin 0
    assert stats.bin_shares([], [2]) == [0.0, 0.0]
    assert stats.length_psi([10.0], [0.5, 0.5], [5, 5, 20, 20]) == 0.0
    assert stats.length_psi([10.0], [0.5, 0.5], []) is None


def test_confidence_unseen_accuracy_f1() -> None:
    assert stats.confidence_shift(0.8, [0.6, 0.7]) == pytest.approx(-0.15)
    assert stats.confidence_shift(0.8, []) is None
    assert stats.unseen_rate({"a", "b"}, [["a", "c"], ["b", "d", "e"]]) == pytest.approx(0.6)
    assert stats.unseen_rate({"a"}, []) is None
    assert stats.unseen_rate({"a"}, [[]]) is None
    assert stats.accuracy(["a", "b", "a"], ["a", "a", "a"]) == pytest.approx(2 / 3)
    # a: tp 2, fp 1, fn 0 -> F1 4/5; b: tp 0, fn 1 -> 0; macro = 0.4
    assert stats.macro_f1(["a", "b", "a"], ["a", "a", "a"]) == pytest.approx(0.4)
    assert stats.accuracy([], []) is None and stats.macro_f1([], []) is None


PROFILE = Profile(
    labels=["negative", "neutral", "positive"],
    train_labels={"negative": 10, "neutral": 10, "positive": 10},
    predicted={"negative": 10, "neutral": 10, "positive": 10},
    confidence_edges=[0.5], confidence_counts=[0, 30], mean_confidence=0.8,
    length_edges=[10.0, 20.0], length_shares=[1 / 3, 1 / 3, 1 / 3],
    length_quantiles={"p50": 15.0}, unseen_token_rate=0.0,
    vocabulary=["good", "bad", "ok", "day"], texts=30,
)  # fmt: skip
LIMITS = Thresholds(min_events=6, min_labels=3)


def test_a_window_like_the_reference_passes() -> None:
    # two texts in each length bin (<= 10, <= 20, longer), every token known
    texts = ["good", "bad day", "good day ok", "ok good bad day",
             "bad bad bad bad bad bad ok", "good good good good day ok"]  # fmt: skip
    labels = ["negative", "neutral", "positive"] * 2
    statistics, live = evaluate_window(PROFILE, texts, labels, [0.8] * 6, [], LIMITS)
    assert statistics["js_distance"].value == 0.0
    assert statistics["length_psi"].value == 0.0
    assert statistics["confidence_shift"].value == pytest.approx(0.0)
    assert statistics["unseen_token_rate"].value == 0.0
    assert {s.status for s in statistics.values()} == {OK}
    assert live == {"labels": 0, "status": INSUFFICIENT}  # no feedback: no accuracy verdict
    assert Window("s", "e", 6, 6, statistics, {}, live).verdict == OK


def test_a_one_sided_long_window_breaches() -> None:
    texts = ["unknown words here and a good " * 3] * 6
    statistics, _ = evaluate_window(PROFILE, texts, ["positive"] * 6, [0.5] * 6, [], LIMITS)
    # predicted (0, 0, 1) vs (1/3, 1/3, 1/3): JSD = 1/2 KL(p||m) + 1/2 KL(q||m) with m = (1/6,
    # 1/6, 2/3): KL(p||m) = 2/3 log2 2 + 1/3 log2(1/2) = 1/3; KL(q||m) = log2(3/2) = 0.5849625
    expected = math.sqrt((1 / 3 + 0.5849625) / 2)
    assert statistics["js_distance"].value == pytest.approx(expected, abs=1e-6)
    assert {n: s.status for n, s in statistics.items()} == {
        "js_distance": BREACH, "confidence_shift": BREACH,
        "length_psi": BREACH, "unseen_token_rate": BREACH,
    }  # fmt: skip


def test_too_few_events_is_insufficient_never_a_pass() -> None:
    statistics, live = evaluate_window(
        PROFILE, ["x y z"], ["positive"], [0.1], [("negative", "positive")], LIMITS
    )
    assert {s.status for s in statistics.values()} == {INSUFFICIENT}
    window = Window("s", "e", 1, 1, statistics, {"positive": 1}, live)
    assert window.verdict == INSUFFICIENT
    empty, live = evaluate_window(PROFILE, [], [], [], [], LIMITS)
    assert all(s.value is None and s.status == INSUFFICIENT for s in empty.values())
    assert Window("s", "e", 0, 0, empty, {}, live).verdict == INSUFFICIENT


def test_live_accuracy_with_enough_labels() -> None:
    truth = [("positive", "positive"), ("negative", "positive"), ("neutral", "neutral")]
    limits = Thresholds(min_events=1, min_labels=3, min_accuracy=0.9)
    _, live = evaluate_window(PROFILE, ["ok"] * 3, ["positive"] * 3, [0.8] * 3, truth, limits)
    # accuracy 2/3; F1: positive 2/3, negative 0, neutral 1 -> macro 5/9
    assert live["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert live["macro_f1"] == pytest.approx(5 / 9, abs=1e-6)
    assert live["status"] == BREACH
