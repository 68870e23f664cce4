"""Window metrics of a canary, and the verdict of one check: challenger against champion.

Inputs are the predictor's own Prometheus metrics (``roost.serving.metrics``), either scraped
as text from each server's ``/metrics`` or returned by a Prometheus instant query. Both become
a :data:`Snapshot`: cumulative counts per process (``instance|version``). Counters only grow
while a process lives, so the window's share is a difference of two snapshots; a process whose
counters went down has restarted, and its whole current count belongs to the window (as
Prometheus' ``increase()`` treats resets).

:func:`analyse` compares the two sides metric by metric and returns each measured value, the
threshold and whether it passed. Everything here is pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

REQUESTS = "roost_inference_requests_total"
LATENCY_BUCKET = "roost_inference_seconds_bucket"
PREDICTIONS = "roost_predictions_total"
CONFIDENCE_SUM = "roost_prediction_confidence_sum"
CONFIDENCE_COUNT = "roost_prediction_confidence_count"
SERIES = (REQUESTS, LATENCY_BUCKET, PREDICTIONS, CONFIDENCE_SUM, CONFIDENCE_COUNT)

CHAMPION = "champion"
CHALLENGER = "challenger"


def _le_key(le: str | float) -> str:
    value = float(le)
    return "+Inf" if math.isinf(value) else f"{value:g}"


@dataclass
class Counts:
    """Request outcomes, latency buckets, label counts and confidence of one side or process."""

    ok: float = 0.0
    error: float = 0.0
    invalid: float = 0.0
    latency: dict[str, float] = field(default_factory=dict)  # upper bound -> cumulative count
    labels: dict[str, float] = field(default_factory=dict)
    confidence_sum: float = 0.0
    confidence_count: float = 0.0

    @property
    def requests(self) -> float:
        return self.ok + self.error + self.invalid

    @property
    def error_rate(self) -> float | None:
        """Server errors (5xx) over answered requests; client errors (4xx) are not the model's."""
        served = self.ok + self.error
        return self.error / served if served else None

    @property
    def mean_confidence(self) -> float | None:
        return self.confidence_sum / self.confidence_count if self.confidence_count else None

    def p99_ms(self) -> float | None:
        quantile = histogram_quantile(0.99, self.latency)
        return None if quantile is None else quantile * 1000.0

    def _counters(self) -> Iterable[float]:
        yield from (self.ok, self.error, self.invalid, self.confidence_count)
        yield from self.latency.values()
        yield from self.labels.values()

    def plus(self, other: Counts) -> Counts:
        return Counts(
            self.ok + other.ok,
            self.error + other.error,
            self.invalid + other.invalid,
            _add(self.latency, other.latency),
            _add(self.labels, other.labels),
            self.confidence_sum + other.confidence_sum,
            self.confidence_count + other.confidence_count,
        )

    def since(self, earlier: Counts) -> Counts:
        """What happened after ``earlier``; all of ``self`` if a counter went down (a restart)."""
        delta = Counts(
            self.ok - earlier.ok,
            self.error - earlier.error,
            self.invalid - earlier.invalid,
            _add(self.latency, earlier.latency, -1.0),
            _add(self.labels, earlier.labels, -1.0),
            self.confidence_sum - earlier.confidence_sum,
            self.confidence_count - earlier.confidence_count,
        )
        if any(value < 0 for value in delta._counters()):
            return Counts.from_dict(self.to_dict())
        return delta

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "error": self.error,
            "invalid": self.invalid,
            "latency": dict(self.latency),
            "labels": dict(self.labels),
            "confidence_sum": self.confidence_sum,
            "confidence_count": self.confidence_count,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Counts:
        return cls(
            float(data.get("ok", 0.0)),
            float(data.get("error", 0.0)),
            float(data.get("invalid", 0.0)),
            {str(k): float(v) for k, v in (data.get("latency") or {}).items()},
            {str(k): float(v) for k, v in (data.get("labels") or {}).items()},
            float(data.get("confidence_sum", 0.0)),
            float(data.get("confidence_count", 0.0)),
        )


