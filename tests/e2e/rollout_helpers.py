"""Real model versions for rollout tests: a copy of the champion, one that errors, one skewed.

Each is a real roost classifier logged with ``roost.pyfunc.log_model`` in an MLflow run
(with the ``roost.model_uri`` tag and the test split, as ``roost.train`` logs them) and
registered as a new version. Nothing is a server flag: the servers load them like any model.

- :func:`register_erroring`: the embedding matrix is cut to its first rows (and the manifest's
  ``vocab_size`` with it) while the tokenizer keeps the full vocabulary, so texts that
  contain rarer words index past the matrix: ``IndexError`` inside ``forward`` -> HTTP 500 for
  those inputs only (a realistic vocabulary/weights mismatch).
- :func:`register_skewed`: a large bias on one class in the linear head, so nearly every
  prediction is that class (confidently).
- :func:`register_flipping`: the rarer tokens' embeddings point hard at one class, so the
  texts that contain one (about ``fraction`` of them) get that label; the others keep the
  champion's answer exactly (a label flip on a fraction of inputs, for shadow tests).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from roost import registry, tracking
from roost.classifier import MANIFEST, TextClassifier
from roost.config import Settings
from roost.model import build_model
from roost.train import MODEL_URI_TAG, TEST_SPLIT_ARTIFACT

EXPERIMENT = "rollout-test-models"


@dataclass(frozen=True)
class Source:
    """Where the models come from: the champion's classifier and its test texts."""

    classifier: TextClassifier
    test: pd.DataFrame

    @property
    def texts(self) -> list[str]:
        return [str(t) for t in self.test["text"].tolist()]


def load_source(settings: Settings, model_uri: str, run_id: str) -> Source:
    tracking.use(settings)
    local = registry.fetch_model(settings, model_uri)
    reg = registry.Registry(tracking.use(settings), settings.registry.model_name)
    return Source(TextClassifier.load(local.path), reg.test_split(run_id))


class _Truncated(TextClassifier):
    """A classifier whose saved manifest declares fewer embedding rows than the vocabulary."""

    rows: int = 0

    def save(self, directory: Path) -> Path:
        out = super().save(directory)
        manifest = json.loads((out / MANIFEST).read_text())
        manifest["vocab_size"] = self.rows
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return out


def _log_and_register(
    settings: Settings,
    classifier: TextClassifier,
    test: pd.DataFrame,
    examples: list[str],
    kind: str,
) -> str:
    import mlflow

    from roost import pyfunc

    uri = tracking.use(settings)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"rollout-test-{kind}") as run:
        mlflow.set_tags({"roost.kind": "rollout-test-model", "roost.variant": kind})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(TEST_SPLIT_ARTIFACT).name
            test.to_parquet(path, index=False)
            mlflow.log_artifact(str(path), str(Path(TEST_SPLIT_ARTIFACT).parent))
        info = pyfunc.log_model(classifier, examples)
        mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
    reg = registry.Registry(uri, settings.registry.model_name)
    return reg.register(
        info.model_uri, tags={"roost.source_run": run.info.run_id, "roost.variant": kind}
    )


def register_copy(settings: Settings, source: Source) -> str:
    """The champion's weights as a new version (a good challenger)."""
    return _log_and_register(settings, source.classifier, source.test, source.texts[:3], "copy")


def max_ids(classifier: TextClassifier, texts: list[str]) -> np.ndarray:
    return np.array([max(classifier.tokenizer.ids(t)) for t in texts])


def register_erroring(
    settings: Settings, source: Source, fail_fraction: float = 0.3
) -> tuple[str, int]:
    """A version whose forward raises IndexError for about ``fail_fraction`` of the test texts.

    Returns (version, rows kept).
    """
    champion = source.classifier
    highest = max_ids(champion, source.texts)
    rows = int(np.quantile(highest, 1.0 - fail_fraction)) + 1
    module = build_model(
        champion.arch, vocab_size=rows, num_classes=champion.num_classes, **champion.hparams
    )
    state = {k: v.clone() for k, v in champion.module.state_dict().items()}
    state["embedding.weight"] = state["embedding.weight"][:rows].clone()
    module.load_state_dict(state)
    broken = _Truncated(
        champion.tokenizer, module, champion.labels, champion.arch, champion.hparams
    )
    broken.rows = rows
    safe = [t for t, m in zip(source.texts, highest, strict=True) if m < rows][:3]
    return _log_and_register(settings, broken, source.test, safe, "erroring"), rows


def register_skewed(
    settings: Settings, source: Source, label: str | None = None, bias: float = 50.0
) -> str:
    """A version predicting ``label`` (default: the rarest predicted class) for nearly all texts."""
    champion = source.classifier
    if label is None:
        names, _ = champion.predict(source.texts)
        counts = pd.Series(names).value_counts()
        label = (
            str(counts.index[-1])
            if len(counts) == len(champion.labels)
            else next(lbl for lbl in champion.labels if lbl not in set(names))
        )
    module = build_model(
        champion.arch, vocab_size=champion.tokenizer.size, num_classes=champion.num_classes,
        **champion.hparams,
    )  # fmt: skip
    state = {k: v.clone() for k, v in champion.module.state_dict().items()}
    with torch.no_grad():
        state["head.bias"][champion.labels.index(label)] += bias
    module.load_state_dict(state)
    skewed = TextClassifier(
        champion.tokenizer, module, champion.labels, champion.arch, champion.hparams
    )
    return _log_and_register(settings, skewed, source.test, source.texts[:3], "skewed")


def register_flipping(
    settings: Settings, source: Source, fraction: float = 0.3
) -> tuple[str, TextClassifier]:
    """A version that answers one class for the ~``fraction`` of texts holding a rarer token.

    Returns (version, the classifier) so a test can compute the expected disagreement.
    """
    champion = source.classifier
    highest = max_ids(champion, source.texts)
    rare = int(np.quantile(highest, 1.0 - fraction)) + 1
    names, _ = champion.predict(source.texts)
    target = pd.Series(names).value_counts().index[-1]  # the rarest answer: most texts flip
    state = {k: v.clone() for k, v in champion.module.state_dict().items()}
    with torch.no_grad():
        head = state["head.weight"]
        direction = head[champion.labels.index(str(target))] - head.mean(dim=0)
        state["embedding.weight"][rare:] = 1e3 * direction / direction.norm()
    module = build_model(
        champion.arch, vocab_size=champion.tokenizer.size, num_classes=champion.num_classes,
        **champion.hparams,
    )  # fmt: skip
    module.load_state_dict(state)
    flipping = TextClassifier(
        champion.tokenizer, module, champion.labels, champion.arch, champion.hparams
    )
    safe = [t for t, m in zip(source.texts, highest, strict=True) if m < rare][:3]
    version = _log_and_register(settings, flipping, source.test, safe, "flipping")
    return version, flipping
