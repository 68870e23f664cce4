"""``roost bench``: roost's predictor, TorchServe and the raw model, measured in one run.

Stages, in order:

1. resolve the model version (MLflow registry, downloaded once) and sample corpus texts;
   the reference model in-process gives the expected answer of every text;
2. raw forward: the batch kernel both servers run, in-process, at several batch sizes
   (each ladder starts from what it allows); the cold-start floor (a bare torch import
   plus loading the weights file, in a fresh process);
3. export the version as a TorchServe archive (KServe's kserve-torchserve layout);
4. roost: start the model server (``python -m roost serve``, what a pod runs) on the
   model directory (what KServe's storage initializer gives a pod) ``cold_starts`` times,
   once from a ``models:/`` URI with an empty cache; check answers; warm up; run a ladder
   per protocol (REST v2, gRPC, REST v2 with many texts per request);
5. TorchServe: per worker count of the sweep, start, check, warm up, run the REST ladder;
   the best configuration is the one reported;
5b. the peers (plain KServe, MLServer, BentoML, PyTriton; :mod:`roost.bench.peers`), each
   in its own environment, started as its docs say, checked, then its ladders;
6. the caller writes bench.json, bench.md and bench.png (:mod:`roost.bench.report`).

This module sequences the stages; :mod:`roost.bench.servers` starts and stops the servers
(stages 4 and 5), :mod:`roost.bench.load` drives each one up its ladder, and
:mod:`roost.bench.report` describes the machine and computes the targets.

Server logs and the TorchServe export go under ``state_dir/bench``. Every server is stopped
before the next starts, and in a ``finally`` on any error. The load generator's thread runs
at ``bench.client_nice`` where allowed, so the measuring side does not queue behind the
servers on a small machine.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from roost import proc, registry
from roost.bench import ceiling, h2grpc, measure, peers, report, stream, workload
from roost.bench import layers as bench_layers
from roost.bench import torchserve as ts
from roost.bench.load import Loader
from roost.bench.plan import Profile, Progress
from roost.bench.servers import Servers
from roost.classifier import TextClassifier
from roost.config import Settings

log = logging.getLogger(__name__)


class Bench:
    """One run: the model and texts, the raw forward pass, then each server under load."""

    def __init__(
        self,
        settings: Settings,
        out: Path,
        profile: Profile,
        progress: Progress,
        layers: bool = False,
    ) -> None:
        self.settings = settings
        self.layers = layers  # roost again with each fast-path layer off (roost.bench.layers)
        self.cfg = settings.bench
        self.out = out
        # Bulky artefacts (server logs, the TorchServe export) stay out of the report dir.
        self.work = (settings.state_dir / "bench").resolve()
        self.profile = profile
        self.progress = progress
        self.started = time.monotonic()
        self.loader = Loader(self.cfg, profile, self.started, progress)
        self.servers = Servers(settings, self.work, profile, progress, self.loader.load)
        self._raw_again: Callable[[], float] = lambda: 0.0

    # -- the whole run ---------------------------------------------------------------------
    def run(self, model_uri: str) -> dict[str, Any]:
        p = self.profile
        h2grpc.use(self.cfg.grpc_client)
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
        self.loader.raw_texts_per_s = float(raw["max_seq_per_s"])
        floor = peers.cold_start_floor(model.path, p.cold_starts)
        self.progress(f"cold start floor (import torch + load the weights): {floor['seconds']}s")
        export = ts.export(
            model.path, self.work / "torchserve", name, version,
            ts.Tuning(batch_size=self.cfg.torchserve_batch_size,
                      max_batch_delay_ms=self.cfg.torchserve_max_batch_delay_ms,
                      workers=p.ts_workers[-1]),
        )  # fmt: skip
        servers = self.servers.roost(model, name, version, texts, expected)
        if p.grpc:  # what gRPC itself allows here: roost's gRPC rows with the model taken out
            servers += ceiling.rows(
                self.work, name, texts, expected, self.loader.load, self.progress
            )
        servers += self.servers.roost_logging(model, name, version, texts, expected)  # its cost
        if self.layers:
            servers += bench_layers.rows(self.servers, model, name, version, texts, expected)
        ts_servers, sweep = self.servers.torchserve(export, texts, expected)
        servers += ts_servers
        servers += peers.Peers(self.cfg, self.work, p, self.progress, self.loader.load).run(
            model.path, name, texts, expected
        )
        self.raw_forward_again(raw)
        batch_section = None
        if not p.quick:  # 1M rows take a while; `roost bench batch` runs the section alone
            from roost.bench import batch as bench_batch

            batch_section = bench_batch.run(self.settings, model_uri, progress=self.progress)
        result = {
            "machine": report.machine(load_before, self.loader.client_nice),
            "commit": proc.git_commit(mark_dirty=True) or "unknown",
            "model_name": name,
            "model_version": version,
            "mode": "quick" if p.quick else "full",
            "slo_p99_ms": self.cfg.slo_p99_ms,
            "grpc_client": h2grpc.client(),
            "duration_s": round(time.monotonic() - self.started, 1),
            "libraries": report.libraries(),
            "peer_requirements": {k: list(peers.PEERS[k].requirements) or ["roost's own"]
                                  for k in self.cfg.peers},
            "texts": {**workload.text_stats(texts), "source": "corpus sample",
                      "seed": self.cfg.seed},
            "raw_forward": raw,
            "servers": [s.to_dict() for s in servers],
            "torchserve_sweep": sweep,
            "cold_start_models_uri_s": self.servers.models_uri_cold_start,
            "cold_start_floor": floor,
            "work_dir": str(self.work),
            "export": {"layout": "kserve-torchserve", "model_name": name,
                       "config": "config/config.properties",
                       "archive": f"model-store/{export.mar.name}"},
        }  # fmt: skip
        if batch_section is not None:
            result["batch"] = batch_section
        result["layers"] = bench_layers.gains(result)
        result["grpc_ceiling"] = ceiling.ratios(result)
        result["targets"] = {
            **report.targets(result),
            **stream.targets(result),
            **peers.targets(result),
        }
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


def run(
    settings: Settings,
    out: Path,
    quick: bool,
    model_uri: str,
    progress: Progress | None = None,
    layers: bool | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the bench.json document (the caller writes the reports).

    ``layers``: also run roost with each fast-path layer off (default: full runs only).
    """
    profile = Profile.of(settings.bench, quick)
    bench = Bench(
        settings, out, profile, progress or (lambda message: log.info("%s", message)),
        layers=not quick if layers is None else layers,
    )  # fmt: skip
    return bench.run(model_uri)
