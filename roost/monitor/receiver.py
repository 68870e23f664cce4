"""``roost monitor serve``: the HTTP receiver of inference events and ground-truth feedback.

Routes:

- ``POST /`` (and ``/v1/events``): CloudEvents in binary, structured or batched mode, as
  KServe's logger agent and roost's predictor send them. 200 ``{"stored": n,
  "duplicates": m}`` once every event is fsync'd to the journal; 4xx with ``{"error": ...}``
  for an event it cannot take (missing ``ce-id``, unknown ``ce-type``, a body that is not
  JSON, 413 over ``monitor.max_body_bytes``), and nothing of that request is stored.
- ``POST /v1/feedback``: ``{"feedback": [{"id": ..., "label": ...}, ...]}`` true labels
  for logged events (the id is the ``x-roost-event-id`` / v2 response ``id``).
- ``POST /v1/flush``: close the journal segment and compact it now (tests, reports).
- ``PUT /v1/drift``: a report's statistics, published as the ``roost_drift_*`` gauges.
- ``GET /v1/tail?after=SEQ&limit=N&model=M&since=T``: the latest events, numbered (``tail.py``);
  a rollout's shadow phase follows the champion's traffic with it.
- ``GET /healthz``, ``GET /metrics`` (Prometheus).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from roost.monitor import events
from roost.monitor.journal import Journal, Record
from roost.monitor.tail import Tail

log = logging.getLogger(__name__)

DRIFT_GAUGES = {
    "js_distance": "Jensen-Shannon distance (base 2) of predicted labels, window vs reference.",
    "confidence_shift": "Mean confidence of the window less the reference's.",
    "length_psi": "Population stability index of text lengths, window vs reference.",
    "unseen_token_rate": "Share of the window's tokens the model's vocabulary lacks.",
    "events": "Inferences (texts) in the last evaluated window.",
}


class Metrics:
    """The receiver's own registry (so ``/metrics`` shows only the monitor's series)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stored = Counter(
            "roost_monitor_events_total", "Events stored (fsync'd).", ["type"], registry=r
        )
        self.duplicates = Counter(
            "roost_monitor_duplicates_total", "Redelivered events stored once.", registry=r
        )
        self.rejected = Counter(
            "roost_monitor_rejected_total", "Requests answered 4xx.", ["status"], registry=r
        )
        self.feedback = Counter(
            "roost_monitor_feedback_total", "Feedback labels stored.", registry=r
        )
        self.commit = Histogram(
            "roost_monitor_append_seconds", "Time from receipt to acknowledgement.", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )  # fmt: skip
        self.drift = {
            name: Gauge(f"roost_drift_{name}", doc, ["model", "version"], registry=r)
            for name, doc in DRIFT_GAUGES.items()
        }
        self.breached = Gauge(
            "roost_drift_breached",
            "1 when the last evaluated window breached a drift threshold.",
            ["model", "version", "statistic"],
            registry=r,
        )
        self.accuracy = Gauge(
            "roost_live_accuracy", "Accuracy on feedback labels, last window.",
            ["model", "version"], registry=r,
        )  # fmt: skip
        self.macro_f1 = Gauge(
            "roost_live_macro_f1", "Macro-F1 on feedback labels, last window.",
            ["model", "version"], registry=r,
        )  # fmt: skip
        self.labels = Gauge(
            "roost_live_labels", "Feedback labels behind the live accuracy, last window.",
            ["model", "version"], registry=r,
        )  # fmt: skip


def _error(message: str, status: int, metrics: Metrics) -> JSONResponse:
    metrics.rejected.labels(status=str(status)).inc()
    return JSONResponse({"error": message}, status_code=status)


def parse_feedback(doc: Any) -> list[tuple[str, str]]:
    """[(id, label)] from a feedback document; raises EventError naming the bad field."""
    items = doc.get("feedback") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not items:
        raise events.EventError("feedback: expected a non-empty list of {id, label}", 422)
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise events.EventError(f"feedback[{i}]: expected an object with id and label", 422)
        for field in ("id", "label"):
            value = item.get(field)
            if not isinstance(value, str) or not value:
                raise events.EventError(f"feedback[{i}].{field}: required (a string)", 422)
        out.append((item["id"], item["label"]))
    return out


