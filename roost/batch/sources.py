"""Input files of a batch job, local or on S3, read chunk by chunk with bounded memory.

Files are found and opened through ``pyarrow.fs`` (``S3FileSystem`` with the endpoint
override that roost uses everywhere: ``AWS_ENDPOINT_URL`` or ``MLFLOW_S3_ENDPOINT_URL``).
Each format is read as a stream of record batches and cut into chunks of exactly
``chunk_rows`` rows, so chunk ``k`` of a file is always its rows ``k*R .. k*R+R-1``:

* Parquet: ``ParquetFile.iter_batches`` over the two columns (one row group at a time);
* CSV: pyarrow's streaming CSV reader, the text column read as bytes so that undecodable
  bytes become a bad row instead of failing the whole file;
* JSON lines: parsed line by line with orjson (a malformed or undecodable line is a bad
  row; pyarrow's JSON reader would fail the whole block).
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from roost import config
from roost.batch import plan
from roost.errors import DataError, NotFound, Unavailable

CSV_BLOCK_BYTES = 1 << 20
JSONL_READ_BYTES = 1 << 20
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class InputFile:
    uri: str
    path: str  # the path pyarrow.fs takes (bucket/key on S3)
    size: int
    format: str


@dataclass
class RawChunk:
    """Rows ``first_row ..`` of one file: ids and raw text values, before validation."""

    chunk_index: int
    first_row: int
    ids: list[Any]
    values: list[Any]
    # Per-row reason found while parsing (a malformed JSON line), else None.
    parse_errors: list[str | None] | None = None


# -- file systems -----------------------------------------------------------------------------


def s3_endpoint() -> str | None:
    return config.environ("AWS_ENDPOINT_URL") or config.environ("MLFLOW_S3_ENDPOINT_URL")


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow FileSystem, path on it) for a local path or an s3:// URI."""
    from pyarrow import fs

    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise DataError(f"not an s3://bucket/key URI: {uri}")
        kwargs: dict[str, Any] = {
            "region": config.environ("AWS_REGION") or config.environ("AWS_DEFAULT_REGION")
        }
        endpoint = s3_endpoint()
        if endpoint:
            endpoint_url = urlparse(endpoint)
            kwargs["endpoint_override"] = endpoint_url.netloc or endpoint
            kwargs["scheme"] = endpoint_url.scheme or "https"
        return fs.S3FileSystem(**{k: v for k, v in kwargs.items() if v}), (
            parsed.netloc + parsed.path
        )
    from pathlib import Path

    return fs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).resolve())


def _uri(base_uri: str, path: str) -> str:
    return f"s3://{path}" if base_uri.startswith("s3://") else path


