"""The shadow phase's judge: the challenger's answers against the champion's, pair by pair (pure).

A *pair* is one text the champion answered for a client (its logged request and response,
joined by event id) and the challenger's answer to the very same text, replayed to it in the
dark (``roost.rollout.replay``). Pairs accumulate in a :class:`Tally`; :func:`judge` turns a
tally into the same :class:`~roost.rollout.analysis.Analysis` a canary check gives, so the
rollout's table, tags and failure record are shared with the canary steps.

Metrics (each with its threshold in ``rollout.shadow``):

- ``agreement``: share of pairs where both models give the same label (at least
  ``min_agreement``); the confusion between the two models' labels comes with it;
- ``js_distance``: Jensen-Shannon distance (base 2) of the two label distributions over the
  pairs (``roost.monitor.stats.js_distance``, the monitor's statistic);
- ``confidence_shift``: the challenger's mean confidence less the champion's on the pairs,
  absolute value judged;
- ``error_rate``: the challenger's replayed requests (an answer that is not a 2xx
  prediction, or none within the timeout, is an error) against the champion's own 5xx rate;
- ``p99_latency_ms``: the challenger server's latency histogram against the champion's, over
  the same time (both measured inside the servers; ``roost.rollout.analysis`` checks, reused).

Nothing passes on missing data: fewer than ``min_pairs`` pairs, or a metric without values,
is inconclusive, and the controller fails a shadow still inconclusive at ``max_duration_s``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from roost.rollout.analysis import (
    Analysis,
    Counts,
    MetricCheck,
    Verdict,
    check_error_rate,
    check_p99,
)

REQUEST_TYPE = "org.kubeflow.serving.inference.request"  # roost.monitor.events' names
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
VERSION_EXTENSION = "modelversion"


@dataclass(frozen=True)
class ShadowThresholds:
    min_agreement: float = 0.95
    max_js_distance: float = 0.1
    max_confidence_shift: float = 0.1
    max_error_rate: float = 0.01
    max_p99_ratio: float = 2.0
    p99_slack_ms: float = 50.0

    def to_dict(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShadowThresholds:
        return cls(**{k: float(v) for k, v in data.items() if k in cls.__dataclass_fields__})


# -- pairs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Logged:
    """One champion inference from the payload log: the request body and its answer."""

    id: str
    body: Any
    labels: tuple[str, ...]
    confidences: tuple[float, ...]


@dataclass(frozen=True)
class Answer:
    """The challenger's answer to a replayed request (``labels`` empty when it failed)."""

    id: str
    latency_s: float
    labels: tuple[str, ...] = ()
    confidences: tuple[float, ...] = ()
    error: str = ""


def sampled(event_id: str, rate: float) -> bool:
    """Deterministic sampling by id: a resumed controller picks the same requests."""
    if rate >= 1.0:
        return True
    return zlib.crc32(event_id.encode()) / 2**32 < rate


def champion_inferences(
    events: Iterable[Mapping[str, Any]], champion: str, rate: float = 1.0
) -> list[Logged]:
    """Requests the champion answered (request and response events joined by id), in order.

    Events of other versions (the challenger's own logging of the replays, an older server)
    are left out: a request counts when its response says the champion's version (the
    request's own version, where logged, must not say another).
    """
    from roost.monitor import payloads

    requests: dict[str, Mapping[str, Any]] = {}
    responses: dict[str, Mapping[str, Any]] = {}
    for event in events:
        kind = event.get("type")
        target = requests if kind == REQUEST_TYPE else responses if kind == RESPONSE_TYPE else None
        if target is not None:
            target.setdefault(str(event["id"]), event)
    out: list[Logged] = []
    for event_id, request in requests.items():
        response = responses.get(event_id)
        if response is None or not sampled(event_id, rate):
            continue
        fields = payloads.response_fields(response.get("data"))
        version = (response.get("attributes") or {}).get(VERSION_EXTENSION) or fields.get("version")
        asked = (request.get("attributes") or {}).get(VERSION_EXTENSION)
        if str(version) != champion or (asked and asked != champion):
            continue
        texts = payloads.request_texts(request.get("data"))
        labels = fields.get("labels") or []
        if not texts or len(labels) != len(texts):
            continue
        confidences = fields.get("confidences") or []
        out.append(
            Logged(
                event_id,
                request.get("data"),
                tuple(labels),
                tuple(float(c) for c in confidences) if len(confidences) == len(labels) else (),
            )
        )
    return out


