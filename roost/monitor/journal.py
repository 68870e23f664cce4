"""The receiver's durable store: an fsync'd journal, compacted into partitioned Parquet.

Durability contract (what ``roost monitor serve`` promises): an event is acknowledged (2xx)
only after its journal line was written *and* fsync'd. Appends from concurrent requests are
group-committed: whoever arrives while a write is in flight joins the next write, so one
fsync covers many events and throughput does not fall to one event per disk flush.

Layout: the journal under a local directory, the Parquet parts under the store (the same
directory, or an ``s3://`` prefix; :mod:`roost.monitor.store`)::

    <local>/journal/seg-000000012.jsonl          the active segment (and closed ones, briefly)
    <store>/events/model=M/version=V/hour=YYYY-MM-DDTHH/part-000000012.parquet
    <store>/feedback/hour=YYYY-MM-DDTHH/part-000000012.parquet

A segment is closed when it is big or old enough; a closed segment becomes Parquet files,
each appearing atomically (locally: a temporary name, fsync, rename; on S3: one whole
object upload), and only once all of them are written is the segment deleted. Compaction
is idempotent: the part files of a segment have the segment's number in their name, so
redoing it after a crash rewrites the same files. A line torn by a crash (never
acknowledged) is cut off at start-up.

Duplicates (the same event id and type delivered twice, as at-least-once senders do) are
stored once when they arrive within ``dedupe_window_s`` of the first: the keys of the events
stored in that window are kept in memory (and rebuilt at start-up from the journal and the
Parquet parts written in it), so memory and start-up time follow the event rate, not the
store's age. A later redelivery is stored again; every reader keeps the first of an id
(:func:`roost.monitor.report.load_traffic`, :func:`roost.monitor.report.load_feedback`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from roost.monitor import events
from roost.monitor.store import PartStore, fsync_dir

log = logging.getLogger(__name__)

FEEDBACK_TYPE = "roost.feedback"
SEGMENT_RE = re.compile(r"seg-(\d{9})\.jsonl$")
Key = tuple[str, str]


@dataclass(frozen=True)
class Record:
    """One journal line: an event or a feedback label."""

    id: str
    type: str
    received: float
    time: str = ""
    source: str = ""
    attributes: dict[str, str] | None = None
    data: bytes = b"null"  # raw JSON (events) or the label as a JSON string (feedback)
    body: Any = field(default=None, compare=False, repr=False)  # ``data`` parsed, if it was

    @property
    def key(self) -> Key:
        return (self.id, self.type)

    def line(self) -> bytes:
        return (
            orjson.dumps(
                {
                    "id": self.id,
                    "type": self.type,
                    "received": self.received,
                    "time": self.time,
                    "source": self.source,
                    "attributes": self.attributes or {},
                    "data": orjson.Fragment(self.data),
                }
            )
            + b"\n"
        )

    @classmethod
    def of_event(cls, event: events.Event, received: float) -> Record:
        return cls(
            event.id, event.type, received, event.time, event.source, event.attributes, event.data
        )

    @classmethod
    def feedback(cls, event_id: str, label: str, received: float) -> Record:
        return cls(event_id, FEEDBACK_TYPE, received, data=orjson.dumps(label))


class Journal:
    """Append-only, group-committed journal with background compaction into Parquet."""

    def __init__(
        self,
        root: Path,
        segment_bytes: int = 32 << 20,
        segment_s: float = 60.0,
        store: str | Path | PartStore | None = None,
        dedupe_window_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.dedupe_window_s = dedupe_window_s
        self.clock = clock
        self.store = PartStore.of(store if store is not None else root)
        self.journal_dir = root / "journal"
        self.segment_bytes = segment_bytes
        self.segment_s = segment_s
        self.seen: set[Key] = set()  # keys stored in the dedupe window
        self._seen_at: deque[tuple[float, Key]] = deque()  # (when stored, key), oldest first
        self._inflight: dict[Key, asyncio.Future[None]] = {}
        self._pending: list[tuple[list[Record], asyncio.Future[None]]] = []
        self._writing = False
        self._committer: asyncio.Task[None] | None = None
        self._file: Any = None
        self._segment = 0
        self._opened = 0.0
        self._size = 0
        self._lock = threading.Lock()  # the compactor vs rotation
        self._compact_wake = threading.Event()
        self._stop = threading.Event()
        self._compactor: threading.Thread | None = None
        self.stored = 0
        self.duplicates = 0
        self.compacted_segments = 0

    # -- start-up -----------------------------------------------------------------------------
    def open(self) -> None:
        """Recover: cut torn lines, load the keys stored so far, compact closed segments."""
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        segments = self.segments()
        now = self.clock()
        keys: set[Key] = set()
        for _, path in segments:
            self._repair(path)
            keys.update(record.key for record in read_segment(path))
        keys |= stored_keys(self.store, since=now - self.dedupe_window_s)
        for key in keys:  # the window of each starts now: none is forgotten early
            self._remember(key, now)
        self._segment = (segments[-1][0] + 1) if segments else 1
        self._open_segment()
        self._compactor = threading.Thread(target=self._compact_loop, name="compactor", daemon=True)
        self._compactor.start()
        self._compact_wake.set()  # the segments left by the last process
        log.info(
            "journal open root=%s store=%s keys=%d segment=%d",
            self.root,
            self.store.uri,
            len(self.seen),
            self._segment,
        )

    def segments(self) -> list[tuple[int, Path]]:
        out = []
        for path in self.journal_dir.glob("seg-*.jsonl"):
            match = SEGMENT_RE.search(path.name)
            if match:
                out.append((int(match.group(1)), path))
        return sorted(out)

    @staticmethod
    def _repair(path: Path) -> None:
        """Cut a torn last line (written, never fsync'd whole, so never acknowledged)."""
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            log.warning("journal %s: cutting %d bytes of a torn line", path.name, len(data) - end)
            with open(path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())

    def _open_segment(self) -> None:
        path = self.journal_dir / f"seg-{self._segment:09d}.jsonl"
        self._file = open(path, "ab")  # noqa: SIM115 - held open for appends
        fsync_dir(self.journal_dir)
        self._opened = time.monotonic()
        self._size = self._file.tell()

    def close(self) -> None:
        self._stop.set()
        self._compact_wake.set()
        if self._compactor is not None:
            self._compactor.join(30)
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- the dedupe window ---------------------------------------------------------------------
    def _remember(self, key: Key, now: float) -> None:
        self.seen.add(key)
        self._seen_at.append((now, key))

    def _forget(self, now: float) -> None:
        """Drop the keys stored longer than ``dedupe_window_s`` ago."""
        cutoff = now - self.dedupe_window_s
        seen_at, seen = self._seen_at, self.seen
        while seen_at and seen_at[0][0] < cutoff:
            seen.discard(seen_at.popleft()[1])

    # -- appends (event loop) -----------------------------------------------------------------
    async def append(self, records: Iterable[Record]) -> tuple[int, int]:
        """Store ``records`` durably; returns (stored, duplicates) once all are on disk."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()  # this call's records, on disk
        waits = {future}
        mine: list[Record] = []
        duplicates = 0
        self._forget(self.clock())
        inflight, seen = self._inflight, self.seen
        for record in records:
            key = record.key
            if key in seen:
                duplicates += 1
                continue
            other = inflight.get(key)
            if other is not None:  # the same event, arriving twice at once (or twice here)
                duplicates += 1
                waits.add(other)
                continue
            inflight[key] = future
            mine.append(record)
        if mine:
            self._pending.append((mine, future))
            if not self._writing:
                self._writing = True
                self._committer = loop.create_task(self._commit_loop())
        else:
            waits.discard(future)  # nothing of ours to write
        if waits:
            await asyncio.gather(*waits)
        self.duplicates += duplicates
        return len(mine), duplicates

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batches, self._pending = self._pending, []
                data = b"".join(record.line() for records, _ in batches for record in records)
                try:
                    await loop.run_in_executor(None, self._write, data)
                except OSError as exc:
                    for records, future in batches:
                        for record in records:
                            self._inflight.pop(record.key, None)
                        future.set_exception(exc)
                    continue
                now = self.clock()
                for records, future in batches:
                    for record in records:
                        key = record.key
                        self._remember(key, now)
                        self._inflight.pop(key, None)
                    future.set_result(None)
                    self.stored += len(records)
        finally:
            self._writing = False

    def _write(self, data: bytes) -> None:
        with self._lock:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._size += len(data)
            if self._size >= self.segment_bytes:
                self._rotate()

    def _rotate(self) -> None:
        """Close the active segment (holding the lock) and start the next one."""
        if self._size == 0:
            return
        self._file.close()
        self._segment += 1
        self._open_segment()
        self._compact_wake.set()

    def rotate_if_old(self) -> bool:
        """Close the active segment if it has data and is older than ``segment_s``."""
        with self._lock:
            if self._size and time.monotonic() - self._opened >= self.segment_s:
                self._rotate()
                return True
        return False

    def flush(self) -> None:
        """Close the active segment now and compact everything closed (tests, reports)."""
        with self._lock:
            self._rotate()
        self.compact()

    # -- compaction (a thread) ---------------------------------------------------------------
    def _compact_loop(self) -> None:
        while not self._stop.is_set():
            self._compact_wake.wait(max(0.5, self.segment_s / 4))
            self._compact_wake.clear()
            self.rotate_if_old()
            try:
                self.compact()
            except Exception:  # keep the receiver up; the segment stays and is retried
                log.exception("compaction failed; the journal keeps the events")

    def compact(self) -> int:
        """Turn every closed segment into Parquet parts; returns how many it compacted."""
        done = 0
        with _COMPACT_LOCK:
            for number, path in self.segments():
                if number >= self._segment:
                    break
                write_parts(self.store, number, list(read_segment(path)))
                path.unlink()
                fsync_dir(self.journal_dir)
                done += 1
        self.compacted_segments += done
        return done


_COMPACT_LOCK = threading.Lock()


def read_segment(path: Path) -> Iterator[Record]:
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                return  # torn (never acknowledged)
            doc = orjson.loads(line)
            yield Record(
                doc["id"],
                doc["type"],
                doc["received"],
                doc.get("time", ""),
                doc.get("source", ""),
                doc.get("attributes") or {},
                orjson.dumps(doc["data"]),
                doc["data"],
            )


# -- Parquet ---------------------------------------------------------------------------------
def _hour(record: Record) -> str:
    """The partition hour of an event: its ce-time, else the time it was received (UTC)."""
    stamp: dt.datetime | None = None
    if record.time:
        try:
            stamp = dt.datetime.fromisoformat(record.time.replace("Z", "+00:00"))
        except ValueError:
            stamp = None
    if stamp is None:
        stamp = dt.datetime.fromtimestamp(record.received, dt.UTC)
    elif stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.astimezone(dt.UTC).strftime("%Y-%m-%dT%H")


def _timestamp(record: Record) -> dt.datetime:
    if record.time:
        try:
            stamp = dt.datetime.fromisoformat(record.time.replace("Z", "+00:00"))
            return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)
        except ValueError:
            pass
    return dt.datetime.fromtimestamp(record.received, dt.UTC)


@functools.lru_cache(maxsize=1024)
def _safe(value: str) -> str:
    """A partition value usable as a path component."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", value) or "unknown"


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICRO = dt.timedelta(microseconds=1)


