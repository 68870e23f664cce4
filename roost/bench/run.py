"""``roost bench``: roost's predictor, TorchServe and the raw model, measured in one run.

Stages, in order:

1. resolve the model version (MLflow registry, downloaded once) and sample corpus texts;
   the reference model in-process gives the expected answer of every text;
2. raw forward: the batch kernel both servers run, in-process, at several batch sizes;
3. export the version as a TorchServe archive (KServe's kserve-torchserve layout);
4. roost: start the model server (``python -m roost.serving``, what a pod runs) on the
   model directory (what KServe's storage initializer gives a pod) ``cold_starts`` times,
   once from a ``models:/`` URI with an empty cache; check answers; warm up; run a ladder
   per protocol (REST v2, gRPC, REST v2 with many texts per request);
5. TorchServe: per worker count of the sweep, start, check, warm up, run the REST ladder;
   the best configuration is the one reported;
6. the caller writes bench.json, bench.md and bench.png (:mod:`roost.bench.report`).

Server logs and the TorchServe export go under ``state_dir/bench``. Every server is stopped
before the next starts, and in a ``finally`` on any error. The load generator's thread runs
at ``bench.client_nice`` where allowed, so the measuring side does not queue behind the
servers on a small machine.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from roost import proc, registry, tracking
from roost.bench import loadgen, measure, workload
from roost.bench import torchserve as ts
from roost.bench.ladder import Ladder, StepSummary, max_passing, summarize
from roost.classifier import TextClassifier
from roost.config import BenchSettings, Settings
from roost.serving import local

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
LIBRARIES = (
    "torch", "kserve", "uvicorn", "uvloop", "fastapi", "grpcio", "orjson", "numpy",
    "torchserve", "torch-model-archiver",
)  # fmt: skip


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
            "at_max": None if best is None else best.to_dict(),
            "correctness": self.correctness,
            "config": self.config,
            "ladder": [s.to_dict() for s in self.ladder],
        }


@dataclass
class Target:
    """One load target: its result, the process tree to measure, and how to send to it."""

    server: ServerResult
    pid: int
    distinct: int  # distinct requests (texts or groups of texts) the sender cycles through
    make_sender: Callable[[], loadgen.Sender]


class Bench:
    def __init__(self, settings: Settings, out: Path, profile: Profile, progress: Progress) -> None:
        self.settings = settings
        self.cfg = settings.bench
        self.out = out
        # Bulky artefacts (server logs, the TorchServe export) stay out of the report dir.
        self.work = (settings.state_dir / "bench").resolve()
        self.profile = profile
        self.progress = progress
        self.started = time.monotonic()
        self.client_nice = 0
        self.models_uri_cold_start: float | None = None
        self._raw_again: Callable[[], float] = lambda: 0.0

    # -- the whole run ---------------------------------------------------------------------
    def run(self, model_uri: str) -> dict[str, Any]:
        p = self.profile
        self.out.mkdir(parents=True, exist_ok=True)
        if self.work.exists():
            shutil.rmtree(self.work / "logs", ignore_errors=True)
        load_before = os.getloadavg()
        model = registry.fetch_model(self.settings, model_uri)
        version = model.version or "local"
        name = model.name or self.settings.registry.model_name
        self.progress(f"model {name} v{version} ({model.path})")
        classifier = TextClassifier.load(model.path)
        texts = workload.sample_texts(self.settings.data, p.texts, self.cfg.seed)
        expected = workload.Expected(
            list(classifier.labels),
            np.concatenate(
                [classifier.predict_proba(texts[i : i + 64]) for i in range(0, len(texts), 64)]
            ),
        )
        raw = self.raw_forward(classifier, texts)
        self.progress(
            f"raw forward: {raw['max_seq_per_s']:.0f} texts/s at batch {raw['batch_size']}"
        )
        export = ts.export(
            model.path, self.work / "torchserve", name, version,
            ts.Tuning(batch_size=self.cfg.torchserve_batch_size,
                      max_batch_delay_ms=self.cfg.torchserve_max_batch_delay_ms,
                      workers=p.ts_workers[-1]),
        )  # fmt: skip
        servers = self.roost(model, name, version, texts, expected)
        ts_servers, sweep = self.torchserve(export, texts, expected)
        servers += ts_servers
        self.raw_forward_again(raw)
        batch_section = None
        if not p.quick:  # 1M rows take a while; `roost bench batch` runs the section alone
            from roost.bench import batch as bench_batch

            batch_section = bench_batch.run(self.settings, model_uri, progress=self.progress)
        result = {
            "machine": machine(load_before, self.client_nice),
            "commit": git_commit(),
            "model_name": name,
            "model_version": version,
            "mode": "quick" if p.quick else "full",
            "slo_p99_ms": self.cfg.slo_p99_ms,
            "duration_s": round(time.monotonic() - self.started, 1),
            "libraries": libraries(),
            "texts": {**workload.text_stats(texts), "source": "corpus sample",
                      "seed": self.cfg.seed},
            "raw_forward": raw,
            "servers": [s.to_dict() for s in servers],
            "torchserve_sweep": sweep,
            "cold_start_models_uri_s": self.models_uri_cold_start,
            "work_dir": str(self.work),
            "export": {"layout": "kserve-torchserve", "model_name": name,
                       "config": "config/config.properties",
                       "archive": f"model-store/{export.mar.name}"},
        }  # fmt: skip
        if batch_section is not None:
            result["batch"] = batch_section
        result["targets"] = targets(result)
        return result

    # -- raw forward -----------------------------------------------------------------------
    def raw_forward(self, classifier: TextClassifier, texts: list[str]) -> dict[str, Any]:
        import torch

        from roost import tokenizer
        from roost.serving import kernel

        threads = proc.cpu_limit()
        torch.set_num_threads(threads)
        fast = kernel.Kernel(
            classifier.module,
            kernel.encoder_for(classifier.tokenizer, tokenizer.TOKEN_RE),
            classifier.num_classes,
        )
        p = self.profile
        rates = measure.raw_forward(fast.predict_proba, texts, p.raw_batches, p.raw_seconds)
        best = max(rates, key=lambda size: rates[size])
        reference = measure.raw_forward(classifier.predict_proba, texts, (best,), p.raw_seconds)
        self._raw_again = lambda: measure.raw_forward(
            fast.predict_proba, texts, (best,), p.raw_seconds
        )[best]
        return {
            "max_seq_per_s": rates[best],
            "batch_size": best,
            "threads": threads,
            "by_batch_size": {str(k): v for k, v in rates.items()},
            "reference_seq_per_s": reference[best],
            "note": "roost's batch kernel (tokenise + forward) in-process; "
            "reference: TextClassifier.predict_proba; measured before and after the servers, "
            "max_seq_per_s is the higher (the machine's ceiling: the lower one met other load)",
        }

    def raw_forward_again(self, raw: dict[str, Any]) -> None:
        """Measure the best batch size again after the servers; keep the higher rate."""
        again = self._raw_again()
        raw["seq_per_s_before_after"] = [raw["max_seq_per_s"], again]
        raw["max_seq_per_s"] = max(raw["max_seq_per_s"], again)

    # -- roost -----------------------------------------------------------------------------
    def roost(
        self,
        model: registry.LocalModel,
        name: str,
        version: str,
        texts: list[str],
        expected: workload.Expected,
    ) -> list[ServerResult]:
        p = self.profile
        logs = self.work / "logs"
        env = {"ROOST_SERVING__MODEL_ALIAS": model.alias} if model.alias else {}
        extra = ["--model-version", version]
        cold: list[float] = []
        server: local.LocalServer | None = None
        try:
            for i in range(p.cold_starts):
                if server is not None:
                    server.stop()
                server, seconds = self._start_roost(
                    str(model.path), name, logs / f"roost-{i}.log", env, extra
                )
                cold.append(seconds)
            assert server is not None
            self.progress(f"roost ready: cold start {statistics.median(cold):.2f}s {cold}")
            if p.models_uri_start and model.name and model.version:
                self.models_uri_cold_start = self._models_uri_start(model, logs)
            config = {
                "model_dir": True,
                # Limits: within them the server sizes its batches from the forward cost it
                # measures at load (its log says `batch=` and `wait_ms=`).
                "batching": "limits",
                "max_batch_size": self.settings.serving.max_batch_size,
                "max_batch_wait_ms": self.settings.serving.max_batch_wait_ms,
                "fast_path": self.settings.serving.fast_path,
            }

            def result(protocol: str, per_request: int = 1) -> ServerResult:
                return ServerResult(
                    "roost", protocol, per_request, statistics.median(cold), cold, config
                )

            http = server
            targets = [
                Target(
                    result("rest-v2"),
                    http.process.pid,
                    len(texts),
                    lambda: loadgen.HttpSender(
                        "127.0.0.1", http.http_port, f"/v2/models/{name}/infer",
                        workload.v2_bodies(texts),
                        workload.check_v2(expected, 1, len(texts)), self.cfg.connections,
                    ),
                ),
            ]  # fmt: skip
            if p.grpc:
                targets.append(
                    Target(
                        result("grpc-v2"),
                        http.process.pid,
                        len(texts),
                        lambda: loadgen.GrpcSender(
                            http.grpc_target,
                            workload.grpc_requests(texts, name),
                            workload.check_grpc(expected),
                        ),
                    )
                )
            if p.multi_text > 1:
                k = p.multi_text
                groups = len(texts) // k
                targets.append(
                    Target(
                        result("rest-v2", k),
                        http.process.pid,
                        groups,
                        lambda: loadgen.HttpSender(
                            "127.0.0.1", http.http_port, f"/v2/models/{name}/infer",
                            workload.v2_bodies(texts, k), workload.check_v2(expected, k, groups),
                            self.cfg.connections,
                        ),
                    )
                )  # fmt: skip
            for target in targets:
                self.load(target)
            return [t.server for t in targets]
        finally:
            if server is not None:
                server.stop()

    def _start_roost(
        self,
        uri: str,
        name: str,
        log_file: Path,
        env: dict[str, str],
        extra: list[str],
        tracking_uri: str | None = None,
    ) -> tuple[local.LocalServer, float]:
        started = time.perf_counter()
        server = local.start(
            self.settings, uri, log_file, name=name, env=env, extra_args=extra,
            tracking_uri=tracking_uri,
        )  # fmt: skip
        try:
            seconds = measure.wait_ready(
                measure.http_ready(server.ready_url), started, 120,
                server.process.alive, lambda: server.process.log_tail(5),
            )  # fmt: skip
        except BaseException:
            server.stop()
            raise
        return server, seconds

    def _models_uri_start(self, model: registry.LocalModel, logs: Path) -> float:
        """Cold start from ``models:/NAME/VERSION`` with an empty model cache (a download)."""
        uri = f"models:/{model.name}/{model.version}"
        with tempfile.TemporaryDirectory(prefix="roost-bench-cache-") as state:
            server, seconds = self._start_roost(
                uri, model.name or "model", logs / "roost-models-uri.log",
                {"ROOST_STATE_DIR": state}, [], tracking.resolve_uri(self.settings),
            )  # fmt: skip
            server.stop()
        self.progress(f"roost from {uri} (download included): {seconds:.2f}s")
        return round(seconds, 3)

    # -- TorchServe ------------------------------------------------------------------------
    def torchserve(
        self, export: ts.Export, texts: list[str], expected: workload.Expected
    ) -> tuple[list[ServerResult], list[dict[str, Any]]]:
        results: list[ServerResult] = []
        for workers in self.profile.ts_workers:
            tuning = ts.Tuning(
                workers=workers,
                batch_size=self.cfg.torchserve_batch_size,
                max_batch_delay_ms=self.cfg.torchserve_max_batch_delay_ms,
            )
            workdir = self.work / "logs" / f"torchserve-w{workers}"
            started = time.perf_counter()
            server = ts.start_local(export, workdir, tuning)
            try:
                probe = measure.http_ready(
                    server.url + server.predict_path, "POST", {"text": "ready?"}
                )
                seconds = measure.wait_ready(
                    probe, started, 180, server.process.alive, server.process.log_tail
                )
                self.progress(f"torchserve (workers={workers}) ready: cold start {seconds:.2f}s")
                result = ServerResult(
                    "torchserve", "rest", 1, seconds, [seconds],
                    {"workers": workers, "batch_size": tuning.batch_size,
                     "max_batch_delay_ms": tuning.max_batch_delay_ms,
                     "threads_per_worker": tuning.threads_per_worker,
                     "logging": "warnings only (as roost)"},
                )  # fmt: skip
                self.load(
                    Target(
                        result,
                        server.process.pid,
                        len(texts),
                        partial(
                            loadgen.HttpSender, "127.0.0.1", server.inference_port,
                            server.predict_path, workload.ts_bodies(texts),
                            workload.check_ts(expected), self.cfg.connections,
                        ),
                    )
                )  # fmt: skip
                results.append(result)
            finally:
                server.stop()
        sweep = [
            {**r.config, "max_rps_p99_50ms": round(r.max_rps, 1), "cold_start_s": r.cold_start_s}
            for r in results
        ]
        best = max(results, key=lambda r: (r.max_rps, -r.config["workers"]))
        return [best], sweep

    # -- load ------------------------------------------------------------------------------
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
        ladder = Ladder(
            p.start_rps, p.growth, self.cfg.max_rps, p.max_steps, p.refine,
            retry_failures=not p.quick,
        )  # fmt: skip
        while (rate := ladder.next_rate()) is not None:
            if time.monotonic() - self.started > self.cfg.time_budget_s:
                self.progress("time budget spent: ladder stopped")
                break
            cpu_before = measure.tree_cpu_s(pid)
            record = await loadgen.run_step(sender, loadgen.StepPlan(rate, p.step_s))
            step = summarize(record, self.cfg.slo_p99_ms, measure.tree_cpu_s(pid) - cpu_before)
            server.ladder.append(step)
            ladder.record(rate, step.passed)
            self.progress(
                f"  {rate:8.0f} req/s  p50 {step.p50_ms:7.2f}  p99 {step.p99_ms:8.2f}  "
                f"p99.9 {step.p999_ms:8.2f} ms  errors {step.errors}"
                + ("" if step.passed else "  (over)")
            )
            await asyncio.sleep(0.5 if step.passed else 1.5)  # let a backlog drain


# -- context --------------------------------------------------------------------------------
def machine(load_before: tuple[float, float, float], client_nice: int) -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_limit": proc.cpu_limit(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "client_nice": client_nice,
    }


def libraries() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
            check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, computed from this run's numbers (same machine, same run)."""
    servers: list[dict[str, Any]] = result["servers"]

    def find(name: str, protocol: str, per_request: int = 1) -> dict[str, Any] | None:
        for s in servers:
            if (s["name"], s["protocol"], s["texts_per_request"]) == (name, protocol, per_request):
                return s
        return None

    roost_rest = find("roost", "rest-v2")
    torchserve_rest = find("torchserve", "rest")
    raw = float(result["raw_forward"]["max_seq_per_s"])
    out: dict[str, Any] = {}
    if roost_rest and torchserve_rest and torchserve_rest["max_rps_p99_50ms"] > 0:
        ratio = roost_rest["max_rps_p99_50ms"] / torchserve_rest["max_rps_p99_50ms"]
        out["roost_vs_torchserve"] = {"value": round(ratio, 2), "target": 2.0, "met": ratio >= 2.0}
    roost_best = max(
        (s for s in servers if s["name"] == "roost"),
        key=lambda s: s["max_seq_per_s_p99_50ms"],
        default=None,
    )
    if roost_rest and raw > 0:
        single = roost_rest["max_seq_per_s_p99_50ms"] / raw
        best = roost_best["max_seq_per_s_p99_50ms"] / raw if roost_best else single
        out["roost_vs_raw"] = {
            "value": round(single, 3),
            "value_best_request_shape": round(best, 3),
            "best_texts_per_request": roost_best["texts_per_request"] if roost_best else 1,
            "target": 0.7,
            "met": single >= 0.7,
        }
    if roost_rest:
        cold = roost_rest["cold_start_s"]
        out["cold_start"] = {"value": cold, "target": 2.0, "met": cold <= 2.0}
    return out


def run(
    settings: Settings,
    out: Path,
    quick: bool,
    model_uri: str,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the bench.json document (the caller writes the reports)."""
    profile = Profile.of(settings.bench, quick)
    bench = Bench(settings, out, profile, progress or (lambda message: log.info("%s", message)))
    return bench.run(model_uri)