# -- the running tally --------------------------------------------------------------------------


@dataclass
class Tally:
    """Everything judged so far in one shadow phase (kept in the rollout's state)."""

    pairs: int = 0
    agree: int = 0
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # champion -> challenger
    champion: Counts = field(default_factory=Counts)  # the champion's answers on the pairs
    challenger: Counts = field(default_factory=Counts)  # the replays: outcomes, latency, answers
    disagreeing: list[str] = field(default_factory=list)  # a sample of event ids
    errors: dict[str, int] = field(default_factory=dict)  # by kind

    def add(self, logged: Logged, answer: Answer, keep_ids: int = 20) -> None:
        _observe(self.challenger.latency, answer.latency_s)
        if answer.error or len(answer.labels) != len(logged.labels):
            self.challenger.error += 1
            kind = (answer.error or "wrong number of labels").split(":", 1)[0]
            self.errors[kind] = self.errors.get(kind, 0) + 1
            return
        self.challenger.ok += 1
        differs = False
        for i, (mine, theirs) in enumerate(zip(logged.labels, answer.labels, strict=True)):
            self.pairs += 1
            row = self.confusion.setdefault(mine, {})
            row[theirs] = row.get(theirs, 0) + 1
            self.champion.labels[mine] = self.champion.labels.get(mine, 0.0) + 1
            self.challenger.labels[theirs] = self.challenger.labels.get(theirs, 0.0) + 1
            if mine == theirs:
                self.agree += 1
            else:
                differs = True
            if logged.confidences and answer.confidences:
                self.champion.confidence_sum += logged.confidences[i]
                self.champion.confidence_count += 1
                self.challenger.confidence_sum += answer.confidences[i]
                self.challenger.confidence_count += 1
        if differs and len(self.disagreeing) < keep_ids:
            self.disagreeing.append(logged.id)

    @property
    def agreement(self) -> float | None:
        return self.agree / self.pairs if self.pairs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "agree": self.agree,
            "confusion": {k: dict(v) for k, v in self.confusion.items()},
            "champion": self.champion.to_dict(),
            "challenger": self.challenger.to_dict(),
            "disagreeing": list(self.disagreeing),
            "errors": dict(self.errors),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Tally:
        data = data or {}
        return cls(
            int(data.get("pairs", 0)),
            int(data.get("agree", 0)),
            {str(k): {str(a): int(n) for a, n in v.items()} for k, v in
             (data.get("confusion") or {}).items()},
            Counts.from_dict(data.get("champion") or {}),
            Counts.from_dict(data.get("challenger") or {}),
            [str(i) for i in data.get("disagreeing") or []],
            {str(k): int(v) for k, v in (data.get("errors") or {}).items()},
        )  # fmt: skip


def _observe(buckets: dict[str, float], seconds: float) -> None:
    """Count one latency into cumulative buckets with the model servers' bounds."""
    from roost.serving.metrics import LATENCY_BUCKETS

    for bound in LATENCY_BUCKETS:
        if seconds <= bound:
            key = f"{bound:g}"
            buckets[key] = buckets.get(key, 0.0) + 1
    buckets["+Inf"] = buckets.get("+Inf", 0.0) + 1


# -- the verdict --------------------------------------------------------------------------------


def check_agreement(tally: Tally, limit: float, enough: bool) -> MetricCheck:
    rate = tally.agreement
    if rate is None or not enough:
        return MetricCheck("agreement", None, rate, rate, limit, None, f"{tally.pairs} pairs")
    passed = rate >= limit
    detail = (
        f"{tally.agree}/{tally.pairs} pairs agree = {rate:.4f} (min {limit:g}); "
        f"confusion (champion -> challenger) {confusion_text(tally.confusion)}"
    )
    return MetricCheck("agreement", None, rate, rate, limit, passed, detail)


def check_js_distance(tally: Tally, limit: float, enough: bool) -> MetricCheck:
    from roost.monitor.stats import js_distance

    distance = js_distance(tally.champion.labels, tally.challenger.labels)
    if distance is None or not enough:
        return MetricCheck("js_distance", None, None, distance, limit, None, "no pairs")
    passed = distance <= limit
    detail = f"JS distance {distance:.4f} (base 2, max {limit:g})"
    return MetricCheck("js_distance", None, None, distance, limit, passed, detail)


