"""Model shapes and the classifier artefact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from roost.classifier import TextClassifier, find_classifier_dir
from roost.errors import NotFound
from roost.model import NGramBag, build_model, parameter_count
from roost.tokenizer import Tokenizer

pytestmark = pytest.mark.unit


def test_ngram_bag_shapes() -> None:
    model = build_model("ngram", vocab_size=50, num_classes=3, embed_dim=8, dropout=0.0)
    ids = torch.tensor([1, 2, 3, 4, 5])
    offsets = torch.tensor([0, 2])
    assert model(ids, offsets).shape == (2, 3)
    assert parameter_count(model) == 50 * 8 + 8 * 3 + 3
    assert model.embedding.sparse


def test_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'lstm'"):
        build_model("lstm", vocab_size=5, num_classes=2)


def classifier() -> TextClassifier:
    torch.manual_seed(0)
    tok = Tokenizer.fit(["good movie", "bad movie", "fine day"], min_count=1)
    module = NGramBag(tok.size, 3, embed_dim=8, dropout=0.0)
    return TextClassifier(
        tok, module, ["negative", "neutral", "positive"], "ngram", {"embed_dim": 8, "dropout": 0.0}
    )


def test_predict_proba_rows_sum_to_one() -> None:
    proba = classifier().predict_proba(["good movie", "unseen words only", "x" * 20_000])
    assert proba.shape == (3, 3) and proba.dtype == np.float32
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert classifier().predict_proba([]).shape == (0, 3)


def test_save_load_round_trip(tmp_path: Path) -> None:
    original = classifier()
    original.save(tmp_path / "model" / "artifacts" / "classifier")
    loaded = TextClassifier.load(tmp_path / "model")  # finds classifier.json below
    texts = ["good movie", "bad day"]
    assert np.allclose(original.predict_proba(texts), loaded.predict_proba(texts))
    assert loaded.labels == original.labels


def test_find_classifier_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no roost classifier"):
        find_classifier_dir(tmp_path)
