"""Prometheus metrics of the predictor, served on ``/metrics`` next to KServe's own.

The rollout analysis reads these from each server (or from Prometheus in a cluster):
request outcomes and latency per protocol, predicted-label counts and confidence, so a
challenger can be compared with the champion on errors, p99 latency and behaviour.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
CONFIDENCE_BUCKETS = (0.34, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

MODEL_LABELS = ("model", "version")

REQUESTS = Counter(
    "roost_inference_requests_total",
    "Inference requests by protocol and outcome (ok, invalid: 4xx, error: 5xx).",
    [*MODEL_LABELS, "protocol", "outcome"],
)
LATENCY = Histogram(
    "roost_inference_seconds",
    "Inference request latency inside the model server (decode to encode).",
    [*MODEL_LABELS, "protocol"],
    buckets=LATENCY_BUCKETS,
)
PREDICTIONS = Counter(
    "roost_predictions_total", "Texts classified, by predicted label.", [*MODEL_LABELS, "label"]
)
CONFIDENCE = Histogram(
    "roost_prediction_confidence",
    "Probability of the predicted label per text.",
    MODEL_LABELS,
    buckets=CONFIDENCE_BUCKETS,
)
BATCH_SIZE = Histogram(
    "roost_batch_texts", "Texts per forward pass (after micro-batching).", MODEL_LABELS,
    buckets=BATCH_BUCKETS,
)  # fmt: skip
FORWARD_SECONDS = Histogram(
    "roost_forward_seconds", "Tokenise + forward time per batch.", MODEL_LABELS,
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
MODEL_INFO = Gauge(
    "roost_model_info", "The model this server loaded (value 1).", [*MODEL_LABELS, "alias", "uri"]
)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for each value, with one update per bucket instead of per value.

    prometheus_client has no bulk observe; this counts the values per bucket with numpy and
    adds the counts to the child's bucket and sum values (what ``observe`` itself updates).
    If those internals ever change, it falls back to one ``observe`` per value.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values.tolist():
            histogram.observe(value)
        return
    values = values[~np.isnan(values)]  # observe() counts a NaN in no bucket; skip it here
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))
    total.inc(float(values.sum()))
