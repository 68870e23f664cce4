"""The canary analysis on synthetic metric series: parsing, window deltas, resets, verdicts."""

from __future__ import annotations

import math
import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from roost.rollout.analysis import (
    Counts,
    Thresholds,
    Verdict,
    analyse,
    by_side,
    histogram_quantile,
    increase,
    js_divergence,
    parse_exposition,
    parse_query_result,
)
from roost.serving.metrics import CONFIDENCE_BUCKETS, LATENCY_BUCKETS

pytestmark = pytest.mark.unit

LABELS = ("negative", "neutral", "positive")


class FakeServer:
    """The predictor's metric families on a private registry: real exposition text."""

    def __init__(self, version: str, model: str = "sentiment") -> None:
        self.registry = CollectorRegistry()
        self.labels = {"model": model, "version": version}
        keys = ["model", "version"]
        self.requests = Counter(
            "roost_inference_requests", "", [*keys, "protocol", "outcome"], registry=self.registry
        )
        self.latency = Histogram(
            "roost_inference_seconds", "", [*keys, "protocol"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.predictions = Counter(
            "roost_predictions", "", [*keys, "label"], registry=self.registry
        )
        self.confidence = Histogram(
            "roost_prediction_confidence", "", keys, buckets=CONFIDENCE_BUCKETS,
            registry=self.registry,
        )  # fmt: skip

    def serve(
        self,
        n: int,
        rng: random.Random,
        error_rate: float = 0.0,
        latency_s: float = 0.004,
        shares: tuple[float, ...] = (0.5, 0.3, 0.2),
        confidence: float = 0.8,
    ) -> None:
        for i in range(n):
            protocol = ("v1", "v2")[i % 2]
            if rng.random() < error_rate:
                self.requests.labels(**self.labels, protocol=protocol, outcome="error").inc()
                continue
            self.requests.labels(**self.labels, protocol=protocol, outcome="ok").inc()
            self.latency.labels(**self.labels, protocol=protocol).observe(
                latency_s * rng.uniform(0.5, 1.5)
            )
            label = rng.choices(LABELS, weights=shares)[0]
            self.predictions.labels(**self.labels, label=label).inc()
            self.confidence.labels(**self.labels).observe(
                min(1.0, confidence * rng.uniform(0.9, 1.1))
            )

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def window(champion: FakeServer, challenger: FakeServer, before: dict | None = None):  # type: ignore[no-untyped-def,type-arg]
    snap = {**parse_exposition(champion.text(), "a"), **parse_exposition(challenger.text(), "b")}
    return snap, by_side(increase(before, snap), challenger.labels["version"])


def test_parse_exposition_reads_every_series_the_predictor_exports() -> None:
    server = FakeServer("3")
    server.serve(40, random.Random(0), error_rate=0.25)
    snapshot = parse_exposition(server.text(), "pod-a")
    counts = snapshot["pod-a|3"]
    assert counts.requests == 40
    assert counts.error + counts.ok == 40 and counts.error > 0
    assert sum(counts.labels.values()) == counts.ok == counts.confidence_count
    assert counts.latency["+Inf"] == counts.ok
    assert 0.7 < (counts.mean_confidence or 0) < 0.9
    assert parse_exposition(server.text(), "pod-a", model="other") == {}


def test_increase_subtracts_the_baseline_and_treats_a_drop_as_a_restart() -> None:
    rng = random.Random(1)
    server = FakeServer("2")
    server.serve(30, rng)
    earlier = parse_exposition(server.text(), "x")
    server.serve(20, rng)
    later = parse_exposition(server.text(), "x")
    assert increase(earlier, later)["x|2"].requests == 20

    restarted = FakeServer("2")  # same instance key, counters back to zero
    restarted.serve(5, rng)
    after_restart = parse_exposition(restarted.text(), "x")
    assert increase(later, after_restart)["x|2"].requests == 5
    assert increase(None, later)["x|2"].requests == 50


def test_by_side_splits_on_the_challenger_version() -> None:
    a, b = FakeServer("1"), FakeServer("2")
    rng = random.Random(2)
    a.serve(30, rng)
    b.serve(10, rng)
    _, (champion, challenger) = window(a, b)
    assert (champion.requests, challenger.requests) == (30, 10)


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {"0.01": 50.0, "0.02": 90.0, "0.05": 100.0, "+Inf": 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.02 + 0.03 * 9 / 10)
    assert histogram_quantile(0.99, {"0.1": 0.0, "+Inf": 0.0}) is None
    assert histogram_quantile(0.99, {"0.1": 1.0, "+Inf": 10.0}) == pytest.approx(0.1)


def test_js_divergence_is_bounded_and_symmetric() -> None:
    p = {"a": 50.0, "b": 30.0, "c": 20.0}
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence({"a": 1.0}, {"b": 1.0}) == pytest.approx(1.0)
    q = {"a": 10.0, "b": 10.0, "c": 80.0}
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p))
    assert 0 < (js_divergence(p, q) or 0) < 1
    assert js_divergence({}, p) is None


