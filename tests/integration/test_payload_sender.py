"""The predictor's payload sender against a real HTTP server on loopback.

The server is the standard library's ``ThreadingHTTPServer`` with a handler that records
each POST and answers from a script (statuses, or closing the connection), so each of the
sender's paths runs for real: batched and binary bodies, keep-alive reuse and reconnects,
retries of transient answers, and drops that are counted by reason.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
from prometheus_client import REGISTRY

from roost import proc
from roost.config import PayloadLoggingSettings
from roost.monitor import events
from roost.monitor.payload import Item, PayloadLogger, Poster

pytestmark = pytest.mark.integration


class Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: list[int | str]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script = script  # statuses to answer in turn (then 200); "close": drop the socket
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.connections: set[int] = set()
        self.lock = threading.Lock()
        self.release = threading.Event()  # what a "hold" step waits for before answering

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/events?x=1"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver
    server: Recorder

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        with self.server.lock:
            self.server.connections.add(self.client_address[1])
            step = self.server.script.pop(0) if self.server.script else 200
        if step == "hold":
            self.server.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.server.release.wait(30)
            step = "held"
        with self.server.lock:
            if step == "close":
                self.close_connection = True
                self.connection.close()
                return
            assert self.path == "/events?x=1"
            if step != "held":
                self.server.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
            step = 200 if step == "held" else step
        answer = b'{"stored":1}' if step == 200 else b'{"error":"no"}'
        self.send_response(int(step))
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder(request: pytest.FixtureRequest) -> Iterator[Recorder]:
    server = Recorder(list(getattr(request, "param", [])))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def logger(url: str, **cfg: object) -> PayloadLogger:
    base = {"url": url, "flush_interval_s": 0.02, "backoff_s": 0.01, "max_backoff_s": 0.02}
    return PayloadLogger(PayloadLoggingSettings(**{**base, **cfg}), "sentiment", "7")


def dropped(reason: str) -> float:
    labels = {"model": "sentiment", "version": "7", "reason": reason}
    return REGISTRY.get_sample_value("roost_payload_events_dropped_total", labels) or 0.0


def test_batch_body_is_the_structured_events_json() -> None:
    """The bytes the sender writes parse to what events.batch_body gives for the same events."""
    sender = logger("http://127.0.0.1:9/")
    items: list[Item] = [
        ("plain-1", events.REQUEST_TYPE, 1796170000.123456, b'{"inputs":[]}'),
        ('q"uo\\te é', events.RESPONSE_TYPE, 1796170000.999999, lambda: b'{"outputs":[1]}'),
        ("next-second", events.REQUEST_TYPE, 1796170001.5, b"[]"),
    ]
    mine = orjson.loads(sender.batch_body(items))
    reference = orjson.loads(events.batch_body([sender._event(i) for i in items]))
    assert mine == reference
    assert [e["time"] for e in mine] == [
        "2026-12-02T00:06:40.123456Z", "2026-12-02T00:06:40.999999Z", "2026-12-02T00:06:41.500000Z"
    ]  # fmt: skip
    # and the receiver's parser takes it back, event for event
    back = events.from_http({"content-type": events.BATCH_CONTENT}, sender.batch_body(items))
    assert [(e.id, e.type, e.attributes[events.VERSION_EXTENSION]) for e in back] == [
        (i[0], i[1], "7") for i in items
    ]
    assert orjson.loads(sender.batch_body([])) == []


def test_batched_events_arrive_and_a_5xx_is_retried(recorder: Recorder) -> None:
    recorder.script[:] = [503]
    sender = logger(recorder.url, batch_size=64)
    sender.start()
    try:
        for i in range(50):
            sender.log(f"id-{i}", b'{"inputs":[]}', b'{"outputs":[]}')
        proc.wait_until(lambda: sender.sent == 100 or None, 30, 0.02, what="100 events sent")
    finally:
        sender.close()
    ids = [(e["id"], e["type"]) for _, body in recorder.posts for e in orjson.loads(body)]
    assert sorted(set(ids)) == sorted(
        (f"id-{i}", t) for i in range(50) for t in (events.REQUEST_TYPE, events.RESPONSE_TYPE)
    )
    assert all(h["content-type"] == events.BATCH_CONTENT for h, _ in recorder.posts)
    assert len(recorder.connections) == 1  # one keep-alive connection for every POST


def test_events_queued_during_a_send_wait_for_a_whole_batch(recorder: Recorder) -> None:
    """Under steady load the sender fills batches; it does not post whatever a send left."""
    recorder.script[:] = ["hold"]  # the first POST is answered only when the test says so
    sender = logger(recorder.url, batch_size=64, flush_interval_s=60)
    sender.start()
    try:
        for i in range(32):  # 64 events: a whole batch, sent at once
            sender.log(f"a-{i}", b"{}", b"{}")
        proc.wait_until(lambda: len(recorder.posts) == 1 or None, 30, 0.01, what="POST 1")
        for i in range(3):  # arrive while that POST is in flight
            sender.log(f"b-{i}", b"{}", b"{}")
        recorder.release.set()
        proc.wait_until(lambda: sender.sent == 64 or None, 30, 0.01, what="batch 1 acked")
        for i in range(3, 32):  # the batch fills up: 6 + 58 events
            sender.log(f"b-{i}", b"{}", b"{}")
        proc.wait_until(lambda: sender.sent == 128 or None, 30, 0.01, what="batch 2 acked")
    finally:
        sender.close()
    assert [len(orjson.loads(body)) for _, body in recorder.posts] == [64, 64]


def test_binary_mode_sends_kserve_headers_and_survives_a_dropped_connection(
    recorder: Recorder,
) -> None:
    recorder.script[:] = ["close"]  # the first POST's connection is cut without an answer
    sender = logger(recorder.url, format="binary")
    sender.start()
    try:
        sender.log("b-1", b'{"inputs":[]}', b'{"outputs":[]}')
        proc.wait_until(lambda: sender.sent == 2 or None, 30, 0.02, what="2 events sent")
    finally:
        sender.close()
    sent = [(h["ce-id"], h["ce-type"], h["ce-modelversion"], body) for h, body in recorder.posts]
    assert sent == [
        ("b-1", events.REQUEST_TYPE, "7", b'{"inputs":[]}'),
        ("b-1", events.RESPONSE_TYPE, "7", b'{"outputs":[]}'),
    ]


def test_a_4xx_is_dropped_as_rejected_and_an_unreachable_receiver_as_exhausted(
    recorder: Recorder,
) -> None:
    recorder.script[:] = [400]
    rejected, exhausted = dropped("rejected"), dropped("retries_exhausted")
    sender = logger(recorder.url, max_retries=1)
    sender.start()
    try:
        sender.log("r-1", b"{}", b"{}")
        proc.wait_until(lambda: dropped("rejected") == rejected + 2 or None, 30, 0.02,
                        what="the rejected batch to be counted")  # fmt: skip
    finally:
        sender.close()
    assert sender.sent == 0
    gone = logger(f"http://127.0.0.1:{proc.free_port()}/", max_retries=1, format="binary")
    gone.start()
    try:
        for i in range(3):
            gone.log(f"g-{i}", b"{}", b"{}")
        proc.wait_until(lambda: dropped("retries_exhausted") == exhausted + 6 or None, 30, 0.02,
                        what="the six undeliverable events to be counted")  # fmt: skip
    finally:
        gone.close()


def test_poster_refuses_a_url_that_is_not_http() -> None:
    with pytest.raises(ValueError, match=r"serving\.logging\.url: expected an http"):
        Poster("ftp://example/", 1.0)
