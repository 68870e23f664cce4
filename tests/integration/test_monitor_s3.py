"""The receiver's event store on S3 (moto in server mode), and everything that reads it.

- the journal stays on local disk; compaction puts whole Parquet objects on S3 and only
  then deletes the journal segment: while the bucket is missing, the events stay in the
  journal (flush answers 503) and none is lost once it exists;
- a receiver SIGKILLed before compaction recovers its journal and puts every acknowledged
  event on S3 once, and a redelivery after the restart is still a duplicate (keys rebuilt
  from S3);
- the report's reader, the feedback reader and `roost lineage --request-id`'s reader read
  the s3:// store.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import orjson
import pyarrow.parquet as pq
import pytest

from roost import proc
from roost.config import Settings
from roost.lineage.requests import find_request
from roost.monitor import events
from roost.monitor.report import load_feedback, load_traffic
from tests.integration.test_monitor import V2, Receiver, headers

pytestmark = pytest.mark.integration

BUCKET = "roost-monitor"


@pytest.fixture
def s3_env(moto_s3, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3")
    existing = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    if BUCKET in existing:  # a fresh bucket per test
        for obj in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
            s3.delete_object(Bucket=BUCKET, Key=obj["Key"])
        s3.delete_bucket(Bucket=BUCKET)
    yield {**os.environ, **moto_s3.env}


def s3_start(tmp_path: Path, env: dict[str, str], prefix: str, port: int = 0) -> Receiver:
    """A receiver journaling under tmp_path/journal, compacting to s3://BUCKET/prefix."""
    journal = tmp_path / "journal"
    port = port or proc.free_port()
    argv = [sys.executable, "-m", "roost", "monitor", "serve", "--port", str(port),
            "--store", f"s3://{BUCKET}/{prefix}", "--journal-dir", str(journal)]  # fmt: skip
    process = proc.start_background(
        argv, tmp_path / f"receiver-{prefix}.log", env={**env, "ROOST_MONITOR__SEGMENT_S": "3600"}
    )
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/healthz", 60, process, what="monitor receiver")
    return Receiver(url, journal, process)


def s3_rows(prefix: str) -> list[dict]:
    s3 = boto3.client("s3")
    keys = sorted(
        o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    )
    rows: list[dict] = []
    for key in keys:
        assert key.rsplit("/", 1)[-1].startswith("part-") and key.endswith(".parquet"), key
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        rows += pq.read_table(io.BytesIO(body)).to_pylist()
    return rows


def journal_lines(root: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in (root / "journal").glob("seg-*.jsonl"))


def response(event_id: str, label: str = "positive") -> bytes:
    return orjson.dumps({"model_name": "sentiment", "model_version": "3", "id": event_id,
                         "outputs": [{"name": "label", "shape": [1], "datatype": "BYTES",
                                      "data": [label]},
                                     {"name": "confidence", "shape": [1], "datatype": "FP32",
                                      "data": [0.9]}]})  # fmt: skip


def test_s3_store_compacts_whole_objects_and_keeps_the_journal_until_then(
    tmp_path: Path, s3_env: dict[str, str]
) -> None:
    receiver = s3_start(tmp_path, s3_env, "store")
    try:
        with httpx.Client(base_url=receiver.url, timeout=30) as c:
            for i in range(20):
                r = c.post("/", content=orjson.dumps(V2), headers=headers(f"e-{i}"))
                assert r.status_code == 200, r.text
                r = c.post("/", content=response(f"e-{i}"),
                           headers=headers(f"e-{i}", events.RESPONSE_TYPE))  # fmt: skip
                assert r.status_code == 200, r.text
            labels = [{"id": f"e-{i}", "label": "positive"} for i in range(5)]
            assert c.post("/v1/feedback", json=labels).status_code == 200
            # no bucket yet: compaction fails, the journal keeps all 45 acknowledged lines
            r = c.post("/v1/flush")
            assert r.status_code == 503 and r.json()["error"].startswith("store:"), r.text
            assert journal_lines(receiver.store) == 45
            assert BUCKET not in {b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]}
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            assert c.post("/v1/flush").status_code == 200
            assert journal_lines(receiver.store) == 0  # deleted only once on S3
            r = c.post("/", content=orjson.dumps(V2), headers=headers("e-0"))
            assert r.json() == {"stored": 0, "duplicates": 1}
    finally:
        receiver.process.stop()
    rows = s3_rows("store/events/")
    assert sorted((r["id"], r["type"]) for r in rows) == sorted(
        [(f"e-{i}", t) for i in range(20) for t in ("request", "response")]
    )
    assert {r["version"] for r in rows} == {"3"}  # requests took their responses' version
    assert sorted(r["id"] for r in s3_rows("store/feedback/")) == [f"e-{i}" for i in range(5)]

    # the readers: report traffic, feedback, lineage --request-id
    store = f"s3://{BUCKET}/store"
    traffic = load_traffic(store, "sentiment", dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    assert len(traffic) == 20 and set(traffic.label) == {"positive"}
    assert set(traffic.text) == {"fine"}
    assert load_feedback(store) == {f"e-{i}": "positive" for i in range(5)}
    found = find_request(Settings(lineage={"payload_store": store}), "e-7")
    assert (found.model, found.version) == ("sentiment", "3")


def test_s3_store_sigkill_before_compaction_loses_nothing(
    tmp_path: Path, s3_env: dict[str, str]
) -> None:
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    first = s3_start(tmp_path, s3_env, "killed")
    port = int(first.url.rsplit(":", 1)[1])
    with httpx.Client(base_url=first.url, timeout=30) as c:
        for i in range(30):
            r = c.post("/", content=orjson.dumps(V2), headers=headers(f"k-{i}"))
            assert r.status_code == 200, r.text
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.popen.wait(10)  # type: ignore[union-attr]
    assert s3_rows("killed/") == []  # nothing compacted yet: all of it is in the journal
    second = s3_start(tmp_path, s3_env, "killed", port=port)
    try:
        second.flush()
        with httpx.Client(base_url=second.url, timeout=30) as c:
            r = c.post("/", content=orjson.dumps(V2), headers=headers("k-3"))
            assert r.json() == {"stored": 0, "duplicates": 1}  # keys rebuilt from S3
    finally:
        second.process.stop()
    ids = [r["id"] for r in s3_rows("killed/events/")]
    assert sorted(ids) == sorted(f"k-{i}" for i in range(30))