def _when(record: Record, seconds: dict[str, int | None]) -> tuple[int, str]:
    """(microseconds since the epoch, partition hour) of an event, as ``_timestamp`` and
    ``_hour`` give them; ``seconds`` caches the parse of each whole second of
    ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (the form both KServe's agent and roost's sender write)."""
    t = record.time
    if len(t) == 27 and t[19] == "." and t[26] == "Z" and t[10] == "T" and t[20:26].isdigit():
        head = t[:19]
        if head not in seconds:
            try:
                parsed = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC)
                seconds[head] = (parsed - _EPOCH) // dt.timedelta(seconds=1)
            except ValueError:
                seconds[head] = None
        second = seconds[head]
        if second is not None:
            return second * 1_000_000 + int(t[20:26]), t[:13]
    stamp = _timestamp(record)
    return (stamp - _EPOCH) // _MICRO, _hour(record)


def write_parts(store: str | Path | PartStore, segment: int, records: list[Record]) -> list[str]:
    """Write one segment's records as Parquet parts (each atomic); returns their URIs."""
    import pyarrow as pa

    parts = PartStore.of(store)

    from roost.monitor import payloads

    event_schema, feedback_schema = _schemas()
    versions: dict[str, str] = {}
    feedback: dict[str, list[dict[str, Any]]] = {}
    parsed = []
    for record in records:
        if record.type == FEEDBACK_TYPE:
            feedback.setdefault(_hour(record), []).append(
                {
                    "id": record.id,
                    "label": orjson.loads(record.data),
                    "received": dt.datetime.fromtimestamp(record.received, dt.UTC),
                }
            )
            continue
        body = record.body if record.body is not None else orjson.loads(record.data)
        fields = payloads.parse(record.type, body)
        attrs = record.attributes or {}
        version = attrs.get(events.VERSION_EXTENSION) or fields.get("version") or ""
        if version:
            versions[record.id] = version
        parsed.append((record, fields, attrs, version))
    # Rows as tuples in the schema's column order, grouped by partition, then one Arrow array
    # per column (Table.from_pylist's dict per row cost a third of the compaction).
    groups: dict[tuple[str, str, str], list[tuple[Any, ...]]] = {}
    seconds: dict[str, int | None] = {}
    for record, fields, attrs, version in parsed:
        version = version or versions.get(record.id) or "unknown"  # a request: its response's
        model = attrs.get("inferenceservicename") or "unknown"
        when, hour = _when(record, seconds)
        groups.setdefault((_safe(model), _safe(version), hour), []).append(
            (
                record.id,
                "request" if record.type == events.REQUEST_TYPE else "response",
                when,
                round(record.received * 1_000_000),
                model,
                version,
                attrs.get("endpoint", ""),
                attrs.get("namespace", ""),
                record.source,
                fields.get("texts"),
                fields.get("labels"),
                fields.get("confidences"),
                record.data.decode(),
            )
        )
    written = []
    for (model, version, hour), rows in groups.items():
        folder = f"events/model={model}/version={version}/hour={hour}"
        columns = [
            pa.array(values, type=column.type)
            for values, column in zip(zip(*rows, strict=True), event_schema, strict=True)
        ]
        table = pa.Table.from_arrays(columns, schema=event_schema)
        written.append(parts.write(f"{folder}/part-{segment:09d}.parquet", table))
    for hour, group in feedback.items():
        table = pa.Table.from_pylist(group, schema=feedback_schema)
        written.append(parts.write(f"feedback/hour={hour}/part-{segment:09d}.parquet", table))
    return written


