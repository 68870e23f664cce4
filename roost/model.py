"""The sentiment model architectures (torch ``nn.Module``s) and their factory."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class NGramBag(nn.Module):
    """Mean of word n-gram embeddings -> dropout -> linear: fastText-style and fast on CPU.

    ``sparse=True`` embeddings keep each step's update to the rows a batch touches.
    """

    def __init__(
        self, vocab_size: int, num_classes: int, embed_dim: int = 64, dropout: float = 0.3
    ) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, embed_dim, mode="mean", sparse=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.dropout(self.embedding(ids, offsets)))
        return logits

    def sparse_parameters(self) -> list[nn.Parameter]:
        return list(self.embedding.parameters())

    def dense_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())


ARCHITECTURES: dict[str, type[NGramBag]] = {"ngram": NGramBag}


def build_model(arch: str, vocab_size: int, num_classes: int, **hparams: Any) -> NGramBag:
    """Build architecture ``arch`` (see ``ARCHITECTURES``) with its hyper-parameters."""
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}") from None
    return cls(vocab_size=vocab_size, num_classes=num_classes, **hparams)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
