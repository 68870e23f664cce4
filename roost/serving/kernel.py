"""The predictor's compute kernel: a batch of texts in, class probabilities out, in one call.

:class:`BatchEncoder` produces exactly the ``(ids, offsets)`` of
:meth:`roost.tokenizer.Tokenizer.encode` with less Python per text: one ``findall`` per
text, URL/user mapping only for texts that can hold one, n-grams built with ``zip``,
vocabulary lookups through ``map(dict.get)``, and the whole batch flattened with numpy.
:class:`Kernel` runs the encoder and the torch module under ``inference_mode``.

This module imports only the standard library, numpy and torch: the TorchServe export
ships it inside the model archive, so both servers in ``roost bench`` run the same code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from itertools import chain, pairwise
from typing import Any

import numpy as np
import torch

URL_PREFIXES = ("http://", "https://", "www.")
URL_TOKEN = "<url>"
USER_TOKEN = "<user>"
UNK = 0


class BatchEncoder:
    """Texts -> EmbeddingBag ``(ids, offsets)``; the same result as the reference tokenizer.

    ``token_re`` is the tokenizer's own pattern (``roost.tokenizer.TOKEN_RE``), passed in so
    that this module stays free of roost imports.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        ngram: int,
        max_tokens: int,
        max_chars: int,
        token_re: re.Pattern[str],
    ) -> None:
        self.vocab = vocab
        self.ngram = ngram
        self.max_tokens = max_tokens
        self.max_chars = max_chars
        self._findall = token_re.findall
        # map(vocab.get) + filter(None) drops misses; it would also drop an id 0, so an
        # (unusual) vocabulary that uses id 0 takes the explicit comparison instead.
        self._filter_none = all(i != 0 for i in vocab.values())

    def ids(self, text: str) -> list[int]:
        lowered = text[: self.max_chars].lower()
        words: list[str] = self._findall(lowered)
        if len(words) > self.max_tokens:
            del words[self.max_tokens :]
        if "@" in lowered or "://" in lowered or "www." in lowered:
            words = [
                USER_TOKEN if w[0] == "@" else URL_TOKEN if w.startswith(URL_PREFIXES) else w
                for w in words
            ]
        feats = words
        if self.ngram >= 2 and len(words) > 1:
            feats = words + [a + " " + b for a, b in pairwise(words)]
            for n in range(3, self.ngram + 1):
                feats += map(" ".join, zip(*(words[k:] for k in range(n)), strict=False))
        get = self.vocab.get
        if self._filter_none:
            found: list[int] = list(filter(None, map(get, feats)))
        else:
            found = [i for i in map(get, feats) if i is not None]
        return found or [UNK]

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch -> (flat ids, start offsets), int64 tensors."""
        lists = [self.ids(t) for t in texts]
        count = len(lists)
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=count)
        offsets = np.zeros(count, dtype=np.int64)
        if count > 1:
            np.cumsum(lengths[:-1], out=offsets[1:])
        flat = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=int(lengths.sum()))
        return torch.from_numpy(flat), torch.from_numpy(offsets)


class Kernel:
    """``predict_proba(texts)`` for a module taking EmbeddingBag ``(ids, offsets)``."""

    def __init__(self, module: torch.nn.Module, encoder: BatchEncoder, num_classes: int) -> None:
        self.module = module.eval()
        self.encoder = encoder
        self.num_classes = num_classes

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """float32 probabilities, shape ``[len(texts), num_classes]``."""
        if not texts:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        ids, offsets = self.encoder.encode(texts)
        with torch.inference_mode():
            logits = self.module(ids, offsets)
            proba: np.ndarray = torch.softmax(logits.float(), dim=-1).numpy()
        return proba


def encoder_for(tokenizer: Any, token_re: re.Pattern[str]) -> BatchEncoder:
    """A :class:`BatchEncoder` with a ``roost.tokenizer.Tokenizer``'s vocabulary and limits."""
    return BatchEncoder(
        tokenizer.vocab, tokenizer.ngram, tokenizer.max_tokens, tokenizer.max_chars, token_re
    )
