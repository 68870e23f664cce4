"""The reference profile: what normal traffic looks like, logged by ``roost train``.

Computed once at training time from data the run already has in memory (no second pass
later), and logged to the run as ``monitor/reference_profile.json``:

- the label distribution of the training split;
- on the validation split: the model's predicted-label distribution, its confidence
  histogram and mean confidence, the text-length deciles (characters) with the share of
  texts per bin, and the unseen-token rate (word tokens not in the vocabulary);
- the vocabulary's word tokens (unigrams), so that a report measures the unseen-token rate
  of live texts without loading the model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from roost.monitor import stats

if TYPE_CHECKING:
    import pandas as pd

    from roost.classifier import TextClassifier

PROFILE_ARTIFACT = "monitor/reference_profile.json"
CONFIDENCE_EDGES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
FORMAT = 1


@dataclass(frozen=True)
class Profile:
    labels: list[str]
    train_labels: dict[str, int]
    predicted: dict[str, int]
    confidence_edges: list[float]
    confidence_counts: list[int]
    mean_confidence: float
    length_edges: list[float]
    length_shares: list[float]
    length_quantiles: dict[str, float]
    unseen_token_rate: float
    vocabulary: list[str]
    texts: int
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Profile:
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})


def word_tokens(texts: Sequence[str]) -> list[list[str]]:
    """The tokenizer's word tokens (URLs and @users folded), as the model sees them."""
    from roost.tokenizer import Tokenizer

    words = Tokenizer({}, ngram=1)
    return [words.tokens(t) for t in texts]


def build(
    classifier: TextClassifier, train: pd.DataFrame, val: pd.DataFrame, text: str, label: str
) -> Profile:
    texts = val[text].tolist()
    proba = classifier.predict_proba(texts)
    labels = list(classifier.labels)
    predicted = Counter(labels[i] for i in proba.argmax(axis=1).tolist())
    confidence = proba.max(axis=1).tolist()
    lengths = [float(len(t)) for t in texts]
    edges = stats.quantile_edges(lengths)
    vocabulary = sorted(f for f in classifier.tokenizer.vocab if " " not in f)
    ordered = sorted(lengths)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0

    return Profile(
        labels=labels,
        train_labels={k: int(v) for k, v in Counter(train[label].tolist()).items()},
        predicted={k: predicted.get(k, 0) for k in labels},
        confidence_edges=list(CONFIDENCE_EDGES),
        confidence_counts=[
            round(s * len(confidence)) for s in stats.bin_shares(confidence, CONFIDENCE_EDGES)
        ],
        mean_confidence=sum(confidence) / len(confidence) if confidence else 0.0,
        length_edges=edges,
        length_shares=stats.bin_shares(lengths, edges),
        length_quantiles={"p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)},
        unseen_token_rate=stats.unseen_rate(set(vocabulary), word_tokens(texts)) or 0.0,
        vocabulary=vocabulary,
        texts=len(texts),
    )


def load(tracking_uri: str, run_id: str) -> Profile:
    """The profile a training run logged; NotFound if it has none (trained before monitoring)."""
    import json
    import tempfile

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from roost.errors import NotFound

    client = MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, PROFILE_ARTIFACT, tmp)
        except (MlflowException, OSError):
            raise NotFound(
                f"run {run_id} has no {PROFILE_ARTIFACT}: retrain the version with this roost"
            ) from None
        with open(path) as fh:
            return Profile.from_dict(json.load(fh))
