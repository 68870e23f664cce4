"""Training on CUDA with mixed precision (runs where a GPU exists; skips elsewhere)."""

from __future__ import annotations

import pytest
import torch

from roost.config import ModelSettings, TrainSettings
from roost.train import evaluate, fit
from tests.unit.test_train import splits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


def test_fit_on_cuda_with_amp() -> None:
    s = splits()
    result = fit(
        s,
        ModelSettings(embed_dim=16, min_count=1, dropout=0.1),
        TrainSettings(epochs=8, lr=0.05, patience=8, device="cuda", amp=True),
    )
    assert result.device.startswith("cuda")
    assert next(result.classifier.module.parameters()).device.type == "cpu"  # returned for serving
    assert evaluate(result.classifier, s.test).accuracy > 0.9
