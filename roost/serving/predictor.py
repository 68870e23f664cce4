"""The KServe predictor: a ``kserve.Model`` serving roost's text classifier."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import kserve
import numpy as np
import torch
from kserve.errors import InvalidInput
from kserve.model import InferenceVerb

from roost import proc
from roost.classifier import TextClassifier
from roost.config import ServingSettings, Settings
from roost.monitor.events import EVENT_ID_HEADER
from roost.monitor.payload import PayloadLogger, text_request
from roost.serving import codec, kernel, metrics
from roost.serving.batching import BatchFn, MicroBatcher

log = logging.getLogger(__name__)

VERSION_HEADER = "x-roost-model-version"
ALIAS_HEADER = "x-roost-model-alias"
WARMUP_TEXTS = (
    "warm-up: the quick brown fox jumps over the lazy dog",
    "@user I can't believe it's not butter!!! http://example.com #wow",
    "www.example.org   ΣΑΣ ΟΔΟΣ   ok?",
    "",
)


def intra_op_threads(configured: int | None, cpu_limit: int) -> int:
    """torch threads: the setting, else the CPU limit less the core the event loop needs.

    The event loop (HTTP, JSON, gRPC) is busy whenever the model is; with intra-op threads
    on every core, torch's OpenMP workers spin against it (measured on 2 cores: twice the
    CPU per request and a collapsing p99 at 7k req/s with 2 threads, none with 1).
    """
    return configured or max(1, cpu_limit - 1)


@dataclass(frozen=True)
class BatchPlan:
    """Batching limits sized from the forward cost measured at load."""

    max_batch_size: int
    max_wait_s: float
    cost_ms: dict[int, float]  # batch size -> measured forward time (tokenise + forward)
    fixed_ms: float  # per-call overhead: what sharing a forward pass saves


def plan_batching(cost_ms: dict[int, float], cfg: ServingSettings) -> BatchPlan:
    """Pick the batch limits from measured costs (pure; see ServingSettings for the knobs).

    The batch size is the largest measured size whose forward pass fits in
    ``forward_budget_ms`` (within ``max_batch_size``); a batch waits for company at most the
    fixed cost of a forward pass (what merging saves), and never more than ``max_batch_wait_ms``.
    """
    sizes = sorted(cost_ms)
    fitting = [s for s in sizes if cost_ms[s] <= cfg.forward_budget_ms] or sizes[:1]
    max_batch = min(cfg.max_batch_size, max(fitting))
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        per_text = max(0.0, (cost_ms[large] - cost_ms[small]) / (large - small))
        fixed = max(0.0, cost_ms[small] - per_text * small)
    else:
        fixed = cost_ms[sizes[0]]
    wait_ms = min(cfg.max_batch_wait_ms, fixed)
    return BatchPlan(max_batch, wait_ms / 1000.0, dict(cost_ms), round(fixed, 4))


class SentimentModel(kserve.Model):  # type: ignore[misc]
    """Texts in (REST v1, REST v2, gRPC v2), label + class probabilities out."""

    def __init__(self, name: str, model_uri: str, settings: Settings) -> None:
        super().__init__(name, return_response_headers=True)
        self.model_uri = model_uri
        self.settings = settings
        self.version: str | None = settings.serving.model_version
        self.alias: str | None = settings.serving.model_alias
        self.classifier: TextClassifier | None = None
        self.batcher: MicroBatcher | None = None
        self.plan: BatchPlan | None = None
        self.labels: list[str] = []
        self.payload: PayloadLogger | None = None  # roost.monitor: payload events, when on
        self.ready = False

    # -- lifecycle -------------------------------------------------------------------------
    def load(self) -> bool:
        cfg = self.settings.serving
        started = time.perf_counter()
        path = self._resolve()
        torch.set_num_threads(intra_op_threads(cfg.intra_op_threads, proc.cpu_limit()))
        self.classifier = TextClassifier.load(path)
        self.labels = list(self.classifier.labels)
        forward = self._forward_fn(self.classifier)
        self.plan = plan_batching(self._warm_up(forward, cfg.max_batch_size), cfg)
        self.batcher = MicroBatcher(
            forward,
            max_batch_size=self.plan.max_batch_size,
            max_wait_s=self.plan.max_wait_s,
            on_batch=self._batch_metrics(),
        )
        info = metrics.MODEL_INFO.labels(
            **self._labels(), alias=self.alias or "", uri=self.model_uri
        )
        info.set(1)
        if cfg.logging.url:
            self.payload = PayloadLogger(cfg.logging, self.name, self.version)
            self.payload.start()
        log.info(
            "model loaded name=%s version=%s alias=%s seconds=%.2f threads=%d batch=%d "
            "wait_ms=%.3f forward_ms=%s",
            self.name, self.version, self.alias, time.perf_counter() - started,
            torch.get_num_threads(), self.plan.max_batch_size, self.plan.max_wait_s * 1000,
            self.plan.cost_ms,
        )  # fmt: skip
        self.ready = True
        return self.ready

    def unload(self) -> None:
        """Stop answering (the repository extension's unload): not ready until loaded again."""
        self.ready = False

    def _resolve(self) -> Any:
        """A local directory for the model URI; the registry (MLflow) only when it needs one."""
        from pathlib import Path

        uri = self.model_uri
        if not uri.startswith(("models:/", "runs:/", "mlflow-artifacts:", "s3://")):
            path = Path(uri.removeprefix("file://"))
            if path.is_dir():  # a pod's storage-initializer directory: no MLflow import
                return path
        from roost import registry

        local = registry.fetch_model(self.settings, uri)
        self.version = self.version or local.version
        self.alias = self.alias or local.alias
        return local.path

    @staticmethod
    def _forward_fn(classifier: TextClassifier) -> BatchFn:
        """The fast batch kernel, if it encodes the warm-up texts exactly as the tokenizer does."""
        from roost import tokenizer

        fast = kernel.Kernel(
            classifier.module,
            kernel.encoder_for(classifier.tokenizer, tokenizer.TOKEN_RE),
            classifier.num_classes,
        )
        probe = list(WARMUP_TEXTS)
        ref_ids, ref_offsets = classifier.tokenizer.encode(probe)
        ids, offsets = fast.encoder.encode(probe)
        if torch.equal(ids, ref_ids) and torch.equal(offsets, ref_offsets):
            return fast.predict_proba
        log.warning("batch encoder disagrees with the tokenizer; using the reference encoder")
        return classifier.predict_proba

    @staticmethod
    def _warm_up(forward: BatchFn, max_batch_size: int) -> dict[int, float]:
        """Run the model at a few batch sizes; returns the best forward time (ms) of each."""
        sizes = sorted({1, min(8, max_batch_size), max_batch_size})
        texts = [t for t in WARMUP_TEXTS if t] * (max_batch_size // 3 + 1)
        costs = {}
        for size in sizes:
            batch = texts[:size]
            forward(batch)  # first call pays allocation
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                forward(batch)
                best = min(best, time.perf_counter() - start)
            costs[size] = round(best * 1000, 4)
        return costs

    def _labels(self) -> dict[str, str]:
        return {"model": self.name, "version": self.version or "unknown"}

    def _batch_metrics(self) -> Any:
        """Per-batch metrics, recorded in the worker thread: nothing per request on the loop."""
        labels = self._labels()
        batch_size = metrics.BATCH_SIZE.labels(**labels)
        forward_seconds = metrics.FORWARD_SECONDS.labels(**labels)
        per_label = [metrics.PREDICTIONS.labels(**labels, label=name) for name in self.labels]
        confidence = metrics.CONFIDENCE.labels(**labels)

        def record(requests: int, texts: int, seconds: float, proba: np.ndarray) -> None:
            batch_size.observe(texts)
            forward_seconds.observe(seconds)
            counts = np.bincount(proba.argmax(axis=1), minlength=len(per_label))
            for counter, count in zip(per_label, counts.tolist(), strict=True):
                if count:
                    counter.inc(count)
            metrics.observe_many(confidence, proba.max(axis=1))

        return record

    # -- request path ----------------------------------------------------------------------
    async def __call__(
        self,
        body: Any,
        headers: dict[str, str] | None = None,
        verb: InferenceVerb = InferenceVerb.PREDICT,
    ) -> Any:
        protocol = codec.protocol_of(body).label
        labels = self._labels()
        start = time.perf_counter()
        try:
            result = await super().__call__(body, headers, verb)
        except InvalidInput:
            metrics.REQUESTS.labels(**labels, protocol=protocol, outcome="invalid").inc()
            raise
        except Exception:
            metrics.REQUESTS.labels(**labels, protocol=protocol, outcome="error").inc()
            raise
        metrics.REQUESTS.labels(**labels, protocol=protocol, outcome="ok").inc()
        metrics.LATENCY.labels(**labels, protocol=protocol).observe(time.perf_counter() - start)
        return result

    def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> codec.Decoded:
        return codec.decode(payload, self.settings.serving.max_texts_per_request)

    async def predict(
        self,
        payload: codec.Decoded,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> tuple[codec.Decoded, np.ndarray]:
        proba = await self.infer(payload.texts)
        return payload, proba

    async def infer(self, texts: list[str]) -> np.ndarray:
        """Probabilities for ``texts`` (float32 [n, classes]), batched with concurrent requests."""
        return await self.enqueue(texts)

    def enqueue(self, texts: list[str]) -> asyncio.Future[np.ndarray]:
        """:meth:`infer` as a future of the running loop (no coroutine: the HTTP fast path)."""
        assert self.batcher is not None
        return self.batcher.enqueue(texts)

    def postprocess(
        self,
        result: tuple[codec.Decoded, np.ndarray],
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> Any:
        decoded, proba = result
        names = self.names(proba)
        if response_headers is not None:
            response_headers.update(self.response_headers())
        event_id = self._log_payload(decoded, names, proba, response_headers)
        if decoded.protocol is codec.Protocol.REST_V1:
            return codec.encode_v1(self.labels, names, proba)
        out = codec.encode_v2(decoded, self.name, self.version, self.labels, names, proba)
        out.id = event_id or out.id
        return out

    def _log_payload(
        self,
        decoded: codec.Decoded,
        names: list[str],
        proba: np.ndarray,
        response_headers: dict[str, str] | None,
    ) -> str | None:
        """KServe's path: log the request as v2 JSON and the answer; returns the event id."""
        payload = self.payload
        if payload is None:
            return None
        request_id = decoded.request.id if decoded.request is not None else ""
        event_id = payload.event_id(request_id or "")
        if response_headers is not None:
            response_headers[EVENT_ID_HEADER] = event_id
        texts, labels, version = decoded.texts, self.labels, self.version
        payload.log(
            event_id,
            lambda: text_request(event_id, texts),
            lambda: codec.v2_json(self.name, version, event_id, labels, names, proba),
        )
        return event_id

    def response_headers(self) -> dict[str, str]:
        out = {VERSION_HEADER: self.version or "unknown"}
        if self.alias:
            out[ALIAS_HEADER] = self.alias
        return out

    def names(self, proba: np.ndarray) -> list[str]:
        labels = self.labels
        return [labels[i] for i in proba.argmax(axis=1).tolist()]

    # -- metadata --------------------------------------------------------------------------
    def get_input_types(self) -> list[dict[str, Any]]:
        return codec.input_types()

    def get_output_types(self) -> list[dict[str, Any]]:
        return codec.output_types(len(self.labels))
