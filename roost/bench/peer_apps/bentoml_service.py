"""BentoML service around the batch kernel, with BentoML's adaptive batching.

``POST /classify`` with ``{"texts": [...]}`` answers ``[[p0, p1, ...], ...]`` (one row of
class probabilities per text, in the classifier's label order). ``batchable=True`` lets
BentoML merge concurrent calls along the first axis (up to ``max_batch_size`` texts; calls
that cannot finish within ``max_latency_ms`` are refused with 503), its documented way to
raise throughput. ``ROOST_PEER_BATCHING=off`` declares the same API without it (each call
runs alone in BentoML's thread pool): the bench tries both and reports the better.
"""

from __future__ import annotations

import os

import bentoml
import roost_peer

MAX_BATCH = int(os.environ.get("ROOST_PEER_MAX_BATCH", "64"))
MAX_LATENCY_MS = int(os.environ.get("ROOST_PEER_MAX_LATENCY_MS", "60000"))
WORKERS = int(os.environ.get("ROOST_PEER_WORKERS", "1"))
BATCHING = os.environ.get("ROOST_PEER_BATCHING", "adaptive") != "off"


# Access log off: roost, TorchServe and the other servers run without one (warnings only).
@bentoml.service(workers=WORKERS, traffic={"timeout": 30}, logging={"access": {"enabled": False}})
class Classifier:
    def __init__(self) -> None:
        self.kernel, self.labels = roost_peer.load()

    def _rows(self, texts: list[str]) -> list[list[float]]:
        rows: list[list[float]] = self.kernel.predict_proba(texts).tolist()
        return rows

    # BentoML names an API after its function: both variants are `classify`.
    if BATCHING:

        @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)  # type: ignore[untyped-decorator]
        def classify(self, texts: list[str]) -> list[list[float]]:
            return self._rows(texts)

    else:

        @bentoml.api  # type: ignore[untyped-decorator]
        def classify(self, texts: list[str]) -> list[list[float]]:
            return self._rows(texts)
