"""What a batch job is and what it decides, as pure functions (no I/O).

A job is fixed by its inputs (sorted file list), its model version, and the settings that
change the output (columns, chunk size, format). Its output layout::

    OUTPUT/_job.json                      the job's identity (a rerun must match it)
    OUTPUT/part-FFFFF-CCCCCC.FMT          scores of input file F, chunk C (rows C*R .. C*R+R-1)
    OUTPUT/errors/part-FFFFF-CCCCCC.FMT   that chunk's bad rows (only if it has any)
    OUTPUT/_chunks/FFFFF-CCCCCC.json      the chunk is finished (written after its files)
    OUTPUT/_shards/SSSSS.json             shard S is finished (its files' rows and digests)
    OUTPUT/_manifest.json, OUTPUT/_SUCCESS   written last, once every shard is finished

Chunk and file names depend only on the job, so a rerun after a crash writes the same
files with the same rows: finished chunks are skipped, a half-done chunk is written again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

JOB_FILE = "_job.json"
MANIFEST_FILE = "_manifest.json"
SUCCESS_FILE = "_SUCCESS"
CHUNKS_DIR = "_chunks"
SHARDS_DIR = "_shards"
ERRORS_DIR = "errors"

FORMATS = ("parquet", "csv", "jsonl")

# Reasons a row is not scored (the `reason` column of errors/).
MISSING = "missing text"
EMPTY = "empty text"
NON_STRING = "non-string text"
UNDECODABLE = "undecodable bytes"
INVALID_JSON = "invalid JSON line"


def input_format(uri: str) -> str:
    """parquet, csv or jsonl from a file name (compressed .gz/.bz2/.zst CSV and JSONL too)."""
    name = uri.lower()
    for suffix in (".gz", ".bz2", ".zst", ".lz4"):
        name = name.removesuffix(suffix)
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    return ""


@dataclass(frozen=True)
class JobSpec:
    """The identity of a job: two runs with equal specs write identical outputs."""

    inputs: tuple[str, ...]
    model_name: str
    model_version: str
    model_run_id: str
    text_column: str
    id_column: str | None
    chunk_rows: int
    format: str
    shards: int
    labels: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["inputs"] = list(self.inputs)
        out["labels"] = list(self.labels)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        return cls(**{**data, "inputs": tuple(data["inputs"]), "labels": tuple(data["labels"])})

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def differences(self, other: JobSpec) -> list[str]:
        """Names of the fields that differ (for a clear 'different job' error)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [key for key in mine if mine[key] != theirs.get(key)]


def shard_files(count: int, shards: int, index: int) -> list[int]:
    """Indices of the input files of shard ``index`` (round robin over sorted files)."""
    if not 0 <= index < shards:
        raise ValueError(f"shard index {index} is not in 0..{shards - 1}")
    return [i for i in range(count) if i % shards == index]


def chunk_key(file_index: int, chunk_index: int) -> str:
    return f"{file_index:05d}-{chunk_index:06d}"


def part_name(file_index: int, chunk_index: int, fmt: str) -> str:
    return f"part-{chunk_key(file_index, chunk_index)}.{fmt}"


def shard_name(index: int) -> str:
    return f"{index:05d}.json"


@dataclass
class ChunkRecord:
    """One finished chunk: what ``_chunks/KEY.json`` holds."""

    file_index: int
    chunk_index: int
    first_row: int
    rows: int
    errors: int
    output: str
    errors_output: str | None
    last: bool  # the file's last chunk

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChunkRecord:
        return cls(**data)


@dataclass
class FileResult:
    """One input file scored: rows, bad rows, output parts, and the file's digest."""

    uri: str
    digest: str
    size: int
    rows: int = 0
    errors: int = 0
    parts: list[str] = field(default_factory=list)
    error_parts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileResult:
        return cls(**data)


def file_result(uri: str, digest: str, size: int, chunks: Sequence[ChunkRecord]) -> FileResult:
    """Sum a file's finished chunks; they must be complete: 0..n-1, the last marked last."""
    ordered = sorted(chunks, key=lambda c: c.chunk_index)
    indices = [c.chunk_index for c in ordered]
    if indices != list(range(len(ordered))) or not ordered or not ordered[-1].last:
        raise ValueError(f"{uri}: chunks {indices} are not a complete run")
    result = FileResult(uri, digest, size)
    for chunk in ordered:
        result.rows += chunk.rows
        result.errors += chunk.errors
        result.parts.append(chunk.output)
        if chunk.errors_output:
            result.error_parts.append(chunk.errors_output)
    return result


def error_rate(rows: int, errors: int) -> float:
    return errors / rows if rows else 0.0


def too_many_errors(rows: int, errors: int, max_rate: float) -> bool:
    """The job fails only when bad rows are *above* the allowed share."""
    return error_rate(rows, errors) > max_rate


def classify(value: Any) -> tuple[str | None, str | None]:
    """(text, None) for a usable text, else (None, reason)."""
    if value is None:
        return None, MISSING
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, UNDECODABLE
    if not isinstance(value, str):
        return None, f"{NON_STRING} ({type(value).__name__})"
    if not value.strip():
        return None, EMPTY
    return value, None


def manifest(
    spec: JobSpec,
    output: str,
    files: Sequence[FileResult],
    max_error_rate: float,
) -> dict[str, Any]:
    """The ``_manifest.json`` document, from the job and its finished files (pure)."""
    rows = sum(f.rows for f in files)
    errors = sum(f.errors for f in files)
    return {
        "job": spec.to_dict(),
        "fingerprint": spec.fingerprint(),
        "output": output,
        "rows": rows,
        "scored": rows - errors,
        "errors": errors,
        "error_rate": round(error_rate(rows, errors), 6),
        "max_error_rate": max_error_rate,
        "files": [f.to_dict() for f in files],
        "parts": [p for f in files for p in f.parts],
        "error_parts": [p for f in files for p in f.error_parts],
        "columns": output_columns(spec.labels),
    }


def output_columns(labels: Sequence[str]) -> list[str]:
    """The columns of every output row, in order."""
    return [
        "id",
        "row",
        "label",
        "confidence",
        *(f"prob_{label}" for label in labels),
        "model_version",
        "model_run_id",
    ]


ERROR_COLUMNS = ["id", "row", "source", "reason"]
