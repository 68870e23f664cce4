"""The output of a batch job: a local directory or an s3:// prefix, written atomically.

Every file appears whole or not at all: a local file is written to ``NAME.tmp`` and renamed
(``roost.storage.write_bytes``), an S3 object is one PUT of the whole body (S3 shows an
object only once its PUT completes). Files are built in memory first; a chunk's output is
small (``chunk_rows`` rows of a few columns), so memory stays bounded.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from roost import storage
from roost.batch import plan
from roost.batch.sources import filesystem


class OutputStore:
    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.is_s3 = storage.is_s3(uri)
        self._fs, self._path = filesystem(self.uri)

    def join(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def write(self, name: str, data: bytes) -> str:
        uri = self.join(name)
        storage.write_bytes(uri, data)
        return uri

    def write_json(self, name: str, document: Any) -> str:
        return self.write(name, json.dumps(document, indent=2, sort_keys=True).encode() + b"\n")

    def read_json(self, name: str) -> Any | None:
        from roost.errors import NotFound

        try:
            return json.loads(storage.read_bytes(self.join(name)))
        except NotFound:
            return None

    def exists(self, name: str) -> bool:
        return storage.exists(self.join(name))

    def names(self, directory: str) -> list[str]:
        """File names directly under ``directory`` (none if it does not exist)."""
        from pyarrow import fs

        selector = fs.FileSelector(f"{self._path}/{directory}", allow_not_found=True)
        infos = self._fs.get_file_info(selector)
        return sorted(
            i.path.rsplit("/", 1)[-1]
            for i in infos
            if i.type == fs.FileType.File and not i.path.endswith(".tmp")
        )

    def is_empty(self) -> bool:
        from pyarrow import fs

        info = self._fs.get_file_info(self._path)
        if info.type == fs.FileType.File:
            return False
        if info.type == fs.FileType.NotFound:
            return True
        selector = fs.FileSelector(self._path, allow_not_found=True, recursive=False)
        return not self._fs.get_file_info(selector)


# -- encoding tables --------------------------------------------------------------------------


def scores_table(
    ids: Sequence[str],
    rows: Sequence[int],
    labels: Sequence[str],
    proba: np.ndarray,
    model_version: str,
    model_run_id: str,
) -> Any:
    """The output rows of one chunk as an Arrow table (columns: ``plan.output_columns``)."""
    import pyarrow as pa

    n = len(ids)
    best = proba.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    label_names = pa.array(list(labels), pa.string())
    columns: dict[str, Any] = {
        "id": pa.array(ids, pa.string()),
        "row": pa.array(rows, pa.int64()),
        "label": label_names.take(pa.array(best, pa.int64())),
        "confidence": pa.array(proba.max(axis=1).astype(np.float64) if n else [], pa.float64()),
    }
    for i, label in enumerate(labels):
        columns[f"prob_{label}"] = pa.array(proba[:, i].astype(np.float64), pa.float64())
    columns["model_version"] = pa.array([model_version] * n, pa.string())
    columns["model_run_id"] = pa.array([model_run_id] * n, pa.string())
    return pa.table(columns)


def errors_table(
    ids: Sequence[str], rows: Sequence[int], source: str, reasons: Sequence[str]
) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "row": pa.array(rows, pa.int64()),
            "source": pa.array([source] * len(ids), pa.string()),
            "reason": pa.array(reasons, pa.string()),
        }
    )


def encode(table: Any, fmt: str) -> bytes:
    """An Arrow table as the bytes of a Parquet, CSV or JSON-lines file."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        return bytes(sink.getvalue().to_pybytes())
    if fmt == "csv":
        import pyarrow.csv as pacsv

        buffer = io.BytesIO()
        pacsv.write_csv(table, buffer)
        return buffer.getvalue()
    if fmt == "jsonl":
        import orjson

        return b"".join(
            orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY)
            for row in table.to_pylist()
        )
    raise ValueError(f"unknown output format {fmt!r}; known: {', '.join(plan.FORMATS)}")
