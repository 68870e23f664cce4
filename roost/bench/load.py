"""Load one target: each checked answer once, a warm-up, then the rate ladder.

The ladder's arithmetic is :mod:`roost.bench.ladder`; this module sends the requests
(:mod:`roost.bench.loadgen`), samples the server's CPU and RSS (:mod:`roost.bench.measure`)
and writes what it measured into the target's :class:`~roost.bench.plan.ServerResult`.
"""

from __future__ import annotations

import asyncio
import gc
import time

from roost.bench import loadgen, measure
from roost.bench.ladder import Ladder, start_rate, summarize
from roost.bench.plan import Profile, Progress, ServerResult, Target
from roost.config import BenchSettings


class Loader:
    """Loads targets one after another within the run's time budget (``bench.time_budget_s``)."""

    def __init__(
        self, cfg: BenchSettings, profile: Profile, started: float, progress: Progress
    ) -> None:
        self.cfg = cfg
        self.profile = profile
        self.started = started  # time.monotonic() at the start of the run
        self.progress = progress
        self.client_nice = 0  # the niceness the load generator got (0 where not allowed)
        self.raw_texts_per_s = 0.0  # the raw forward's rate: where each ladder starts from

    def load(self, target: Target) -> None:
        server = target.server
        self.progress(f"{server.name} {server.protocol} x{server.texts_per_request}: checking")
        loop = loadgen.new_event_loop()
        try:
            loop.run_until_complete(self._load(target))
        finally:
            loop.close()
        best = server.best
        self.progress(
            f"{server.name} {server.protocol} x{server.texts_per_request}: max "
            f"{server.max_rps:.0f} req/s at p99 <= {self.cfg.slo_p99_ms:.0f} ms"
            + (f" (p99 {best.p99_ms:.1f} ms)" if best else "")
        )

    async def _load(self, target: Target) -> None:
        p = self.profile
        server = target.server
        sender = target.make_sender()
        gc.collect()
        gc.freeze()  # the benchmark's own heap (torch, the model, texts): out of the GC's way
        await sender.open()
        try:
            with measure.priority(self.cfg.client_nice) as nice:
                self.client_nice = nice
                # Correctness: each checked text once, at a gentle rate.
                count = max(1, min(p.check_texts, target.distinct))
                check = await loadgen.run_step(
                    sender, loadgen.StepPlan(rate=200.0, duration_s=count / 200.0)
                )
                server.correctness = {
                    "checked": check.plan.count,
                    "answered": len(check.latencies_s),
                    "wrong": check.wrong,
                    "errors": check.error_count,
                    "first_error": check.first_error,
                }
                rate, seconds = p.warmup
                await loadgen.run_step(sender, loadgen.StepPlan(rate, seconds))
                with measure.RssSampler(target.pid) as rss:
                    await self._ladder(sender, target.pid, server)
                server.peak_rss_mb = rss.peak_mb
        finally:
            await sender.close()

    async def _ladder(self, sender: loadgen.Sender, pid: int, server: ServerResult) -> None:
        p = self.profile
        start = start_rate(p.start_rps, self.raw_texts_per_s, server.texts_per_request)
        ladder = Ladder(
            start, p.growth, self.cfg.max_rps, p.max_steps, p.refine,
            retry_failures=not p.quick,
        )  # fmt: skip
        while (rate := ladder.next_rate()) is not None:
            if time.monotonic() - self.started > self.cfg.time_budget_s:
                self.progress("time budget spent: ladder stopped")
                break
            cpu_before, client_before = measure.tree_cpu_s(pid), time.process_time()
            record = await loadgen.run_step(sender, loadgen.StepPlan(rate, p.step_s))
            step = summarize(
                record, self.cfg.slo_p99_ms, measure.tree_cpu_s(pid) - cpu_before,
                time.process_time() - client_before,
            )  # fmt: skip
            server.ladder.append(step)
            ladder.record(rate, step.passed)
            self.progress(
                f"  {rate:8.0f} req/s  p50 {step.p50_ms:7.2f}  p99 {step.p99_ms:8.2f}  "
                f"p99.9 {step.p999_ms:8.2f} ms  errors {step.errors}"
                + ("" if step.passed else "  (over)")
            )
            await asyncio.sleep(0.5 if step.passed else 1.5)  # let a backlog drain
