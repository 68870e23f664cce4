"""What the benchmark sends, and how it checks every answer.

Texts are a seeded sample of the corpus, so their lengths are the corpus's. The expected
answer of each text comes from the reference model in-process (``TextClassifier``); a
server's answer is right when its label is the reference label and its probabilities match
to ``PROB_ATOL``. torch's CPU kernels round differently with the batch a text lands in
(about 1e-7), so where the reference's top two probabilities are within ``TIE`` either
label counts as right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from roost import data
from roost.config import DataSettings
from roost.serving import codec

PROB_ATOL = 1e-4
TIE = 1e-4


def sample_texts(settings: DataSettings, n: int, seed: int) -> list[str]:
    """``n`` texts of the corpus (with replacement only if it is smaller), seeded."""
    frame = data.clean(
        data.read_table(data.resolve_uri(settings), settings.encoding),
        settings.text_column,
        settings.label_column,
        settings.dedupe,
    )
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(frame), size=n, replace=n > len(frame))
    texts: list[str] = frame[data.TEXT].iloc[picks].tolist()
    return texts


def text_stats(texts: Sequence[str]) -> dict[str, float]:
    lengths = np.array([len(t) for t in texts], dtype=np.float64)
    p50, p95 = np.percentile(lengths, [50, 95])
    return {
        "count": len(texts),
        "mean_chars": round(float(lengths.mean()), 1),
        "p50_chars": float(p50),
        "p95_chars": float(p95),
        "max_chars": float(lengths.max()),
    }


class Expected:
    """Reference answers: class names (column order) and probabilities [n, classes].

    Checks run in the load generator for every answer, so they are plain Python over
    precomputed rows (a numpy call per answer would cost the client more than the check).
    """

    def __init__(self, labels: list[str], proba: np.ndarray) -> None:
        self.labels = labels
        self.rows: list[list[float]] = proba.astype(np.float64).tolist()
        self.allowed: list[frozenset[str]] = [
            frozenset(labels[i] for i in np.flatnonzero(row >= row.max() - TIE)) for row in proba
        ]
        self.best: list[str] = [labels[i] for i in proba.argmax(axis=1).tolist()]

    def check(self, index: int, label: str, probs: Sequence[float] | None) -> str | None:
        """None if ``label`` (and ``probs``, in column order) answer text ``index``, else why."""
        i = index % len(self.rows)
        if label not in self.allowed[i]:
            return f"text {index}: label {label!r}, expected {self.best[i]!r}"
        if probs is not None:
            row = self.rows[i]
            if len(probs) != len(row):
                return f"text {index}: {len(probs)} probabilities, expected {len(row)}"
            if max(abs(a - b) for a, b in zip(probs, row, strict=True)) > PROB_ATOL:
                return f"text {index}: probabilities {list(probs)} != {row}"
        return None


# -- roost REST v2 --------------------------------------------------------------------------
def v2_bodies(texts: Sequence[str], per_request: int = 1) -> list[bytes]:
    """One REST v2 body per group of ``per_request`` consecutive texts."""
    last = len(texts) - per_request + 1
    groups = [texts[i : i + per_request] for i in range(0, last, per_request)]
    return [
        orjson.dumps(
            {"inputs": [{"name": codec.TEXT_INPUT, "datatype": "BYTES", "shape": [len(g)],
                         "data": list(g)}]}
        )
        for g in groups
    ]  # fmt: skip


def check_v2(expected: Expected, per_request: int, groups: int) -> Any:
    """An HTTP check for :func:`v2_bodies`: every label and probability row of the answer."""

    def check(status: int, body: bytes, index: int) -> str | None:
        try:
            outputs = {o["name"]: o["data"] for o in orjson.loads(body)["outputs"]}
            names, flat = outputs[codec.LABEL_OUTPUT], outputs[codec.PROBS_OUTPUT]
        except (ValueError, KeyError, TypeError) as exc:
            return f"unreadable answer ({exc!r}): {body[:120]!r}"
        if len(names) != per_request:
            return f"{len(names)} labels for {per_request} texts"
        k = len(flat) // per_request
        first = (index % groups) * per_request
        for j, name in enumerate(names):
            problem = expected.check(first + j, name, flat[j * k : (j + 1) * k])
            if problem:
                return problem
        return None

    return check


# -- roost gRPC -----------------------------------------------------------------------------
def grpc_requests(texts: Sequence[str], model_name: str) -> list[Any]:
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    return [
        pb.ModelInferRequest(
            model_name=model_name,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name=codec.TEXT_INPUT,
                    datatype="BYTES",
                    shape=[1],
                    contents=pb.InferTensorContents(bytes_contents=[t.encode()]),
                )
            ],
        )
        for t in texts
    ]


def check_grpc(expected: Expected) -> Any:
    def check(response: Any, index: int) -> str | None:
        outputs = {o.name: o for o in response.outputs}
        try:
            label = outputs[codec.LABEL_OUTPUT].contents.bytes_contents[0].decode()
            probs = list(outputs[codec.PROBS_OUTPUT].contents.fp32_contents)
        except (KeyError, IndexError) as exc:
            return f"unreadable answer ({exc!r})"
        return expected.check(index, label, probs)

    return check


# -- TorchServe REST ------------------------------------------------------------------------
def ts_bodies(texts: Sequence[str]) -> list[bytes]:
    return [orjson.dumps({"text": t}) for t in texts]


def check_ts(expected: Expected) -> Any:
    def check(status: int, body: bytes, index: int) -> str | None:
        try:
            answer = orjson.loads(body)
            label = answer["label"]
            probs = [answer["probabilities"][name] for name in expected.labels]
        except (ValueError, KeyError, TypeError) as exc:
            return f"unreadable answer ({exc!r}): {body[:120]!r}"
        return expected.check(index, label, probs)

    return check
