"""Load the exported classifier as the batch kernel roost's predictor runs (no roost import).

Shared by the peer apps (MLServer runtime, BentoML service, PyTriton script): the same
files and the same code path as TorchServe's handler (``roost.bench.ts_handler``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import roost_kernel
import roost_model
import roost_tokenizer
import torch

MODEL_DIR_ENV = "ROOST_PEER_MODEL_DIR"
THREADS_ENV = "ROOST_PEER_THREADS"


def load(model_dir: str | Path | None = None) -> tuple[Any, list[str]]:
    """(kernel, labels) of the classifier in ``model_dir`` (default: $ROOST_PEER_MODEL_DIR)."""
    root = Path(model_dir or os.environ[MODEL_DIR_ENV])
    threads = os.environ.get(THREADS_ENV)
    if threads:
        torch.set_num_threads(int(threads))
    manifest = json.loads((root / "classifier.json").read_text())
    tokenizer = roost_tokenizer.Tokenizer.from_dict(json.loads((root / "vocab.json").read_text()))
    labels = list(manifest["labels"])
    module = roost_model.build_model(
        manifest["arch"],
        vocab_size=int(manifest["vocab_size"]),
        num_classes=len(labels),
        **manifest["hparams"],
    )
    module.load_state_dict(torch.load(root / "weights.pt", map_location="cpu", weights_only=True))
    kernel = roost_kernel.Kernel(
        module, roost_kernel.encoder_for(tokenizer, roost_tokenizer.TOKEN_RE), len(labels)
    )
    kernel.predict_proba(["warm-up"])
    return kernel, labels