def _add(a: Mapping[str, float], b: Mapping[str, float], sign: float = 1.0) -> dict[str, float]:
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0.0) + sign * value
    return out


# A scrape: cumulative Counts per "instance|version" (one serving process and the version it
# labels its metrics with).
Snapshot = dict[str, Counts]


def snapshot_key(instance: str, version: str) -> str:
    return f"{instance}|{version}"


def version_of(key: str) -> str:
    return key.rsplit("|", 1)[1]


def _accumulate(counts: Counts, name: str, labels: Mapping[str, str], value: float) -> None:
    if name == REQUESTS:
        outcome = labels.get("outcome", "ok")
        if outcome == "error":
            counts.error += value
        elif outcome == "invalid":
            counts.invalid += value
        else:
            counts.ok += value
    elif name == LATENCY_BUCKET:
        key = _le_key(labels.get("le", "+Inf"))
        counts.latency[key] = counts.latency.get(key, 0.0) + value
    elif name == PREDICTIONS:
        label = labels.get("label", "")
        counts.labels[label] = counts.labels.get(label, 0.0) + value
    elif name == CONFIDENCE_SUM:
        counts.confidence_sum += value
    elif name == CONFIDENCE_COUNT:
        counts.confidence_count += value


def parse_exposition(text: str, instance: str, model: str | None = None) -> Snapshot:
    """A ``/metrics`` page (Prometheus text format) -> Snapshot of the roost series in it."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Snapshot = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in SERIES:
                continue
            labels = sample.labels
            if model is not None and labels.get("model", model) != model:
                continue
            key = snapshot_key(instance, labels.get("version", "unknown"))
            _accumulate(out.setdefault(key, Counts()), sample.name, labels, float(sample.value))
    return out


def parse_query_result(
    payload: Mapping[str, Any], instance_labels: tuple[str, ...] = ("pod", "instance")
) -> Snapshot:
    """A Prometheus ``/api/v1/query`` answer (vector of raw series) -> Snapshot.

    Series are kept per process (``pod``, else ``instance``) so that counter resets of one
    pod are detected as they are for a scrape.
    """
    data = payload.get("data") or {}
    out: Snapshot = {}
    for item in data.get("result") or []:
        labels = {str(k): str(v) for k, v in (item.get("metric") or {}).items()}
        name = labels.get("__name__", "")
        if name not in SERIES:
            continue
        instance = next((labels[k] for k in instance_labels if labels.get(k)), "prometheus")
        value = float(item["value"][1])
        if math.isnan(value):
            continue
        key = snapshot_key(instance, labels.get("version", "unknown"))
        _accumulate(out.setdefault(key, Counts()), name, labels, value)
    return out


def increase(earlier: Snapshot | None, later: Snapshot) -> Snapshot:
    """Per process, what was counted between two snapshots (new or restarted: all of it)."""
    earlier = earlier or {}
    return {
        key: counts.since(earlier[key]) if key in earlier else Counts.from_dict(counts.to_dict())
        for key, counts in later.items()
    }


def by_side(delta: Snapshot, challenger_version: str) -> tuple[Counts, Counts]:
    """(champion, challenger): series labelled with the challenger's version vs all others."""
    champion, challenger = Counts(), Counts()
    for key, counts in delta.items():
        if version_of(key) == challenger_version:
            challenger = challenger.plus(counts)
        else:
            champion = champion.plus(counts)
    return champion, challenger