def list_inputs(pattern: str) -> list[InputFile]:
    """The files a path, a directory, a prefix or a glob names, sorted by path.

    Raises :class:`DataError` when nothing matches (before anything is written).
    """
    from pyarrow import fs as pafs

    filesystem_, path = filesystem(pattern)
    path = path.rstrip("/")
    try:
        if any(c in path for c in GLOB_CHARS):
            base = path[: min(path.index(c) for c in GLOB_CHARS if c in path)]
            base = base.rsplit("/", 1)[0] if "/" in base else base
            infos = filesystem_.get_file_info(pafs.FileSelector(base, recursive=True))
            infos = [i for i in infos if fnmatch.fnmatchcase(i.path, path)]
        else:
            info = filesystem_.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                infos = filesystem_.get_file_info(pafs.FileSelector(path, recursive=True))
            else:
                infos = [info]
    except FileNotFoundError:
        infos = []
    except OSError as exc:
        raise Unavailable(f"cannot list {pattern}: {_first_line(exc)}") from None
    files = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        name = info.path.rsplit("/", 1)[-1]
        if name.startswith(("_", ".")):
            continue  # _SUCCESS, .crc and the like
        fmt = plan.input_format(info.path)
        if not fmt:
            if len(infos) == 1:
                raise DataError(
                    f"{pattern}: unknown input format (expected .parquet, .csv or .jsonl)"
                )
            continue
        files.append(InputFile(_uri(pattern, info.path), info.path, int(info.size or 0), fmt))
    if not files:
        raise DataError(f"no input files match {pattern}")
    return sorted(files, key=lambda f: f.path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- columns ----------------------------------------------------------------------------------


def columns(file: InputFile) -> list[str]:
    """The column names of a file (JSONL: the keys of its first object)."""
    import orjson
    import pyarrow.parquet as pq

    filesystem_, _ = filesystem(file.uri)
    try:
        if file.format == "parquet":
            with filesystem_.open_input_file(file.path) as handle:
                return list(pq.ParquetFile(handle).schema_arrow.names)
        with filesystem_.open_input_stream(file.path, compression="detect") as handle:
            if file.format == "csv":
                # The header only: converting a first block could trip over a bad cell,
                # which is a bad row, not a bad file.
                header = next(_lines(handle), b"").decode("utf-8", "replace").rstrip("\r")
                delimiter = _csv_parse(file).delimiter
                return next(csv.reader([header], delimiter=delimiter), [])
            for line in _lines(handle):
                if line.strip():
                    try:
                        first = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    return list(first) if isinstance(first, dict) else []
            return []
    except FileNotFoundError:
        raise NotFound(f"no such input file: {file.uri}") from None
    except OSError as exc:
        raise DataError(f"cannot read {file.uri}: {_first_line(exc)}") from None
    except Exception as exc:  # pyarrow's ArrowInvalid: not a Parquet/CSV file
        if type(exc).__module__.startswith("pyarrow"):
            raise DataError(f"cannot read {file.uri}: {_first_line(exc)}") from None
        raise


def check_columns(file: InputFile, text_column: str, id_column: str | None) -> str | None:
    """Raise DataError for an unknown text column; the id column to use (None: row numbers)."""
    names = columns(file)
    if text_column not in names:
        raise DataError(
            f"{file.uri}: no column {text_column!r} (columns: {', '.join(names) or 'none'})"
        )
    if id_column is None:
        return None
    if id_column not in names:
        if id_column == "id":
            return None  # the default: use row numbers when the input has no id column
        raise DataError(f"{file.uri}: no id column {id_column!r} (columns: {', '.join(names)})")
    return id_column


# -- digests ----------------------------------------------------------------------------------


def digest(file: InputFile) -> str:
    """A content digest: the S3 ETag (no second read of the data), or SHA-256 of a local file."""
    filesystem_, _ = filesystem(file.uri)
    if file.uri.startswith("s3://"):
        from roost import storage

        bucket, key = storage.split_s3(file.uri)
        try:
            head = storage.s3_client().head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise Unavailable(f"cannot read {file.uri}: {_first_line(exc)}") from None
        return "etag:" + str(head.get("ETag", "")).strip('"')
    sha = hashlib.sha256()
    with filesystem_.open_input_stream(file.path) as handle:
        while block := handle.read(1 << 22):
            sha.update(block)
    return "sha256:" + sha.hexdigest()


# -- reading chunks ---------------------------------------------------------------------------


def chunks(
    file: InputFile, text_column: str, id_column: str | None, chunk_rows: int
) -> Iterator[RawChunk]:
    """Chunks of exactly ``chunk_rows`` rows (the last may be shorter; an empty file: none)."""
    if file.format == "jsonl":
        yield from _jsonl_chunks(file, text_column, id_column, chunk_rows)
        return
    batches = _arrow_batches(file, text_column, id_column)
    yield from _rechunk(batches, chunk_rows, text_column, id_column)


def _csv_parse(file: InputFile) -> Any:
    import pyarrow.csv as pacsv

    delimiter = "\t" if ".tsv" in file.path.lower() else ","
    return pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)


