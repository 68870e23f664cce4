"""Where the receiver's Parquet parts live: a local directory or an ``s3://`` prefix.

The journal always stays on local disk (an event is acknowledged only once it is fsync'd
there); only compacted Parquet parts go to the store. A part appears atomically on both:

* locally: written to a temporary name, fsync'd, renamed, the directory fsync'd;
* on S3: the whole file is serialised in memory and uploaded as one object. S3 makes an
  object visible only when its upload completes (a PUT, or the completion of a multipart
  upload), so a reader never sees half a part, and a failed upload leaves nothing.

Files are listed and read through ``pyarrow.fs`` with the S3 endpoint roost uses everywhere
(``AWS_ENDPOINT_URL`` or ``MLFLOW_S3_ENDPOINT_URL``; see :mod:`roost.batch.sources`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from roost.errors import Unavailable


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (the directory entry itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartStore:
    """Parquet parts under a root (``events/...``, ``feedback/...``), local or on S3."""

    def __init__(self, uri: str | Path) -> None:
        from roost.batch.sources import filesystem

        self.uri = str(uri).rstrip("/") if str(uri).startswith("s3://") else str(uri)
        self.is_s3 = self.uri.startswith("s3://")
        self.fs, self.base = filesystem(self.uri)
        self.base = self.base.rstrip("/")

    @classmethod
    def of(cls, store: str | Path | PartStore) -> PartStore:
        return store if isinstance(store, PartStore) else cls(store)

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def display(self, path: str) -> str:
        return f"s3://{path}" if self.is_s3 else path

    def write(self, rel: str, table: Any) -> str:
        """Write ``table`` as the part ``rel`` (atomically); returns its URI."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.is_s3:
            final = Path(self.path(rel))
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp")
            pq.write_table(table, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            fsync_dir(final.parent)
            return str(final)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue()
        path = self.path(rel)
        try:
            with self.fs.open_output_stream(path) as out:
                out.write(data)
        except OSError as exc:
            raise Unavailable(f"cannot write {self.display(path)}: {exc}") from None
        return self.display(path)

    def parts(self, prefix: str, modified_since: float | None = None) -> list[str]:
        """Paths (on ``self.fs``) of every ``part-*.parquet`` under ``prefix``, sorted; with
        ``modified_since`` (epoch seconds), only those written since (or of unknown age)."""
        from pyarrow import fs as pafs

        since_ns = 0 if modified_since is None else int(modified_since * 1e9)
        selector = pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except OSError as exc:
            raise Unavailable(f"cannot list {self.display(self.path(prefix))}: {exc}") from None
        return sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and i.path.rsplit("/", 1)[-1].startswith("part-")
            and i.path.endswith(".parquet")
            and (modified_since is None or i.mtime_ns is None or i.mtime_ns >= since_ns)
        )

    def read(self, path: str, columns: list[str] | None = None) -> Any:
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=columns, filesystem=self.fs)

    def has(self, prefix: str) -> bool:
        return bool(self.parts(prefix))
