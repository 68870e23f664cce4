"""The trained artefact: tokenizer + torch module + labels, saved as three plain files.

Layout of a classifier directory (inside an MLflow model it is ``artifacts/classifier/``)::

    classifier.json   format, architecture, hyper-parameters, labels
    vocab.json        tokenizer settings and vocabulary
    weights.pt        torch state_dict
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from roost.errors import ModelUnreadable, NotFound
from roost.model import NGramBag, build_model
from roost.tokenizer import Tokenizer

FORMAT = "roost-text-classifier/1"
MANIFEST = "classifier.json"
VOCAB = "vocab.json"
WEIGHTS = "weights.pt"


class TextClassifier:
    """Texts in, class probabilities out."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        module: NGramBag,
        labels: Sequence[str],
        arch: str,
        hparams: dict[str, Any],
    ) -> None:
        self.tokenizer = tokenizer
        self.module = module.eval()
        self.labels = list(labels)
        self.arch = arch
        self.hparams = dict(hparams)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def max_tokens(self) -> int:
        return self.tokenizer.max_tokens

    def forward_encoded(self, ids: torch.Tensor, offsets: torch.Tensor) -> np.ndarray:
        """Probabilities for an already-encoded batch (float32, shape [n, classes])."""
        with torch.inference_mode():
            logits = self.module(ids, offsets)
            return torch.softmax(logits.float(), dim=-1).numpy()

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        ids, offsets = self.tokenizer.encode(texts)
        return self.forward_encoded(ids, offsets)

    def predict(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """(labels, probabilities) for each text."""
        proba = self.predict_proba(texts)
        return [self.labels[i] for i in proba.argmax(axis=1)], proba

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "arch": self.arch,
            "hparams": self.hparams,
            "labels": self.labels,
            "vocab_size": self.tokenizer.size,
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
        (directory / VOCAB).write_text(json.dumps(self.tokenizer.to_dict()))
        torch.save(self.module.state_dict(), directory / WEIGHTS)
        return directory

    @classmethod
    def load(cls, directory: Path) -> TextClassifier:
        """Load from a classifier directory or any directory containing one (an MLflow model)."""
        root = find_classifier_dir(directory)
        try:
            manifest = json.loads((root / MANIFEST).read_text())
            tokenizer = Tokenizer.from_dict(json.loads((root / VOCAB).read_text()))
            module = build_model(
                manifest["arch"],
                vocab_size=int(manifest["vocab_size"]),
                num_classes=len(manifest["labels"]),
                **manifest["hparams"],
            )
            state = torch.load(root / WEIGHTS, map_location="cpu", weights_only=True)
            module.load_state_dict(state)
        except (
            OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError,
            pickle.UnpicklingError,
        ) as exc:  # fmt: skip
            # Truncated, corrupt or unreadable files: one line naming the directory, not a
            # traceback (torch's unpickling errors are RuntimeError/EOFError/ValueError).
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise ModelUnreadable(
                f"cannot load the classifier in {root}: {type(exc).__name__}"
                + (f": {detail}" if detail else "")
            ) from None
        return cls(tokenizer, module, manifest["labels"], manifest["arch"], manifest["hparams"])


def find_classifier_dir(directory: Path) -> Path:
    """The directory holding ``classifier.json``: ``directory`` itself or below it."""
    if (directory / MANIFEST).is_file():
        return directory
    for candidate in sorted(directory.rglob(MANIFEST)):
        return candidate.parent
    raise NotFound(f"no roost classifier ({MANIFEST}) under {directory}")
