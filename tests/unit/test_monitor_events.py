"""The payload event format, body parsing, feedback validation and the journal (no network)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from prometheus_client import REGISTRY

from roost.config import PayloadLoggingSettings
from roost.monitor import events, payloads
from roost.monitor.journal import Journal, Record
from roost.monitor.payload import PayloadLogger
from roost.monitor.receiver import parse_feedback

pytestmark = pytest.mark.unit

# What KServe's agent sends (pkg/logger/worker.go, binary mode), header for header.
KSERVE_HEADERS = {
    "content-type": "application/json",
    "ce-specversion": "1.0",
    "ce-id": "5f0c-1",
    "ce-type": events.REQUEST_TYPE,
    "ce-source": "http://localhost:9081/",
    "ce-time": "2026-12-01T17:00:00.123456Z",
    "ce-recordedtime": "2026-12-01T17:00:00.2Z",
    "ce-inferenceservicename": "sentiment",
    "ce-namespace": "roost",
    "ce-component": "predictor",
    "ce-endpoint": "default",
    "ce-metadata": "{}",
}
V2_REQUEST = {"id": "r1", "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                      "data": ["good day", "bad day"]}]}  # fmt: skip
V2_RESPONSE = {
    "model_name": "sentiment", "model_version": "3", "id": "r1",
    "outputs": [
        {"name": "label", "shape": [2], "datatype": "BYTES", "data": ["positive", "negative"]},
        {"name": "confidence", "shape": [2], "datatype": "FP32", "data": [0.9, 0.75]},
    ],
}  # fmt: skip


def test_binary_event_as_kserve_sends_it() -> None:
    [event] = events.from_http(KSERVE_HEADERS, orjson.dumps(V2_REQUEST))
    assert (event.id, event.type, event.model) == ("5f0c-1", events.REQUEST_TYPE, "sentiment")
    assert event.attributes["namespace"] == "roost"
    assert event.attributes["endpoint"] == "default"
    assert orjson.loads(event.data) == V2_REQUEST


def test_round_trip_binary_structured_batch() -> None:
    event = events.Event("e1", events.RESPONSE_TYPE, "/roost/x", "2026-12-01T17:00:00Z",
                         orjson.dumps(V2_RESPONSE), {"inferenceservicename": "sentiment",
                                                     events.VERSION_EXTENSION: "3"})  # fmt: skip
    [binary] = events.from_http(events.binary_headers(event), event.data)
    assert binary == event
    body = events.batch_body([event, event])
    batch = events.from_http({"content-type": events.BATCH_CONTENT}, body)
    assert [e.id for e in batch] == ["e1", "e1"]
    assert orjson.loads(batch[0].data) == V2_RESPONSE
    structured = orjson.dumps(orjson.loads(body)[0])
    [one] = events.from_http({"content-type": events.STRUCTURED_CONTENT}, structured)
    assert one.version == "3" and orjson.loads(one.data) == V2_RESPONSE


@pytest.mark.parametrize(
    ("drop", "change", "body", "message"),
    [
        ("ce-id", {}, b"{}", "ce-id: required"),
        (None, {"ce-type": "com.example.other"}, b"{}", "ce-type: unknown event type"),
        (None, {}, b"not json{", "body: not a JSON document"),
        (None, {"ce-specversion": "0.3"}, b"{}", "ce-specversion: expected 1.0"),
    ],
)
def test_bad_events_name_the_field(
    drop: str | None, change: dict[str, str], body: bytes, message: str
) -> None:
    headers = {k: v for k, v in KSERVE_HEADERS.items() if k != drop} | change
    with pytest.raises(events.EventError, match=message) as info:
        events.from_http(headers, body)
    assert info.value.status == 400


def test_no_ce_headers_at_all() -> None:
    with pytest.raises(events.EventError, match="ce-id"):
        events.from_http({"content-type": "application/json"}, b"{}")


def test_payload_fields_v1_and_v2() -> None:
    assert payloads.parse(events.REQUEST_TYPE, V2_REQUEST) == {"texts": ["good day", "bad day"]}
    assert payloads.parse(events.REQUEST_TYPE, {"instances": ["a", {"text": "b"}]}) == {
        "texts": ["a", "b"]
    }
    assert payloads.parse(events.RESPONSE_TYPE, V2_RESPONSE) == {
        "version": "3", "labels": ["positive", "negative"], "confidences": [0.9, 0.75],
    }  # fmt: skip
    v1 = {"predictions": [{"label": "neutral", "confidence": 0.5, "probabilities": {}}]}
    assert payloads.parse(events.RESPONSE_TYPE, v1) == {"labels": ["neutral"], "confidences": [0.5]}
    assert payloads.parse(events.REQUEST_TYPE, {"something": "else"}) == {}


def test_feedback_validation() -> None:
    assert parse_feedback({"feedback": [{"id": "a", "label": "positive"}]}) == [("a", "positive")]
    with pytest.raises(events.EventError, match=r"feedback\[1\]\.label: required"):
        parse_feedback({"feedback": [{"id": "a", "label": "x"}, {"id": "b"}]})
    with pytest.raises(events.EventError, match="non-empty list"):
        parse_feedback({"feedback": []})


def _record(i: int, kind: str = events.REQUEST_TYPE) -> Record:
    body = V2_REQUEST if kind == events.REQUEST_TYPE else V2_RESPONSE
    return Record(f"id-{i}", kind, 1764608400.0 + i, "2026-12-01T17:00:00Z", "/s",
                  {"inferenceservicename": "sentiment"}, orjson.dumps(body))  # fmt: skip


def test_journal_dedup_group_commit_and_compaction(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, int]:
        journal = Journal(tmp_path, segment_s=3600)
        journal.open()
        try:
            first = await asyncio.gather(
                *(journal.append([_record(i), _record(i, events.RESPONSE_TYPE)]) for i in range(50))
            )
            again = await journal.append([_record(3), Record.feedback("id-3", "positive", 1.0)])
            journal.flush()
        finally:
            journal.close()
        return sum(s for s, _ in first) + again[0], again[1]

    stored, duplicates = asyncio.run(scenario())
    assert (stored, duplicates) == (101, 1)
    parts = sorted((tmp_path / "events").rglob("part-*.parquet"))
    # A request takes the version of its response (both in the segment): one partition.
    assert [p.relative_to(tmp_path / "events").parts[:3] for p in parts] == [
        ("model=sentiment", "version=3", "hour=2026-12-01T17")
    ]
    table = pq.read_table(parts[0]).to_pandas()
    assert len(table) == 100 and table[["id", "type"]].duplicated().sum() == 0
    assert table[table.type == "request"].texts.iloc[0].tolist() == ["good day", "bad day"]
    feedback = pq.read_table(next((tmp_path / "feedback").rglob("*.parquet"))).to_pylist()
    assert [(f["id"], f["label"]) for f in feedback] == [("id-3", "positive")]
    assert not list((tmp_path / "journal").glob("seg-000000001.jsonl"))


def test_journal_recovery_cuts_torn_line_and_keeps_keys(tmp_path: Path) -> None:
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    segment = journal_dir / "seg-000000001.jsonl"
    segment.write_bytes(_record(1).line() + _record(2).line()[:30])  # crash mid-write
    journal = Journal(tmp_path, segment_s=3600)
    journal.open()

    async def redeliver() -> tuple[int, int]:
        return await journal.append([_record(1), _record(2)])

    try:
        # id-1 was durable before the crash (a duplicate now); the torn id-2 was never acked.
        assert asyncio.run(redeliver()) == (1, 1)
        journal.flush()
    finally:
        journal.close()
    parts = sorted((tmp_path / "events").rglob("part-*.parquet"))
    ids = sorted(i for p in parts for i in pq.read_table(p).column("id").to_pylist())
    assert ids == ["id-1", "id-2"]
    assert not segment.exists()  # compacted, then removed


def test_journal_forgets_keys_after_the_dedupe_window(tmp_path: Path) -> None:
    now = [1000.0]
    journal = Journal(tmp_path, segment_s=3600, dedupe_window_s=60, clock=lambda: now[0])
    journal.open()

    async def at(t: float, *ids: int) -> tuple[int, int]:
        now[0] = t
        return await journal.append([_record(i) for i in ids])

    async def scenario() -> list[tuple[int, int]]:
        return [
            await at(1000, 1),
            await at(1030, 1),  # within the window: a duplicate
            await at(1059, 2, 3),
            await at(1061, 1, 2),  # id-1 was forgotten at 1060 and is stored again; id-2 not
            *[await at(2000 + t, 100 + t) for t in range(0, 600, 10)],  # an hour-long stream
        ]

    try:
        results = asyncio.run(scenario())
        # memory follows the window: the keys of the last 60 s only (7 appends, 10 s apart)
        assert len(journal.seen) == len(journal._seen_at) == 7
    finally:
        journal.close()
    assert results[:4] == [(1, 0), (0, 1), (2, 0), (1, 1)]


def test_journal_start_up_reads_only_the_windows_parts(tmp_path: Path) -> None:
    import os
    import time

    from roost.monitor.journal import stored_keys

    def store(*ids: int) -> None:
        journal = Journal(tmp_path, segment_s=3600)
        journal.open()
        try:
            asyncio.run(journal.append([_record(i) for i in ids]))
            journal.flush()
        finally:
            journal.close()

    store(1)
    old = time.time() - 7200
    for part in (tmp_path / "events").rglob("part-*.parquet"):
        os.utime(part, (old, old))  # written two hours ago
    store(2)
    assert stored_keys(tmp_path) == {("id-1", events.REQUEST_TYPE), ("id-2", events.REQUEST_TYPE)}
    journal = Journal(tmp_path, segment_s=3600, dedupe_window_s=3600)
    journal.open()
    try:
        assert journal.seen == {("id-2", events.REQUEST_TYPE)}
        # id-2 came within the hour: a duplicate; id-1 two hours ago: stored again
        assert asyncio.run(journal.append([_record(1), _record(2)])) == (1, 1)
    finally:
        journal.close()


def test_logger_queue_is_bounded_and_counts_drops() -> None:
    cfg = PayloadLoggingSettings(url="http://127.0.0.1:9/", queue_size=4)
    labels = {"model": "sentiment", "version": "1", "reason": "queue_full"}
    before = REGISTRY.get_sample_value("roost_payload_events_dropped_total", labels) or 0.0
    logger = PayloadLogger(cfg, "sentiment", "1")  # not started: nothing drains the queue
    for _ in range(5):
        logger.log(logger.event_id(), b"{}", b"{}")
    assert logger.pending() == 4
    dropped = REGISTRY.get_sample_value("roost_payload_events_dropped_total", labels)
    assert dropped == before + 6  # the 3rd, 4th and 5th inference: two events each
    assert logger.event_id("client-id") == "client-id"
    assert logger.event_id() != logger.event_id()


def test_deploy_logger_flags() -> None:
    from roost.errors import ConfigError
    from roost.monitor.deploy import with_logger

    base = {"spec": {"predictor": {"model": {}}}}
    assert with_logger(base, None, None) is base
    out = with_logger(base, "http://r:8090/", None)
    assert out["spec"]["predictor"]["logger"] == {"url": "http://r:8090/", "mode": "all"}
    assert "logger" not in base["spec"]["predictor"]  # pure: the input is untouched
    assert with_logger(out, None, "request")["spec"]["predictor"]["logger"]["mode"] == "request"
    with pytest.raises(ConfigError, match="--log-mode: expected one of"):
        with_logger(out, None, "everything")
    with pytest.raises(ConfigError, match="pass --log-url"):
        with_logger(base, None, "all")
    with pytest.raises(ConfigError, match="--log-url: expected an http"):
        with_logger(base, "receiver:8090", None)


def test_the_log_url_must_be_http() -> None:
    """A receiver URL the sender cannot post to is refused when the settings load."""
    from roost.config import load_settings
    from roost.errors import ConfigError

    for bad in ("ftp://receiver/", "localhost:8090", "http://"):
        with pytest.raises(ConfigError, match=r"serving\.logging\.url"):
            load_settings(None, {"serving": {"logging": {"url": bad}}})
    good = load_settings(None, {"serving": {"logging": {"url": "https://r.example:8443/e?x=1"}}})
    assert good.serving.logging.url == "https://r.example:8443/e?x=1"
