"""The training loop: learning, early stopping, checkpoint resume (no MLflow here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from roost import data
from roost.config import ModelSettings, TrainSettings
from roost.train import Checkpointer, EpochStats, evaluate, fit

pytestmark = pytest.mark.unit

WORDS = {"positive": "great lovely", "negative": "awful broken", "neutral": "tuesday schedule"}


def splits(n: int = 60) -> data.Splits:
    rng = np.random.default_rng(0)
    rows = []
    for label, cue in WORDS.items():
        for i in range(n):
            filler = " ".join(rng.choice(["the", "a", "flight", "phone", "today"], size=3))
            rows.append({data.TEXT: f"{filler} {cue} {i}", data.LABEL: label})
    frame = pd.DataFrame(rows)
    train, val, test = data.stratified_split(frame, 0.2, 0.2, seed=0)
    return data.Splits(train, val, test, sorted(WORDS), "synthetic")


MODEL = ModelSettings(embed_dim=16, min_count=1, dropout=0.1)


def test_fit_learns_separable_classes() -> None:
    s = splits()
    result = fit(s, MODEL, TrainSettings(epochs=8, lr=0.05, patience=8))
    report = evaluate(result.classifier, s.test)
    assert report.accuracy > 0.9
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.device == "cpu"


def test_early_stopping_stops_after_patience_bad_epochs() -> None:
    result = fit(splits(), MODEL, TrainSettings(epochs=40, lr=0.3, patience=1))
    assert len(result.history) < 40
    assert not result.history[-1].improved
    assert result.best_epoch == max(h.epoch for h in result.history if h.improved)


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    s = splits()
    cfg = TrainSettings(epochs=4, lr=0.05, patience=10, seed=1)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), fingerprint="abc")

    def save(stats: EpochStats, payload: dict[str, Any]) -> None:
        ckpt.save({**payload, "run_id": "r1"})

    # "Killed" after 2 epochs: run only 2, saving a checkpoint after each.
    fit(s, MODEL, cfg.model_copy(update={"epochs": 2}), on_epoch=save)
    resume = ckpt.load()
    assert resume is not None and resume["epoch"] == 2 and resume["run_id"] == "r1"

    resumed = fit(s, MODEL, cfg, resume=resume)
    straight = fit(s, MODEL, cfg)

    assert resumed.resumed_from == 2
    assert [h.epoch for h in resumed.history] == [1, 2, 3, 4]
    texts = s.test[data.TEXT].tolist()
    assert np.allclose(
        resumed.classifier.predict_proba(texts), straight.classifier.predict_proba(texts), atol=1e-5
    )


def test_checkpoint_with_other_config_is_ignored(tmp_path: Path) -> None:
    Checkpointer(str(tmp_path), "one").save({"epoch": 1})
    assert Checkpointer(str(tmp_path), "two").load() is None
    assert Checkpointer(str(tmp_path / "empty"), "one").load() is None
