"""The KServe predictor: a ``kserve.Model`` serving roost's text classifier."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import kserve
import numpy as np
import torch
from kserve.errors import InvalidInput
from kserve.model import InferenceVerb

from roost import proc, registry
from roost.classifier import TextClassifier
from roost.config import Settings
from roost.serving import codec, metrics
from roost.serving.batching import MicroBatcher

log = logging.getLogger(__name__)

VERSION_HEADER = "x-roost-model-version"
ALIAS_HEADER = "x-roost-model-alias"
WARMUP_TEXT = "warm-up: the quick brown fox jumps over the lazy dog"


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
        self.forward_cost_ms: dict[int, float] = {}
        self.ready = False

    # -- lifecycle -------------------------------------------------------------------------
    def load(self) -> bool:
        cfg = self.settings.serving
        started = time.perf_counter()
        local = registry.fetch_model(self.settings, self.model_uri)
        self.version = self.version or local.version
        self.alias = self.alias or local.alias
        torch.set_num_threads(cfg.intra_op_threads or proc.cpu_limit())
        self.classifier = TextClassifier.load(local.path)
        self.forward_cost_ms = self._warm_up(self.classifier, cfg.max_batch_size)
        labels = self._labels()
        self.batcher = MicroBatcher(
            self.classifier.predict_proba,
            max_batch_size=cfg.max_batch_size,
            max_wait_s=cfg.max_batch_wait_ms / 1000.0,
            on_batch=lambda requests, texts, seconds: (
                metrics.BATCH_SIZE.labels(**labels).observe(texts),
                metrics.FORWARD_SECONDS.labels(**labels).observe(seconds),
            ),
        )
        metrics.MODEL_INFO.labels(**labels, alias=self.alias or "", uri=self.model_uri).set(1)
        log.info(
            "model loaded name=%s version=%s alias=%s seconds=%.2f forward_ms=%s",
            self.name, self.version, self.alias, time.perf_counter() - started,
            self.forward_cost_ms,
        )  # fmt: skip
        self.ready = True
        return self.ready

    @staticmethod
    def _warm_up(classifier: TextClassifier, max_batch_size: int) -> dict[int, float]:
        """Run the model once per batch size class; returns the forward cost (ms) of each."""
        costs = {}
        for size in sorted({1, min(8, max_batch_size), max_batch_size}):
            texts = [WARMUP_TEXT] * size
            classifier.predict_proba(texts)  # first call pays allocation
            start = time.perf_counter()
            classifier.predict_proba(texts)
            costs[size] = round((time.perf_counter() - start) * 1000, 3)
        return costs

    def _labels(self) -> dict[str, str]:
        return {"model": self.name, "version": self.version or "unknown"}

    # -- request path ----------------------------------------------------------------------
    async def __call__(
        self,
        body: Any,
        headers: dict[str, str] | None = None,
        verb: InferenceVerb = InferenceVerb.PREDICT,
    ) -> Any:
        protocol = codec.protocol_of(body).value
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
        return codec.decode(payload)

    async def predict(
        self,
        payload: codec.Decoded,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> tuple[codec.Decoded, np.ndarray]:
        assert self.batcher is not None
        proba = await self.batcher.submit(payload.texts)
        return payload, proba

    def postprocess(
        self,
        result: tuple[codec.Decoded, np.ndarray],
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> Any:
        assert self.classifier is not None
        decoded, proba = result
        names = self._names(proba)
        self._observe(names, proba)
        if response_headers is not None:
            response_headers[VERSION_HEADER] = self.version or "unknown"
            if self.alias:
                response_headers[ALIAS_HEADER] = self.alias
        if decoded.protocol is codec.Protocol.REST_V1:
            return codec.encode_v1(self.classifier.labels, names, proba)
        return codec.encode_v2(
            decoded, self.name, self.version, self.classifier.labels, names, proba
        )

    def _names(self, proba: np.ndarray) -> list[str]:
        assert self.classifier is not None
        labels = self.classifier.labels
        return [labels[i] for i in proba.argmax(axis=1)]

    def _observe(self, names: Sequence[str], proba: np.ndarray) -> None:
        labels = self._labels()
        for name, count in Counter(names).items():
            metrics.PREDICTIONS.labels(**labels, label=name).inc(count)
        confidence = metrics.CONFIDENCE.labels(**labels)
        for value in proba.max(axis=1):
            confidence.observe(float(value))

    # -- metadata --------------------------------------------------------------------------
    def get_input_types(self) -> list[dict[str, Any]]:
        return codec.input_types()

    def get_output_types(self) -> list[dict[str, Any]]:
        assert self.classifier is not None
        return codec.output_types(self.classifier.num_classes)