def test_too_few_requests_gives_no_verdict_even_if_every_request_failed() -> None:
    a, b = FakeServer("1"), FakeServer("2")
    rng = random.Random(3)
    a.serve(200, rng)
    b.serve(10, rng, error_rate=1.0)
    _, (champion, challenger) = window(a, b)
    result = analyse(champion, challenger, Thresholds(), min_requests=50)
    assert result.verdict is Verdict.INCONCLUSIVE
    assert "challenger 10 < 50" in result.reason
    failed = result.metric("error_rate")
    assert failed is not None and failed.challenger == 1.0  # measured, just not acted on


def test_an_erroring_challenger_fails_on_error_rate_with_its_values() -> None:
    a, b = FakeServer("1"), FakeServer("2")
    rng = random.Random(4)
    a.serve(400, rng)
    b.serve(100, rng, error_rate=0.2)
    _, (champion, challenger) = window(a, b)
    result = analyse(champion, challenger, Thresholds(max_error_rate=0.01), min_requests=50)
    assert result.verdict is Verdict.FAIL
    assert [c.name for c in result.failed] == ["error_rate"]
    check = result.failed[0]
    assert check.champion == 0.0 and 0.1 < (check.challenger or 0) < 0.3
    assert check.value == check.challenger and check.threshold == 0.01
    assert result.challenger_requests == 100 and result.champion_requests == 400


def test_a_skewed_challenger_fails_on_label_divergence() -> None:
    a, b = FakeServer("1"), FakeServer("2")
    rng = random.Random(5)
    a.serve(300, rng, shares=(0.5, 0.3, 0.2))
    b.serve(100, rng, shares=(0.0, 0.0, 1.0), confidence=0.99)
    _, (champion, challenger) = window(a, b)
    result = analyse(champion, challenger, Thresholds(), min_requests=50)
    assert result.verdict is Verdict.FAIL
    assert [c.name for c in result.failed] == ["js_divergence"]
    assert (result.failed[0].value or 0) > 0.3


def test_a_slow_or_unsure_challenger_fails_on_latency_and_confidence() -> None:
    a, b = FakeServer("1"), FakeServer("2")
    rng = random.Random(6)
    a.serve(300, rng, latency_s=0.004, confidence=0.85)
    b.serve(100, rng, latency_s=0.4, confidence=0.5)
    _, (champion, challenger) = window(a, b)
    result = analyse(champion, challenger, Thresholds(), min_requests=50)
    assert {c.name for c in result.failed} == {"p99_latency_ms", "confidence_drop"}
    p99 = result.metric("p99_latency_ms")
    assert p99 is not None and (p99.challenger or 0) > 100 > (p99.champion or 0)


def test_latency_within_the_absolute_slack_passes() -> None:
    a, b = FakeServer("1"), FakeServer("2")
    rng = random.Random(7)
    a.serve(300, rng, latency_s=0.002)
    b.serve(100, rng, latency_s=0.012)  # 6x slower, but only ~10 ms more: not a regression
    _, (champion, challenger) = window(a, b)
    assert analyse(champion, challenger, Thresholds(p99_slack_ms=50), 50).verdict is Verdict.PASS


def test_a_good_challenger_passes_over_a_series_of_windows() -> None:
    a, b = FakeServer("1"), FakeServer("2")
    rng = random.Random(8)
    before = None
    for _ in range(5):
        a.serve(150, rng)
        b.serve(50, rng)
        before, (champion, challenger) = window(a, b, before)
        result = analyse(champion, challenger, Thresholds(), min_requests=50)
        assert result.verdict is Verdict.PASS, result.reason
        assert challenger.requests == 50  # each window sees only its own requests


def test_missing_champion_data_is_never_a_pass() -> None:
    b = FakeServer("2")
    b.serve(100, random.Random(9))
    challenger = parse_exposition(b.text(), "b")["b|2"]
    result = analyse(Counts(), challenger, Thresholds(), min_requests=50)
    assert result.verdict is Verdict.INCONCLUSIVE


def test_prometheus_query_results_become_per_pod_snapshots() -> None:
    def series(name: str, value: float, **labels: str) -> dict:  # type: ignore[type-arg]
        return {
            "metric": {"__name__": name, "model": "sentiment", **labels},
            "value": [0, str(value)],
        }

    payload = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                series("roost_inference_requests_total", 90, pod="p1", version="1", outcome="ok"),
                series(
                    "roost_inference_requests_total", 10, pod="p2", version="2", outcome="error"
                ),
                series("roost_inference_requests_total", 30, pod="p2", version="2", outcome="ok"),
                series("roost_predictions_total", 30, pod="p2", version="2", label="positive"),
                series("roost_prediction_confidence_sum", math.nan, pod="p2", version="2"),
                series("up", 1, pod="p2"),
            ],
        },
    }
    snapshot = parse_query_result(payload)
    assert set(snapshot) == {"p1|1", "p2|2"}
    assert snapshot["p2|2"].error == 10 and snapshot["p2|2"].ok == 30
    assert snapshot["p2|2"].labels == {"positive": 30}
