"""What one ``roost bench`` run does (:class:`Profile`) and what it measures per server.

Shared by the stages: :mod:`roost.bench.servers` starts servers and builds a :class:`Target`
for each protocol, :mod:`roost.bench.load` climbs its ladder into the :class:`ServerResult`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from roost.bench import loadgen
from roost.bench.ladder import StepSummary, max_passing
from roost.config import BenchSettings

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Profile:
    """What one run does: the settings, shortened for ``--quick``."""

    quick: bool
    step_s: float
    start_rps: float
    growth: float
    refine: int
    max_steps: int
    texts: int
    check_texts: int
    cold_starts: int
    warmup: tuple[float, float]  # (requests/s, seconds)
    raw_batches: tuple[int, ...]
    raw_seconds: float
    multi_text: int
    grpc: bool
    models_uri_start: bool
    ts_workers: tuple[int, ...]

    @classmethod
    def of(cls, cfg: BenchSettings, quick: bool) -> Profile:
        if quick:
            return cls(
                quick=True, step_s=1.5, start_rps=250.0, growth=4.0, refine=0, max_steps=3,
                texts=min(cfg.texts, 400), check_texts=100, cold_starts=1,
                warmup=(500.0, 1.0), raw_batches=(1, 64), raw_seconds=0.3, multi_text=0,
                grpc=True, models_uri_start=False, ts_workers=(max(cfg.torchserve_workers),),
            )  # fmt: skip
        return cls(
            quick=False, step_s=cfg.step_s, start_rps=cfg.start_rps, growth=cfg.growth,
            refine=cfg.refine_steps, max_steps=cfg.max_steps, texts=cfg.texts,
            check_texts=min(cfg.texts, 300), cold_starts=cfg.cold_starts,
            warmup=(2000.0, 5.0), raw_batches=(1, 8, 32, 64, 128, 256), raw_seconds=1.0,
            multi_text=cfg.multi_text_request, grpc=True, models_uri_start=True,
            ts_workers=tuple(cfg.torchserve_workers),
        )  # fmt: skip


@dataclass
class ServerResult:
    name: str
    protocol: str
    texts_per_request: int
    cold_start_s: float
    cold_starts_s: list[float]
    config: dict[str, Any]
    ladder: list[StepSummary] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    correctness: dict[str, Any] = field(default_factory=dict)
    unavailable: str | None = None  # why a server could not be measured here (no ladder)

    @property
    def best(self) -> StepSummary | None:
        return max_passing(self.ladder)

    @property
    def max_rps(self) -> float:
        best = self.best
        return 0.0 if best is None else best.achieved_rps

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "name": self.name,
            "protocol": self.protocol,
            "texts_per_request": self.texts_per_request,
            "max_rps_p99_50ms": round(self.max_rps, 1),
            "max_seq_per_s_p99_50ms": round(self.max_rps * self.texts_per_request, 1),
            "cold_start_s": round(self.cold_start_s, 3),
            "cold_starts_s": [round(x, 3) for x in self.cold_starts_s],
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "cpu_s_per_1k": None
            if best is None or best.cpu_s_per_1k is None
            else round(best.cpu_s_per_1k, 3),
            "client_cpu_s_per_1k": None
            if best is None or best.client_cpu_s_per_1k is None
            else round(best.client_cpu_s_per_1k, 3),
            "at_max": None if best is None else best.to_dict(),
            "correctness": self.correctness,
            "config": self.config,
            "ladder": [s.to_dict() for s in self.ladder],
            **({"unavailable": self.unavailable} if self.unavailable else {}),
        }


@dataclass
class Target:
    """One load target: its result, the process tree to measure, and how to send to it."""

    server: ServerResult
    pid: int
    distinct: int  # distinct requests (texts or groups of texts) the sender cycles through
    make_sender: Callable[[], loadgen.Sender]
