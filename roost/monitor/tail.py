"""The receiver's recent events in memory, numbered, for readers that follow the traffic.

``GET /v1/tail?after=SEQ&limit=N&model=M&since=T`` answers the events stored after sequence
number ``SEQ`` (oldest first, at most ``N``) of one model, received at epoch second ``T`` or
later. The shadow phase of a rollout
(``roost.rollout.shadow``) reads the champion's requests and responses from here and
replays them to the challenger: the same code path whether the events came from KServe's
logger agent in a cluster or from roost's own predictor logger locally.

The buffer is bounded (the oldest events fall out; ``first`` says which sequence number is
the oldest still held) and lives as long as the receiver process: ``epoch`` changes on
every start, so a reader knows its cursor belongs to an earlier process and starts over.
The durable copy of every event is the journal and its Parquet parts, as before.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Iterable
from typing import Any

import orjson

from roost.monitor import events
from roost.monitor.journal import Record

MAX_EVENTS = 50_000
MAX_LIMIT = 5_000


class Tail:
    """A numbered ring of the last ``size`` request/response events (each (id, type) once)."""

    def __init__(self, size: int = MAX_EVENTS) -> None:
        self.epoch = uuid.uuid4().hex[:12]
        self._items: deque[tuple[int, Record]] = deque()
        self._keys: set[tuple[str, str]] = set()
        self._size = size
        self._next = 1
        self._lock = threading.Lock()

    def add(self, records: Iterable[Record]) -> None:
        with self._lock:
            for record in records:
                if record.type not in (events.REQUEST_TYPE, events.RESPONSE_TYPE):
                    continue
                if record.key in self._keys:
                    continue
                self._items.append((self._next, record))
                self._keys.add(record.key)
                self._next += 1
                while len(self._items) > self._size:
                    _, old = self._items.popleft()
                    self._keys.discard(old.key)

    def read(
        self, after: int, limit: int, model: str | None = None, since: float = 0.0
    ) -> dict[str, Any]:
        """Events with a sequence number above ``after`` (of ``model`` if given, received at
        ``since`` or later), oldest first; ``next`` is the last sequence number looked at."""
        limit = max(1, min(limit, MAX_LIMIT))
        with self._lock:
            first = self._items[0][0] if self._items else self._next
            out: list[dict[str, Any]] = []
            last = after
            for seq, record in self._items:
                if seq <= after:
                    continue
                if len(out) >= limit:
                    break
                last = seq
                attrs = record.attributes or {}
                if model is not None and attrs.get("inferenceservicename") != model:
                    continue
                if record.received < since:
                    continue
                out.append(
                    {
                        "seq": seq,
                        "id": record.id,
                        "type": record.type,
                        "received": record.received,
                        "attributes": attrs,
                        "data": orjson.Fragment(record.data),
                    }
                )
            return {"epoch": self.epoch, "first": first, "next": last, "events": out}