def create_app(
    root: Path,
    max_body_bytes: int,
    segment_s: float,
    segment_bytes: int,
    store: str | None = None,
    dedupe_window_s: float = 3600.0,
) -> Starlette:
    """The receiver app: its journal under ``root``, Parquet parts in ``store`` (default:
    ``root``; a directory or ``s3://``). Opened on start-up, closed on shutdown."""
    from roost.serving.guard import BodyLimit

    journal = Journal(
        root, segment_bytes=segment_bytes, segment_s=segment_s, store=store,
        dedupe_window_s=dedupe_window_s,
    )  # fmt: skip
    metrics = Metrics()
    tail = Tail()

    async def ingest(request: Request) -> Response:
        start = time.perf_counter()
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            batch = events.from_http(headers, body)
        except events.EventError as exc:
            return _error(str(exc), exc.status, metrics)
        received = time.time()
        records = [Record.of_event(e, received) for e in batch]
        stored, duplicates = await journal.append(records)
        tail.add(records)
        requests = sum(1 for e in batch if e.type == events.REQUEST_TYPE)
        if requests:
            metrics.stored.labels(type="request").inc(requests)
        if len(batch) > requests:
            metrics.stored.labels(type="response").inc(len(batch) - requests)
        if duplicates:
            metrics.duplicates.inc(duplicates)
        metrics.commit.observe(time.perf_counter() - start)
        return JSONResponse({"stored": stored, "duplicates": duplicates})

    async def feedback(request: Request) -> Response:
        try:
            pairs = parse_feedback(orjson.loads(await request.body()))
        except orjson.JSONDecodeError:
            return _error("request body: not a JSON document", 400, metrics)
        except events.EventError as exc:
            return _error(str(exc), exc.status, metrics)
        received = time.time()
        stored, duplicates = await journal.append(
            Record.feedback(i, label, received) for i, label in pairs
        )
        metrics.feedback.inc(stored)
        return JSONResponse({"stored": stored, "duplicates": duplicates})

    async def flush(_: Request) -> Response:
        try:
            await asyncio.get_running_loop().run_in_executor(None, journal.flush)
        except Exception as exc:  # the store is down: the journal keeps every event
            log.warning("flush: compaction failed: %s", exc)
            return _error(f"store: compaction failed, the journal keeps the events: {exc}",
                          503, metrics)  # fmt: skip
        return JSONResponse({"stored": journal.stored, "segments": journal.compacted_segments})

    async def drift(request: Request) -> Response:
        try:
            doc = orjson.loads(await request.body())
            publish(metrics, doc)
        except orjson.JSONDecodeError:
            return _error("request body: not a JSON document", 400, metrics)
        except (KeyError, TypeError, ValueError) as exc:
            return _error(f"drift report: {exc}", 422, metrics)
        return JSONResponse({"ok": True})

    async def recent(request: Request) -> Response:
        query = request.query_params
        try:
            after, limit = int(query.get("after", "0")), int(query.get("limit", "1000"))
            since = float(query.get("since", "0"))
        except ValueError:
            return _error("after, limit: integers expected; since: a number", 400, metrics)
        doc = tail.read(after, limit, query.get("model"), since)
        return Response(orjson.dumps(doc), media_type="application/json")

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok", "stored": journal.stored})

    async def prometheus(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await asyncio.get_running_loop().run_in_executor(None, journal.open)
        yield
        await asyncio.get_running_loop().run_in_executor(None, journal.close)

    app = Starlette(
        routes=[
            Route("/", ingest, methods=["POST"]),
            Route("/v1/events", ingest, methods=["POST"]),
            Route("/v1/feedback", feedback, methods=["POST"]),
            Route("/v1/flush", flush, methods=["POST"]),
            Route("/v1/drift", drift, methods=["PUT"]),
            Route("/v1/tail", recent, methods=["GET"]),
            Route("/healthz", health, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.state.journal = journal
    app.state.metrics = metrics
    return app


def publish(metrics: Metrics, doc: dict[str, Any]) -> None:
    """Set the drift/accuracy gauges from the last window of a report (``report.as_dict``)."""
    model, version = str(doc["model"]), str(doc["version"])
    windows = doc["windows"]
    if not windows:
        return
    last = windows[-1]
    stats = last["statistics"]
    for name, gauge in metrics.drift.items():
        value = last["events"] if name == "events" else (stats.get(name) or {}).get("value")
        if value is not None:
            gauge.labels(model=model, version=version).set(float(value))
    for name, stat in stats.items():
        metrics.breached.labels(model=model, version=version, statistic=name).set(
            1.0 if stat.get("status") == "breach" else 0.0
        )
    live = last.get("live") or {}
    if live.get("accuracy") is not None:
        metrics.accuracy.labels(model=model, version=version).set(live["accuracy"])
        metrics.macro_f1.labels(model=model, version=version).set(live["macro_f1"])
        metrics.labels.labels(model=model, version=version).set(live["labels"])


def serve(
    root: Path,
    host: str,
    port: int,
    max_body_bytes: int,
    segment_s: float,
    segment_bytes: int,
    store: str | None = None,
    dedupe_window_s: float = 3600.0,
) -> None:
    import uvicorn

    app = create_app(root, max_body_bytes, segment_s, segment_bytes, store, dedupe_window_s)
    # Each batch allocates a few thousand short-lived containers (parsed events, records), so
    # the cyclic collector's default (a young collection per 700 allocations) ran constantly
    # and scanned the long-lived tail and key set: 116 -> 66 CPU us per stored event with a
    # 100,000-allocation young generation (`python -m roost.monitor.bench --sender 40000`
    # against a receiver started each way). Reference counting still frees nearly all of it.
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    log.info("monitor receiver journal=%s store=%s http=%s:%d", root, store or root, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