def histogram_quantile(q: float, buckets: Mapping[str, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative buckets ``{upper bound: count}``.

    Linear interpolation inside the bucket holding the rank; a rank in the ``+Inf`` bucket
    returns the largest finite bound. None when there are no observations.
    """
    bounds = sorted((float(le), count) for le, count in buckets.items())
    if not bounds or bounds[-1][1] <= 0:
        return None
    total = bounds[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for upper, count in bounds:
        if count >= rank:
            if math.isinf(upper):
                return lower_bound
            if count == lower_count:
                return upper
            return lower_bound + (upper - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = upper, count
    return lower_bound


def js_divergence(p: Mapping[str, float], q: Mapping[str, float]) -> float | None:
    """Jensen-Shannon divergence (base 2, 0..1) of two count or probability distributions."""
    p_total, q_total = sum(p.values()), sum(q.values())
    if p_total <= 0 or q_total <= 0:
        return None
    divergence = 0.0
    for key in set(p) | set(q):
        pi, qi = p.get(key, 0.0) / p_total, q.get(key, 0.0) / q_total
        mi = (pi + qi) / 2
        if pi > 0:
            divergence += 0.5 * pi * math.log2(pi / mi)
        if qi > 0:
            divergence += 0.5 * qi * math.log2(qi / mi)
    return max(0.0, min(1.0, divergence))


@dataclass(frozen=True)
class Thresholds:
    """Limits of one check; the challenger fails a metric that goes past its limit."""

    max_error_rate: float = 0.01  # rise of the 5xx rate over the champion's
    max_p99_ratio: float = 2.0  # p99 fails only if above champion * ratio ...
    p99_slack_ms: float = 50.0  # ... and above champion + slack
    max_js_divergence: float = 0.1
    max_confidence_drop: float = 0.1

    def to_dict(self) -> dict[str, float]:
        return {
            "max_error_rate": self.max_error_rate,
            "max_p99_ratio": self.max_p99_ratio,
            "p99_slack_ms": self.p99_slack_ms,
            "max_js_divergence": self.max_js_divergence,
            "max_confidence_drop": self.max_confidence_drop,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Thresholds:
        return cls(**{k: float(v) for k, v in data.items() if k in cls.__dataclass_fields__})


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class MetricCheck:
    """One metric of one check: both sides' values, the compared value and its limit."""

    name: str
    champion: float | None
    challenger: float | None
    value: float | None
    threshold: float
    passed: bool | None  # None: not enough data to judge
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "champion": _round(self.champion),
            "challenger": _round(self.challenger),
            "value": _round(self.value),
            "threshold": self.threshold,
            "passed": self.passed,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricCheck:
        return cls(
            str(data["name"]),
            data.get("champion"),
            data.get("challenger"),
            data.get("value"),
            float(data["threshold"]),
            data.get("passed"),
            str(data.get("detail", "")),
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


@dataclass(frozen=True)
class Analysis:
    """The verdict of one check and every value it was based on."""

    verdict: Verdict
    checks: tuple[MetricCheck, ...]
    champion_requests: int
    challenger_requests: int
    reason: str

    @property
    def failed(self) -> list[MetricCheck]:
        return [c for c in self.checks if c.passed is False]

    def metric(self, name: str) -> MetricCheck | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "requests": {CHAMPION: self.champion_requests, CHALLENGER: self.challenger_requests},
            "checks": [c.to_dict() for c in self.checks],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Analysis:
        requests = data.get("requests") or {}
        return cls(
            Verdict(data["verdict"]),
            tuple(MetricCheck.from_dict(c) for c in data.get("checks") or []),
            int(requests.get(CHAMPION, 0)),
            int(requests.get(CHALLENGER, 0)),
            str(data.get("reason", "")),
        )


def _fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.4g}{unit}"


def check_error_rate(champion: Counts, challenger: Counts, limit: float) -> MetricCheck:
    base, rate = champion.error_rate, challenger.error_rate
    if rate is None:
        return MetricCheck("error_rate", base, None, None, limit, None, "no answered requests")
    rise = rate - (base or 0.0)
    passed = rise <= limit
    detail = f"challenger {rate:.4f} vs champion {_fmt(base)}: rise {rise:+.4f} (max {limit:g})"
    return MetricCheck("error_rate", base, rate, rise, limit, passed, detail)


def check_p99(champion: Counts, challenger: Counts, ratio: float, slack_ms: float) -> MetricCheck:
    base, p99 = champion.p99_ms(), challenger.p99_ms()
    if base is None or p99 is None:
        return MetricCheck("p99_latency_ms", base, p99, None, ratio, None, "no latency samples")
    limit = max(base * ratio, base + slack_ms)
    passed = p99 <= limit
    detail = (
        f"challenger {p99:.1f} ms vs champion {base:.1f} ms "
        f"(max {limit:.1f} ms = max(x{ratio:g}, +{slack_ms:g} ms))"
    )
    return MetricCheck(
        "p99_latency_ms", base, p99, p99 / base if base else None, ratio, passed, detail
    )


def check_label_divergence(champion: Counts, challenger: Counts, limit: float) -> MetricCheck:
    divergence = js_divergence(champion.labels, challenger.labels)
    if divergence is None:
        return MetricCheck("js_divergence", None, None, None, limit, None, "no predictions")
    passed = divergence <= limit
    detail = (
        f"JS divergence {divergence:.4f} bits (max {limit:g}); champion "
        f"{_shares(champion.labels)}, challenger {_shares(challenger.labels)}"
    )
    return MetricCheck("js_divergence", None, None, divergence, limit, passed, detail)


def _shares(counts: Mapping[str, float]) -> str:
    total = sum(counts.values()) or 1.0
    return "{" + ", ".join(f"{k}: {v / total:.2f}" for k, v in sorted(counts.items())) + "}"


def check_confidence(champion: Counts, challenger: Counts, limit: float) -> MetricCheck:
    base, mean = champion.mean_confidence, challenger.mean_confidence
    if base is None or mean is None:
        return MetricCheck("confidence_drop", base, mean, None, limit, None, "no predictions")
    drop = base - mean
    passed = drop <= limit
    detail = f"mean confidence {mean:.4f} vs champion {base:.4f}: drop {drop:+.4f} (max {limit:g})"
    return MetricCheck("confidence_drop", base, mean, drop, limit, passed, detail)


def analyse(
    champion: Counts, challenger: Counts, thresholds: Thresholds, min_requests: int
) -> Analysis:
    """Judge one window: FAIL if any metric is past its limit, PASS only if every metric was
    measured and passed, INCONCLUSIVE otherwise (too few requests, or a metric without data).
    """
    checks = (
        check_error_rate(champion, challenger, thresholds.max_error_rate),
        check_p99(champion, challenger, thresholds.max_p99_ratio, thresholds.p99_slack_ms),
        check_label_divergence(champion, challenger, thresholds.max_js_divergence),
        check_confidence(champion, challenger, thresholds.max_confidence_drop),
    )
    n_champion, n_challenger = int(champion.requests), int(challenger.requests)
    if n_challenger < min_requests or n_champion < min_requests:
        short = [
            f"{side} {n} < {min_requests}"
            for side, n in ((CHALLENGER, n_challenger), (CHAMPION, n_champion))
            if n < min_requests
        ]
        return Analysis(
            Verdict.INCONCLUSIVE, checks, n_champion, n_challenger,
            "too few requests for a verdict: " + ", ".join(short),
        )  # fmt: skip
    failed = [c for c in checks if c.passed is False]
    if failed:
        reason = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        return Analysis(Verdict.FAIL, checks, n_champion, n_challenger, reason)
    missing = [c.name for c in checks if c.passed is None]
    if missing:
        reason = "no data for " + ", ".join(missing)
        return Analysis(Verdict.INCONCLUSIVE, checks, n_champion, n_challenger, reason)
    return Analysis(Verdict.PASS, checks, n_champion, n_challenger, "all metrics within limits")
