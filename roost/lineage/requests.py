"""From a logged request to the version that answered it: the monitor's Parquet store.

Payload logging (``roost monitor``) stores request/response events as Parquet under one
directory or ``s3://`` prefix, partitioned by model and version (hive style,
``model=.../version=.../``). This module only reads it: the event whose id is the request
id, and the model and version recorded with it. Without a configured store it says so; it
never guesses a version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from roost.config import Settings
from roost.errors import ConfigError, NotFound

log = logging.getLogger(__name__)

NOT_CONFIGURED = "payload logging not configured"
ID_COLUMNS = ("request_id", "id")  # the event id is the request id (CloudEvents ``id``)


class PayloadLoggingNotConfigured(ConfigError):
    """``--request-id`` needs the monitor's payload store."""


@dataclass(frozen=True)
class LoggedRequest:
    request_id: str
    model: str
    version: str
    store: str
    fields: dict[str, Any]


def find_request(settings: Settings, request_id: str) -> LoggedRequest:
    """The logged request ``request_id``: which model and version answered it."""
    from roost.monitor.local import store_uri
    from roost.monitor.store import PartStore

    store = settings.lineage.payload_store
    if not store:
        default = PartStore(store_uri(settings))  # the receiver's store (`roost monitor up`)
        if default.has("events"):
            store = default.uri
    if not store:
        raise PayloadLoggingNotConfigured(
            f"{NOT_CONFIGURED}: set lineage.payload_store (ROOST_LINEAGE__PAYLOAD_STORE) to the "
            "monitor's Parquet store to look up --request-id"
        )
    parts = PartStore(store)
    from pyarrow import fs as pafs

    if parts.fs.get_file_info(parts.base).type == pafs.FileType.NotFound:
        raise NotFound(f"payload store {store} does not exist")
    root = parts.base
    if parts.fs.get_file_info(f"{root}/events").type == pafs.FileType.Directory:
        root = f"{root}/events"  # the receiver's layout: events/ beside journal/, feedback/
    import pyarrow as pa
    import pyarrow.dataset as ds

    # Partition values are strings (a version "4" is not the integer 4; the receiver's files
    # also carry model and version as string columns).
    keys = ds.partitioning(pa.schema([("model", pa.string()), ("version", pa.string())]),
                           flavor="hive")  # fmt: skip
    dataset = ds.dataset(root, format="parquet", partitioning=keys, filesystem=parts.fs)
    root = parts.display(root)
    names = set(dataset.schema.names)
    id_column = next((c for c in ID_COLUMNS if c in names), None)
    if id_column is None or not {"model", "version"} <= names:
        raise NotFound(
            f"payload store {root} has no {' or '.join(ID_COLUMNS)} / model / version columns"
        )
    table = dataset.to_table(filter=ds.field(id_column) == request_id)
    if table.num_rows == 0:
        raise NotFound(f"request {request_id!r} is not in the payload store {root}")
    rows = table.to_pylist()
    answered = {(str(r["model"]), str(r["version"])) for r in rows}
    if len(answered) > 1:
        raise NotFound(
            f"request {request_id!r} is logged against several versions: "
            + ", ".join(f"{m}/{v}" for m, v in sorted(answered))
        )
    model, version = answered.pop()
    first = {k: v for k, v in rows[0].items() if isinstance(v, str | int | float | bool)}
    return LoggedRequest(request_id, model, version, str(root), first)