def _schemas() -> tuple[Any, Any]:
    import pyarrow as pa

    ts = pa.timestamp("us", tz="UTC")
    event = pa.schema(
        [
            ("id", pa.string()),
            ("type", pa.string()),
            ("time", ts),
            ("received", ts),
            ("model", pa.string()),
            ("version", pa.string()),
            ("endpoint", pa.string()),
            ("namespace", pa.string()),
            ("source", pa.string()),
            ("texts", pa.list_(pa.string())),
            ("labels", pa.list_(pa.string())),
            ("confidences", pa.list_(pa.float32())),
            ("data", pa.string()),
        ]
    )
    feedback = pa.schema([("id", pa.string()), ("label", pa.string()), ("received", ts)])
    return event, feedback


def stored_keys(store: str | Path | PartStore, since: float | None = None) -> set[Key]:
    """(id, type) of the events and feedback labels in Parquet: all of them, or with ``since``
    (epoch seconds) those in parts written since (a part is written after its events came)."""
    parts = PartStore.of(store)
    keys: set[Key] = set()
    for path in parts.parts("events", modified_since=since):
        table = parts.read(path, columns=["id", "type"])
        for event_id, kind in zip(
            table.column("id").to_pylist(), table.column("type").to_pylist(), strict=True
        ):
            keys.add((event_id, events.REQUEST_TYPE if kind == "request" else events.RESPONSE_TYPE))
    for path in parts.parts("feedback", modified_since=since):
        table = parts.read(path, columns=["id"])
        keys.update((event_id, FEEDBACK_TYPE) for event_id in table.column("id").to_pylist())
    return keys
