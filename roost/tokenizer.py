"""Word n-gram tokenizer with a fitted vocabulary, encoding whole batches for EmbeddingBag."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch

# URLs, @mentions, words (with an optional leading '#', inner apostrophes), single punctuation.
TOKEN_RE = re.compile(r"https?://\S+|www\.\S+|@\w+|#?\w+(?:'\w+)*|[^\w\s]")
UNK = 0  # id 0: texts with no known feature


class Tokenizer:
    """Lower-cased word tokens plus word n-grams up to ``ngram``, mapped through a vocabulary."""

    def __init__(self, vocab: dict[str, int], ngram: int = 2, max_tokens: int = 256) -> None:
        self.vocab = vocab
        self.ngram = ngram
        self.max_tokens = max_tokens
        # Cut long texts before the regex: max_tokens tokens never need more characters.
        self.max_chars = max_tokens * 32

    @property
    def size(self) -> int:
        """Embedding rows needed: vocabulary ids plus the UNK row."""
        return len(self.vocab) + 1

    def tokens(self, text: str) -> list[str]:
        out = []
        for tok in TOKEN_RE.findall(text[: self.max_chars].lower()):
            if tok.startswith(("http://", "https://", "www.")):
                tok = "<url>"
            elif tok.startswith("@"):
                tok = "<user>"
            out.append(tok)
            if len(out) == self.max_tokens:
                break
        return out

    def features(self, text: str) -> list[str]:
        words = self.tokens(text)
        feats = list(words)
        for n in range(2, self.ngram + 1):
            feats.extend(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
        return feats

    def ids(self, text: str) -> list[int]:
        vocab = self.vocab
        found = [vocab[f] for f in self.features(text) if f in vocab]
        return found or [UNK]

    def encode_ids(self, id_lists: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flatten per-text id lists into EmbeddingBag (input, offsets)."""
        offsets = [0]
        for ids in id_lists[:-1]:
            offsets.append(offsets[-1] + len(ids))
        flat = [i for ids in id_lists for i in ids]
        return torch.tensor(flat, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over a batch of texts -> (ids, offsets) for EmbeddingBag."""
        return self.encode_ids([self.ids(t) for t in texts])

    @classmethod
    def fit(
        cls,
        texts: Iterable[str],
        ngram: int = 2,
        min_count: int = 2,
        max_vocab: int = 200_000,
        max_tokens: int = 256,
    ) -> Tokenizer:
        probe = cls({}, ngram=ngram, max_tokens=max_tokens)
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(probe.features(text))
        # Most frequent first; ties broken by the string so the vocabulary is deterministic.
        ranked = sorted(
            (item for item in counts.items() if item[1] >= min_count),
            key=lambda kv: (-kv[1], kv[0]),
        )[:max_vocab]
        return cls({tok: i + 1 for i, (tok, _) in enumerate(ranked)}, ngram, max_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "word-ngram",
            "ngram": self.ngram,
            "max_tokens": self.max_tokens,
            "vocab": self.vocab,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tokenizer:
        return cls(dict(data["vocab"]), int(data["ngram"]), int(data["max_tokens"]))
