"""Tokenisation, vocabulary and batch encoding."""

from __future__ import annotations

import pytest
import torch

from roost.tokenizer import UNK, Tokenizer

pytestmark = pytest.mark.unit


def test_tokens_normalise_urls_mentions_and_case() -> None:
    tok = Tokenizer({}, ngram=2)
    assert tok.tokens("@united Great flight!! http://t.co/x #Travel don't") == [
        "<user>", "great", "flight", "!", "!", "<url>", "#travel", "don't",
    ]  # fmt: skip


def test_features_include_bigrams() -> None:
    tok = Tokenizer({}, ngram=2)
    assert tok.features("good movie") == ["good", "movie", "good movie"]


def test_long_text_is_truncated_to_max_tokens() -> None:
    tok = Tokenizer({"word": 1, "word word": 2}, ngram=2, max_tokens=16)
    text = "word " * 20_000
    assert len(tok.tokens(text)) == 16
    ids, offsets = tok.encode([text])
    assert len(ids) == 16 + 15 and offsets.tolist() == [0]


def test_fit_is_deterministic_and_respects_min_count() -> None:
    texts = ["good movie", "good film", "bad movie", "good movie"]
    a = Tokenizer.fit(texts, ngram=2, min_count=2)
    b = Tokenizer.fit(list(reversed(texts)), ngram=2, min_count=2)
    assert a.vocab == b.vocab
    assert set(a.vocab) == {"good", "movie", "good movie"}
    assert a.vocab["good"] == 1  # most frequent first


def test_encode_batch_offsets_and_unknown() -> None:
    tok = Tokenizer({"good": 1, "movie": 2, "good movie": 3}, ngram=2)
    ids, offsets = tok.encode(["good movie", "zzz", "movie"])
    assert ids.dtype == torch.long
    assert ids.tolist() == [1, 2, 3, UNK, 2]
    assert offsets.tolist() == [0, 3, 4]


def test_round_trip() -> None:
    tok = Tokenizer.fit(["a b", "a b"], ngram=2, min_count=1, max_tokens=8)
    again = Tokenizer.from_dict(tok.to_dict())
    assert again.vocab == tok.vocab and again.max_tokens == 8 and again.ngram == 2
