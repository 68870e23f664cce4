"""The monitor receiver and payload logging, on real processes.

- a real `roost monitor serve` takes KServe-format events (binary, structured, batched),
  stores duplicates once and rejects bad events with a JSON 4xx;
- SIGKILLed under load, it loses no event it acknowledged;
- a real `roost serve --log-url` logs REST v1/v2 and gRPC inferences to it, and every
  response names its events.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import orjson
import pyarrow.parquet as pq
import pytest

from roost import proc
from roost.config import Settings
from roost.monitor import events
from roost.serving.local import LocalServer
from tests.conftest import serve_champion

pytestmark = pytest.mark.integration

V2 = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["fine"]}]}


@dataclass
class Receiver:
    url: str
    store: Path
    process: proc.Background

    def flush(self) -> None:
        assert httpx.post(self.url + "/v1/flush", timeout=60).status_code == 200


def start_receiver(store: Path, env: dict[str, str] | None = None, port: int = 0) -> Receiver:
    port = port or proc.free_port()
    argv = [sys.executable, "-m", "roost", "monitor", "serve", "--port", str(port),
            "--store", str(store)]  # fmt: skip
    process = proc.start_background(argv, store.parent / f"{store.name}.log", env=env)
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/healthz", 60, process, what="monitor receiver")
    return Receiver(url, store, process)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = start_receiver(tmp_path / "store", env={"ROOST_MONITOR__MAX_BODY_BYTES": "65536"})
    try:
        yield r
    finally:
        r.process.stop()


def stored_rows(store: Path) -> list[dict]:
    rows: list[dict] = []
    for path in sorted((store / "events").rglob("part-*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def headers(event_id: str, kind: str = events.REQUEST_TYPE) -> dict[str, str]:
    return {"content-type": "application/json", "ce-specversion": "1.0", "ce-id": event_id,
            "ce-type": kind, "ce-source": "http://localhost:9081/",
            "ce-inferenceservicename": "sentiment", "ce-namespace": "roost",
            "ce-component": "predictor", "ce-endpoint": "default"}  # fmt: skip


def test_receiver_stores_each_event_once_and_rejects_bad_ones(receiver: Receiver) -> None:
    with httpx.Client(base_url=receiver.url, timeout=30) as c:
        for _ in range(2):  # an at-least-once sender delivers twice
            r = c.post("/", content=orjson.dumps(V2), headers=headers("a-1"))
            assert r.status_code == 200, r.text
        assert r.json() == {"stored": 0, "duplicates": 1}
        structured = {"specversion": "1.0", "id": "a-2", "type": events.RESPONSE_TYPE,
                      "source": "/x", "inferenceservicename": "sentiment",
                      "data": {"model_version": "7", "outputs": [
                          {"name": "label", "shape": [1], "datatype": "BYTES",
                           "data": ["neutral"]}]}}  # fmt: skip
        r = c.post("/", content=orjson.dumps(structured),
                   headers={"content-type": events.STRUCTURED_CONTENT})  # fmt: skip
        assert r.json() == {"stored": 1, "duplicates": 0}

        bad = {
            "missing ce-id": ({k: v for k, v in headers("x").items() if k != "ce-id"}, b"{}"),
            "unknown type": (headers("x", "com.example.thing"), b"{}"),
            "not json": (headers("x"), b"{nope"),
        }
        for what, (h, body) in bad.items():
            r = c.post("/", content=body, headers=h)
            assert r.status_code == 400, what
            assert r.json()["error"].split(":")[0] in ("ce-id", "ce-type", "body"), r.json()
        r = c.post("/", content=b"[" + b"1," * 40_000 + b"1]", headers=headers("big"))
        assert r.status_code == 413 and "limit" in r.json()["error"]
        r = c.post("/v1/feedback", json={"feedback": [{"id": "a-1"}]})
        assert r.status_code == 422 and r.json()["error"].startswith("feedback[0].label")
        assert c.post("/v1/feedback", json=[{"id": "a-1", "label": "neutral"}]).status_code == 200
        metrics = c.get("/metrics").text
        assert 'roost_monitor_rejected_total{status="400"} 3.0' in metrics
    receiver.flush()
    rows = stored_rows(receiver.store)
    assert sorted((r["id"], r["type"]) for r in rows) == [("a-1", "request"), ("a-2", "response")]
    # the request took the version its response named, when both are known
    assert {r["version"] for r in rows} == {"unknown", "7"}
    assert not any(r["id"] in ("x", "big") for r in rows)


def test_sigkill_under_load_loses_no_acknowledged_event(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = start_receiver(store)
    port = int(first.url.rsplit(":", 1)[1])
    acked: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()
    killed = threading.Event()

    def send() -> None:
        with httpx.Client(base_url=first.url, timeout=10) as c:
            while not stop.is_set():
                event_id = uuid.uuid4().hex
                try:
                    r = c.post("/", content=orjson.dumps(V2), headers=headers(event_id))
                except httpx.HTTPError:
                    continue  # the receiver is down: not acknowledged, nothing promised
                if r.status_code == 200:
                    with lock:
                        acked.add(event_id)

    senders = [threading.Thread(target=send) for _ in range(8)]
    for t in senders:
        t.start()
    try:
        proc.wait_until(lambda: len(acked) >= 300, 60, what="300 acknowledged events")
        os.kill(first.process.pid, signal.SIGKILL)
        killed.set()
        first.process.popen.wait(10)  # type: ignore[union-attr]
    finally:
        stop.set()
        for t in senders:
            t.join()
        if not killed.is_set():
            first.process.stop()
    second = start_receiver(store, port=port)
    try:
        second.flush()
        stored = [r["id"] for r in stored_rows(store)]
    finally:
        second.process.stop()
    assert len(stored) == len(set(stored)), "an event was stored twice"
    missing = acked - set(stored)
    assert not missing, f"{len(missing)} acknowledged events lost of {len(acked)}"


@pytest.fixture
def logging_server(
    settings: Settings,
    champion,
    receiver: Receiver,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> Iterator[LocalServer]:
    env = {"ROOST_SERVING__LOGGING__URL": receiver.url,
           "ROOST_SERVING__LOGGING__FORMAT": "binary",  # KServe's agent's format (e2e: batch)
           "ROOST_SERVING__LOGGING__FLUSH_INTERVAL_S": "0.05"}  # fmt: skip
    yield from serve_champion(settings, tmp_path / "server.log", env=env)


def test_model_server_logs_rest_and_grpc_inferences(
    logging_server: LocalServer,
    receiver: Receiver,
    champion,  # type: ignore[no-untyped-def]
) -> None:
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    ids: dict[str, list[str]] = {}
    with httpx.Client(base_url=logging_server.http_url, timeout=30) as c:
        r = c.post("/v2/models/sentiment/infer", json=V2)  # no id: the server makes one
        assert r.status_code == 200
        event_id = r.headers[events.EVENT_ID_HEADER]
        assert r.json()["id"] == event_id
        ids[event_id] = ["fine"]
        r = c.post("/v2/models/sentiment/infer", json={**V2, "id": "client-7"})
        assert r.headers[events.EVENT_ID_HEADER] == r.json()["id"] == "client-7"
        ids["client-7"] = ["fine"]
        r = c.post("/v1/models/sentiment:predict", json={"instances": ["a", "b"]})
        ids[r.headers[events.EVENT_ID_HEADER]] = ["a", "b"]
        # KServe's full path (parameters are not plain) names its events too
        full = {**V2, "parameters": {"x": 1}}
        r = c.post("/v2/models/sentiment/infer", json=full)
        assert r.status_code == 200, r.text
        assert r.headers[events.EVENT_ID_HEADER] == r.json()["id"] != ""
        ids[r.json()["id"]] = ["fine"]
    with grpc.insecure_channel(logging_server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        tensor = pb.ModelInferRequest.InferInputTensor(
            name="text", datatype="BYTES", shape=[1],
            contents=pb.InferTensorContents(bytes_contents=[b"over grpc"]),
        )  # fmt: skip
        response, call = stub.ModelInfer.with_call(
            pb.ModelInferRequest(model_name="sentiment", inputs=[tensor]), timeout=30
        )
        metadata = dict(call.initial_metadata())
        assert metadata[events.EVENT_ID_HEADER] == response.id != ""
        ids[response.id] = ["over grpc"]

    def arrived() -> list[dict] | None:
        receiver.flush()
        rows = stored_rows(receiver.store)
        return rows if {r["id"] for r in rows} >= set(ids) and len(rows) >= 2 * len(ids) else None

    rows = proc.wait_until(arrived, 60, 0.5, describe=lambda: str(stored_rows(receiver.store)))
    for row in rows:
        assert row["model"] == "sentiment" and row["version"] == champion.version
        if row["type"] == "request":
            assert row["texts"] == ids[row["id"]]
        else:
            assert len(row["labels"]) == len(row["confidences"]) == len(ids[row["id"]])


def test_a_dead_receiver_never_fails_inference(
    settings: Settings,
    champion,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """Nothing listens at the log URL: every inference still answers; the drops are counted."""
    env = {"ROOST_SERVING__LOGGING__URL": f"http://127.0.0.1:{proc.free_port()}/",
           "ROOST_SERVING__LOGGING__MAX_RETRIES": "1",
           "ROOST_SERVING__LOGGING__BACKOFF_S": "0.05",
           "ROOST_SERVING__LOGGING__QUEUE_SIZE": "40"}  # fmt: skip
    servers = serve_champion(settings, tmp_path / "server.log", env=env)
    server = next(servers)
    try:
        with httpx.Client(base_url=server.http_url, timeout=30) as c:
            for _ in range(100):
                r = c.post("/v2/models/sentiment/infer", json=V2)
                assert r.status_code == 200 and r.headers[events.EVENT_ID_HEADER]

            def dropped() -> dict[str, float] | None:
                out: dict[str, float] = {}
                for line in c.get("/metrics").text.splitlines():
                    if line.startswith("roost_payload_events_dropped_total{"):
                        reason = line.split('reason="')[1].split('"')[0]
                        out[reason] = float(line.rsplit(" ", 1)[1])
                # Every one of the 100 requests' 200 events is dropped in the end: those
                # that found the queue full at once, the rest when their send's retries are
                # spent (the queue_full ones alone can reach 160 first).
                return out if sum(out.values()) >= 200 else None

            counts = proc.wait_until(dropped, 60, 0.2, what="all 200 drops to be counted")
        assert counts.get("retries_exhausted", 0) > 0, counts
        assert counts.get("queue_full", 0) + counts["retries_exhausted"] == 200, counts
    finally:
        servers.close()