def check_confidence_shift(tally: Tally, limit: float, enough: bool) -> MetricCheck:
    base, mean = tally.champion.mean_confidence, tally.challenger.mean_confidence
    if base is None or mean is None or not enough:
        return MetricCheck("confidence_shift", base, mean, None, limit, None, "no confidences")
    shift = mean - base
    passed = abs(shift) <= limit
    detail = f"mean confidence {mean:.4f} vs champion {base:.4f}: {shift:+.4f} (max ±{limit:g})"
    return MetricCheck("confidence_shift", base, mean, shift, limit, passed, detail)


def judge(
    tally: Tally,
    champion_live: Counts,
    thresholds: ShadowThresholds,
    min_pairs: int,
    challenger_live: Counts | None = None,
) -> Analysis:
    """The verdict on a shadow tally. ``champion_live``: the champion's own metrics (what its
    clients got) over the shadow so far, the reference for error rate and p99;
    ``challenger_live``: the challenger server's own metrics over the same time, whose latency
    histogram is compared with the champion's (both measured inside the servers; without it,
    the replays' latency as the replayer saw it).

    FAIL if any measured metric is past its limit (the error rate may fail once ``min_pairs``
    requests were replayed, even if they produced no pairs); PASS only with ``min_pairs`` pairs
    and every metric measured and within limits; INCONCLUSIVE otherwise.
    """
    enough = tally.pairs >= min_pairs
    replayed = int(tally.challenger.requests)
    t = thresholds
    has_latency = challenger_live is not None and challenger_live.latency
    latency = challenger_live if has_latency and challenger_live else tally.challenger
    checks = [
        check_agreement(tally, t.min_agreement, enough),
        check_js_distance(tally, t.max_js_distance, enough),
        check_confidence_shift(tally, t.max_confidence_shift, enough),
        check_error_rate(champion_live, tally.challenger, t.max_error_rate),
        check_p99(champion_live, latency, t.max_p99_ratio, t.p99_slack_ms),
    ]
    if replayed < min_pairs:
        checks = [_unjudged(c) for c in checks]
    champion_n = int(champion_live.requests)
    failed = [c for c in checks if c.passed is False]
    if failed:
        reason = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        return Analysis(Verdict.FAIL, tuple(checks), champion_n, replayed, reason)
    if not enough:
        reason = f"too few pairs for a verdict: {tally.pairs} < {min_pairs}"
        return Analysis(Verdict.INCONCLUSIVE, tuple(checks), champion_n, replayed, reason)
    missing = [c.name for c in checks if c.passed is None]
    if missing:
        reason = "no data for " + ", ".join(missing)
        return Analysis(Verdict.INCONCLUSIVE, tuple(checks), champion_n, replayed, reason)
    return Analysis(
        Verdict.PASS, tuple(checks), champion_n, replayed, "all pairwise metrics within limits"
    )


def _unjudged(check: MetricCheck) -> MetricCheck:
    return MetricCheck(
        check.name, check.champion, check.challenger, check.value, check.threshold, None,
        check.detail,
    )  # fmt: skip


def confusion_text(confusion: Mapping[str, Mapping[str, int]]) -> str:
    cells = [
        f"{mine}->{theirs}: {n}"
        for mine, row in sorted(confusion.items())
        for theirs, n in sorted(row.items())
    ]
    return "{" + ", ".join(cells) + "}"


def failure(analysis: Analysis, tally: Tally) -> dict[str, Any]:
    """What a failed shadow records: failing metrics, their values, the disagreeing ids."""
    failed = analysis.failed
    return {
        "stage": "shadow",
        "metric": ",".join(c.name for c in failed) or "pairs",
        "checks": [c.to_dict() for c in failed],
        "reason": analysis.reason,
        "pairs": tally.pairs,
        "agreement": None if tally.agreement is None else round(tally.agreement, 6),
        "confusion": {k: dict(v) for k, v in tally.confusion.items()},
        "disagreeing_ids": list(tally.disagreeing),
        "errors": dict(tally.errors),
        "requests": {
            "champion": analysis.champion_requests,
            "challenger": analysis.challenger_requests,
        },
    }
