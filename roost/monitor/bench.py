"""Receiver throughput: how many events per second ``roost monitor serve`` stores here.

``python -m roost.monitor.bench [--url URL] [--seconds 10] [--concurrency 32] [--batch 1]``
starts a receiver on a free port over a temporary store (unless ``--url`` names one), sends
request/response events (binary mode with ``--batch 1``, the batched mode otherwise) from
``--concurrency`` keep-alive connections for ``--seconds``, and prints one JSON document:
events acknowledged (each one fsync'd) per second, and the acknowledgement latency.
The client runs on the same machine and shares its CPUs: the number is a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from roost import proc
from roost.monitor import events

BODY = orjson.dumps(
    {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                 "data": ["the flight was late but the crew were lovely"]}]}
)  # fmt: skip


async def _send(url: str, seconds: float, concurrency: int, batch: int) -> dict[str, Any]:
    latencies: list[float] = []
    acked = 0
    deadline = time.perf_counter() + seconds
    counter = iter(range(1 << 62))

    def event(kind: str) -> events.Event:
        return events.Event(f"bench-{next(counter)}", kind, "/bench", events.now_rfc3339(),
                            BODY, {"inferenceservicename": "bench"})  # fmt: skip

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal acked
        while time.perf_counter() < deadline:
            kinds = [events.REQUEST_TYPE, events.RESPONSE_TYPE] * max(1, batch // 2)
            batch_events = [event(k) for k in kinds[:batch]]
            if batch == 1:
                content, headers = BODY, events.binary_headers(batch_events[0])
            else:
                content = events.batch_body(batch_events)
                headers = {"content-type": events.BATCH_CONTENT}
            start = time.perf_counter()
            response = await client.post(url, content=content, headers=headers)
            if response.status_code == 200:
                acked += response.json()["stored"]
                latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "events_stored": acked,
        "seconds": round(elapsed, 2),
        "events_per_s": round(acked / elapsed, 1),
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
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="events per request (1: binary)")
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
            result = asyncio.run(_send(url, args.seconds, args.concurrency, args.batch))
        finally:
            if server is not None:
                server.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
