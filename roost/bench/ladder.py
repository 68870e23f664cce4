"""The rate ladder and the numbers of each step: pure functions, no I/O.

A ladder starts at ``start`` requests/s and multiplies the rate by ``growth`` while steps
pass (p99 within the objective, no errors). A failing step is run once more before it
counts (the machine is shared, a stray burst should not end a ladder); when it fails
twice, ``refine`` bisections (geometric) between the last passing and the failing rate
narrow the maximum down. ``max_steps`` and ``max_rate`` bound it. When the very first
rate fails (twice), the ladder halves it until a rate passes or it
reaches ``min_rate``, so a server slower than the first step still gets a number.

:func:`start_rate` picks the first rate from what the raw forward pass does on this machine,
so a slow machine (or many texts a request) does not begin above the model's own limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from roost.bench.loadgen import StepRecord, percentiles_ms


@dataclass(frozen=True)
class StepSummary:
    """One ladder step as reported in bench.json."""

    rate: float  # offered requests/s
    achieved_rps: float  # good answers per second of the step
    p50_ms: float
    p99_ms: float
    p999_ms: float
    errors: int  # timeouts, non-200s, connection failures and wrong answers
    wrong: int  # answered, but not what the reference model says
    requests: int
    cpu_s_per_1k: float | None = None  # server CPU seconds per 1000 requests
    # the load generator's own CPU seconds per 1000 requests (its process, all threads):
    # client and server share the machine's CPUs, so a costly client leaves the server less
    client_cpu_s_per_1k: float | None = None
    client_lag_ms: float = 0.0  # worst lateness of the load generator's own sends
    passed: bool = False
    first_error: str | None = None

    def to_dict(self) -> dict[str, float | int | bool | None]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = None if math.isnan(value) else round(value, 3)
        return out


def summarize(
    record: StepRecord, slo_p99_ms: float, cpu_s: float | None, client_cpu_s: float | None = None
) -> StepSummary:
    """Percentiles, errors and the pass/fail verdict of one step (``cpu_s``: the server's CPU
    seconds during it; ``client_cpu_s``: the load generator's)."""
    p50, p99, p999 = percentiles_ms(record.latencies_s)
    count = record.plan.count
    good = len(record.latencies_s)
    duration = max(record.plan.duration_s, 1e-9)
    errors = record.error_count
    return StepSummary(
        rate=record.plan.rate,
        achieved_rps=good / duration,
        p50_ms=p50,
        p99_ms=p99,
        p999_ms=p999,
        errors=errors,
        wrong=record.wrong,
        requests=count,
        cpu_s_per_1k=None if cpu_s is None else cpu_s / count * 1000.0,
        client_cpu_s_per_1k=None if client_cpu_s is None else client_cpu_s / count * 1000.0,
        client_lag_ms=record.send_lag_s * 1000.0,
        passed=passes(p99, errors, good, slo_p99_ms),
        first_error=record.first_error,
    )


def passes(p99_ms: float, errors: int, answered: int, slo_p99_ms: float) -> bool:
    return answered > 0 and errors == 0 and not math.isnan(p99_ms) and p99_ms <= slo_p99_ms


class Ladder:
    """Rates to try, one at a time: ``next_rate()``, run it, ``record(passed)``, repeat."""

    def __init__(
        self,
        start: float,
        growth: float,
        max_rate: float,
        max_steps: int,
        refine: int,
        retry_failures: bool = True,
        min_rate: float = 5.0,
    ) -> None:
        self.growth = growth
        self.min_rate = min_rate
        self.max_rate = max_rate
        self.max_steps = max_steps
        self.refine_left = refine
        self.retry_failures = retry_failures
        self.steps = 0
        self.best: float | None = None  # highest passing rate
        self.worst: float | None = None  # lowest failing rate (after its retry)
        self._next: float | None = min(start, max_rate)
        self._retrying = False

    def next_rate(self) -> float | None:
        if self.steps >= self.max_steps:
            return None
        return self._next

    def record(self, rate: float, passed: bool) -> None:
        self.steps += 1
        if passed:
            self._retrying = False
            self.best = rate if self.best is None else max(self.best, rate)
        elif self.retry_failures and not self._retrying:
            self._retrying = True
            self._next = rate  # once more before it counts
            return
        else:
            self._retrying = False
            self.worst = rate if self.worst is None else min(self.worst, rate)
        self._next = self._choose()

    def _choose(self) -> float | None:
        if self.worst is None:  # still climbing
            assert self.best is not None
            if self.best >= self.max_rate:
                return None
            return min(float(round(self.best * self.growth)), self.max_rate)
        if self.best is None:  # nothing passed yet: step down
            lower = float(round(self.worst / 2))
            return lower if lower >= self.min_rate else None
        if self.refine_left <= 0:
            return None
        if self.worst / self.best < 1.05:  # within 5%: close enough
            return None
        self.refine_left -= 1
        return float(round(math.sqrt(self.best * self.worst)))


def start_rate(configured: float, raw_texts_per_s: float, texts_per_request: int) -> float:
    """First rate of a ladder: ``configured``, or less where the raw forward allows less.

    A tenth of the raw forward's texts/s (in requests of ``texts_per_request``): a server
    sharing the machine with its load generator reaches a fraction of the in-process rate,
    and the ladder climbs from there. ``raw_texts_per_s`` <= 0 (not measured) keeps
    ``configured``.
    """
    if raw_texts_per_s <= 0:
        return configured
    return max(1.0, min(configured, float(round(raw_texts_per_s / 10 / texts_per_request))))


def max_passing(steps: Sequence[StepSummary]) -> StepSummary | None:
    """The passing step with the highest achieved rate, if any."""
    passing = [s for s in steps if s.passed]
    return max(passing, key=lambda s: s.achieved_rps) if passing else None