def _arrow_batches(file: InputFile, text_column: str, id_column: str | None) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    wanted = [text_column] + ([id_column] if id_column and id_column != text_column else [])
    filesystem_, _ = filesystem(file.uri)
    if file.format == "parquet":
        with filesystem_.open_input_file(file.path) as handle:
            parquet = pq.ParquetFile(handle)
            yield from parquet.iter_batches(batch_size=65536, columns=wanted)
        return
    with filesystem_.open_input_stream(file.path, compression="detect") as handle:
        types: dict[str, Any] = {text_column: pa.binary()}
        if id_column:
            types[id_column] = pa.string()
        reader = pacsv.open_csv(
            handle,
            read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            parse_options=_csv_parse(file),
            convert_options=pacsv.ConvertOptions(
                include_columns=wanted,
                column_types=types,
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            ),
        )
        yield from reader


def _rechunk(
    batches: Iterator[Any], chunk_rows: int, text_column: str, id_column: str | None
) -> Iterator[RawChunk]:
    import pyarrow as pa

    pending: list[Any] = []
    pending_rows = 0
    index = 0

    def emit(table: Any) -> RawChunk:
        nonlocal index
        values = table.column(text_column).to_pylist()
        if id_column and id_column != text_column:
            ids = [None if v is None else str(v) for v in table.column(id_column).to_pylist()]
        else:
            ids = [None] * len(values)
        chunk = RawChunk(index, index * chunk_rows, ids, values)
        index += 1
        return chunk

    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        pending_rows += batch.num_rows
        while pending_rows >= chunk_rows:
            table = pa.Table.from_batches(pending)
            yield emit(table.slice(0, chunk_rows))
            rest = table.slice(chunk_rows)
            pending = rest.to_batches() if rest.num_rows else []
            pending_rows = rest.num_rows
    if pending_rows:
        yield emit(pa.Table.from_batches(pending))


def _lines(handle: Any) -> Iterator[bytes]:
    """Lines of a pyarrow input stream (bytes, without the newline)."""
    rest = b""
    while block := handle.read(JSONL_READ_BYTES):
        *lines, rest = (rest + block).split(b"\n")
        yield from lines
    if rest:
        yield rest


def _jsonl_chunks(
    file: InputFile, text_column: str, id_column: str | None, chunk_rows: int
) -> Iterator[RawChunk]:
    import orjson

    filesystem_, _ = filesystem(file.uri)
    ids: list[Any] = []
    values: list[Any] = []
    problems: list[str | None] = []
    index = 0
    with filesystem_.open_input_stream(file.path, compression="detect") as handle:
        for raw in _lines(handle):
            if not raw.strip():
                continue  # blank lines are not rows
            problem: str | None = None
            value: Any = None
            row_id: Any = None
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                try:
                    raw.decode("utf-8")
                    problem = plan.INVALID_JSON
                except UnicodeDecodeError:
                    problem = plan.UNDECODABLE
            else:
                if isinstance(obj, dict):
                    value = obj.get(text_column)
                    if id_column is not None and obj.get(id_column) is not None:
                        row_id = str(obj[id_column])
                else:
                    problem = plan.INVALID_JSON
            ids.append(row_id)
            values.append(value)
            problems.append(problem)
            if len(values) == chunk_rows:
                yield RawChunk(index, index * chunk_rows, ids, values, problems)
                index += 1
                ids, values, problems = [], [], []
    if values:
        yield RawChunk(index, index * chunk_rows, ids, values, problems)


def total_rows(file: InputFile) -> int | None:
    """Rows of a Parquet file from its footer; None for CSV/JSONL (unknown until read)."""
    if file.format != "parquet":
        return None
    import pyarrow.parquet as pq

    filesystem_, _ = filesystem(file.uri)
    with filesystem_.open_input_file(file.path) as handle:
        return int(pq.ParquetFile(handle).metadata.num_rows)
