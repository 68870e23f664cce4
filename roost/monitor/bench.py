"""Receiver throughput: how many events per second ``roost monitor serve`` stores here.

``python -m roost.monitor.bench [--url URL] [--seconds 10] [--concurrency 16] [--batch 1]``
starts a receiver on a free port over a temporary store (unless ``--url`` names one), sends
request/response events (binary mode with ``--batch 1``, the batched mode otherwise) from
``--concurrency`` keep-alive connections for ``--seconds``, and prints one JSON document:
events acknowledged (each one fsync'd) per second, the acknowledgement latency, and (for a
receiver it started) the receiver's CPU microseconds per stored event, compaction included.
The client runs on the same machine and shares its CPUs: the rate is a floor.

``--sender N`` measures the other end instead: the predictor's sender
(:class:`roost.monitor.payload.PayloadLogger`) queues N inferences (2N events) and delivers
them to the receiver; it prints the CPU microseconds per event spent in this process (queueing,
encoding, posting: what payload logging takes from a model server's GIL).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from roost import proc
from roost.bench import measure
from roost.monitor import events

RESPONSE = orjson.dumps(
    {"model_name": "bench", "model_version": "1", "id": "x", "parameters": {"labels": "a,b,c"},
     "outputs": [{"name": "label", "shape": [1], "datatype": "BYTES", "data": ["a"]},
                 {"name": "probabilities", "shape": [1, 3], "datatype": "FP32",
                  "data": [0.5288599133491516, 0.3766072988510132, 0.09453273564577103]},
                 {"name": "confidence", "shape": [1], "datatype": "FP32",
                  "data": [0.5288599133491516]}]}
)  # fmt: skip


def _sender(url: str, inferences: int) -> dict[str, Any]:
    """CPU of this process per event while a PayloadLogger queues and delivers ``inferences``."""
    from roost.config import PayloadLoggingSettings
    from roost.monitor.payload import PayloadLogger

    cfg = PayloadLoggingSettings(url=url, queue_size=max(2 * inferences, 10_000))
    logger = PayloadLogger(cfg, "bench", "1")
    cpu, wall = time.process_time(), time.perf_counter()
    logger.start()
    for _ in range(inferences):
        logger.log(logger.event_id(), BODY, RESPONSE)
    proc.wait_until(lambda: logger.sent >= 2 * inferences or None, 600, 0.01,
                    describe=lambda: f"{logger.sent} of {2 * inferences} sent")  # fmt: skip
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    logger.close()
    return {
        "events_sent": logger.sent,
        "seconds": round(wall, 2),
        "sender_cpu_us_per_event": round(cpu / logger.sent * 1e6, 2),
        "batch_size": cfg.batch_size,
        "format": cfg.format,
    }


BODY = orjson.dumps(
    {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                 "data": ["the flight was late but the crew were lovely"]}]}
)  # fmt: skip


def _send(url: str, seconds: float, concurrency: int, batch: int) -> dict[str, Any]:
    """``concurrency`` threads, each with a keep-alive connection, sending until ``seconds``.

    Threads with synchronous clients: httpx's AsyncClient managed a tenth of the rate here.
    """
    latencies: list[float] = []
    acked = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker(k: int) -> None:
        kinds = [events.REQUEST_TYPE, events.RESPONSE_TYPE] * max(1, batch // 2)
        i = 0
        with httpx.Client(timeout=30) as client:
            while time.perf_counter() < deadline:
                batch_events = []
                for kind in kinds[:batch]:
                    i += 1
                    batch_events.append(
                        events.Event(
                            f"bench-{k}-{i}",
                            kind,
                            "/bench",
                            events.now_rfc3339(),
                            BODY,
                            {"inferenceservicename": "bench"},
                        )
                    )
                if batch == 1:
                    content, headers = BODY, events.binary_headers(batch_events[0])
                else:
                    content = events.batch_body(batch_events)
                    headers = {"content-type": events.BATCH_CONTENT}
                start = time.perf_counter()
                response = client.post(url, content=content, headers=headers)
                took = time.perf_counter() - start
                if response.status_code == 200:
                    with lock:
                        acked[0] += response.json()["stored"]
                        latencies.append(took)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "events_stored": acked[0],
        "seconds": round(elapsed, 2),
        "events_per_s": round(acked[0] / elapsed, 1),
        "requests": len(latencies),
        "ack_p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
        "ack_p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 2)
        if latencies
        else None,
        "concurrency": concurrency,
        "events_per_request": batch,
        "mode": "binary" if batch == 1 else "batch",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m roost.monitor.bench", description=__doc__)
    parser.add_argument("--url", help="a running receiver (default: start one)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1, help="events per request (1: binary)")
    parser.add_argument("--sender", type=int, metavar="N", help="time the sender on N inferences")
    args = parser.parse_args(argv)
    server = None
    url = args.url
    with tempfile.TemporaryDirectory() as tmp:
        if url is None:
            port = proc.free_port()
            server = proc.start_background(
                [sys.executable, "-m", "roost", "monitor", "serve", "--port", str(port),
                 "--store", str(Path(tmp) / "store")], Path(tmp) / "receiver.log",
            )  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            proc.wait_http(url + "/healthz", 60, server, what="monitor receiver")
        try:
            cpu = measure.tree_cpu_s(server.pid) if server is not None else None
            if args.sender:
                result = _sender(url, args.sender)
                stored = result["events_sent"]
            else:
                result = _send(url, args.seconds, args.concurrency, args.batch)
                stored = result["events_stored"]
            if server is not None and cpu is not None and stored:
                # the compactor turns the journal into Parquet in the background: include it
                httpx.post(url + "/v1/flush", timeout=120).raise_for_status()
                used = measure.tree_cpu_s(server.pid) - cpu
                result["receiver_cpu_us_per_event"] = round(used / stored * 1e6, 2)
        finally:
            if server is not None:
                server.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
