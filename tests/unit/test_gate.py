"""The promotion gate's decisions (a pure function)."""

from __future__ import annotations

import pytest

from roost.errors import NotFound
from roost.registry import decide, parse_models_uri

pytestmark = pytest.mark.unit


def test_first_version_passes() -> None:
    d = decide("macro_f1", 0.61, None, None, 0.01)
    assert d.passed and "no champion" in d.reason
    assert d.tags()["roost.gate.champion_score"] == "none"


def test_better_candidate_passes() -> None:
    d = decide("macro_f1", 0.75, 0.72, "3", 0.01)
    assert d.passed
    assert d.tags()["roost.gate.decision"] == "passed"
    assert "champion v3" in d.reason and "+0.0300" in d.reason


def test_equal_score_passes_with_zero_min_improvement() -> None:
    assert decide("accuracy", 0.7, 0.7, "1", 0.0).passed


def test_not_enough_improvement_is_refused() -> None:
    d = decide("macro_f1", 0.725, 0.72, "2", 0.01)
    assert not d.passed
    tags = d.tags()
    assert tags["roost.gate.decision"] == "refused"
    assert tags["roost.gate.candidate_score"] == "0.725000"
    assert tags["roost.gate.champion_score"] == "0.720000"
    assert tags["roost.gate.champion_version"] == "2"
    assert "<" in tags["roost.gate.reason"]


def test_worse_candidate_is_refused() -> None:
    assert not decide("accuracy", 0.6, 0.7, "1", -0.05).passed
    assert decide("accuracy", 0.66, 0.7, "1", -0.05).passed  # tolerance allowed


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/sentiment@champion", ("sentiment", None, "champion")),
        ("models:/sentiment/4", ("sentiment", "4", None)),
    ],
)
def test_parse_models_uri(uri: str, expected: tuple) -> None:
    assert parse_models_uri(uri) == expected


@pytest.mark.parametrize("uri", ["models:/sentiment", "models:/@x", "models:/a/"])
def test_parse_models_uri_malformed(uri: str) -> None:
    with pytest.raises(NotFound, match="malformed model URI"):
        parse_models_uri(uri)
