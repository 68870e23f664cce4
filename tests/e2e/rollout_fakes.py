"""Loopback stand-ins for what cannot run here: a Kubernetes API server with KServe, Prometheus.

Both are real HTTP servers on 127.0.0.1, so the real ``kubernetes`` client and ``httpx`` talk
to them over the wire. :class:`FakeKube` starts from a recorded InferenceService
(``tests/fixtures/rollout/isvc-sentiment.json``) and behaves like the API server for the calls
the rollout makes: GET, server-side apply (per-field-manager merge, so a field a manager stops
applying disappears; ``metadata.resourceVersion`` as a precondition answered with the recorded
409 ``Status``), and pod lists. It also plays KServe: one GET after a spec change it creates a
revision for a new ``storageUri`` and splits ``status...traffic`` by ``canaryTrafficPercent``.

:class:`FakePrometheus` answers ``/api/v1/query`` with counters that grow with wall time, split
between the champion's and the challenger's pods by the traffic KServe reports, each version
behaving as the test says (error rate, label shares). It can be taken down and brought back.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rollout"
ISVC_PATH = "/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices/{name}"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def merge(base: Any, patch: Any) -> Any:
    """Structural merge as server-side apply does it: maps by key, lists of named items by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        if all(isinstance(i, dict) and "name" in i for i in [*base, *patch]):
            out_list = [copy.deepcopy(i) for i in base]
            for item in patch:
                index = next((n for n, b in enumerate(out_list) if b["name"] == item["name"]), None)
                if index is None:
                    out_list.append(copy.deepcopy(item))
                else:
                    out_list[index] = merge(out_list[index], item)
            return out_list
        return copy.deepcopy(patch)
    return copy.deepcopy(patch)


class _Server:
    def __init__(self, handler: Callable[[BaseHTTPRequestHandler, str], None]) -> None:
        self.handler = handler
        self.port = 0
        self.httpd: ThreadingHTTPServer | None = None

    def up(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.handler(self, "GET")

            def do_PATCH(self) -> None:
                outer.handler(self, "PATCH")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _reply(handler: BaseHTTPRequestHandler, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@dataclass
class Patch:
    manager: str
    body: dict[str, Any]
    status: int


class FakeKube:
    """One InferenceService (and its pods) behind a loopback Kubernetes API."""

    def __init__(self, namespace: str = "roost", name: str = "sentiment") -> None:
        self.namespace, self.name = namespace, name
        self.base = fixture("isvc-sentiment.json")
        self.applied: dict[str, dict[str, Any]] = {}  # field manager -> its last apply
        self.resource_version = int(self.base["metadata"]["resourceVersion"])
        self.generation = int(self.base["metadata"]["generation"])
        self.status = copy.deepcopy(self.base["status"])
        self.revisions: dict[str, str] = {self._uri(self.base): "sentiment-predictor-00003"}
        self.rolled_out = "sentiment-predictor-00003"
        self.pending_reconcile = False
        self.patches: list[Patch] = []
        self.faults: list[tuple[str, int, str]] = []  # (manager, status, fixture) for next patch
        self.pods = fixture("pods-predictor.json")
        self.lock = threading.Lock()
        self.server = _Server(self._handle)
        self.server.up()

    @staticmethod
    def _uri(obj: dict[str, Any]) -> str:
        return str(obj["spec"]["predictor"]["model"]["storageUri"])

    def object(self) -> dict[str, Any]:
        obj: dict[str, Any] = copy.deepcopy(self.base)
        for manifest in self.applied.values():
            obj["metadata"] = merge(obj["metadata"], manifest.get("metadata") or {})
            if "spec" in manifest:
                obj["spec"] = merge(obj["spec"], manifest["spec"])
        obj["metadata"]["resourceVersion"] = str(self.resource_version)
        obj["metadata"]["generation"] = self.generation
        obj["status"] = copy.deepcopy(self.status)
        return obj

    def _reconcile(self) -> None:
        """KServe: revision per storage URI, traffic split by canaryTrafficPercent."""
        obj = self.object()
        predictor = obj["spec"]["predictor"]
        uri = self._uri(obj)
        if uri not in self.revisions:
            self.revisions[uri] = f"sentiment-predictor-{len(self.revisions) + 3:05d}"
        latest = self.revisions[uri]
        percent = predictor.get("canaryTrafficPercent")
        comp = self.status["components"]["predictor"]
        comp["latestCreatedRevision"] = comp["latestReadyRevision"] = latest
        if percent is None or latest == self.rolled_out:
            if latest != self.rolled_out:
                comp["previousRolledoutRevision"], self.rolled_out = self.rolled_out, latest
            comp["latestRolledoutRevision"] = self.rolled_out
            comp["traffic"] = [{"latestRevision": True, "percent": 100, "revisionName": latest}]
        else:
            comp["traffic"] = [
                {"latestRevision": True, "percent": int(percent),
                 "revisionName": latest, "tag": "latest"},
                {"latestRevision": False, "percent": 100 - int(percent),
                 "revisionName": self.rolled_out, "tag": "prev"},
            ]  # fmt: skip
        self.status["observedGeneration"] = self.generation

    def version_of(self, revision: str) -> str:
        uri = next(u for u, r in self.revisions.items() if r == revision)
        return uri.rstrip("/").rsplit("/", 1)[1]

    def split(self) -> dict[str, int]:
        """Current traffic percent per model version (what KServe routes)."""
        with self.lock:
            traffic = self.status["components"]["predictor"]["traffic"]
            return {self.version_of(t["revisionName"]): int(t["percent"]) for t in traffic}

    def weights_applied(self, manager: str = "roost-rollout") -> list[int | None]:
        return [
            p.body["spec"]["predictor"].get("canaryTrafficPercent")
            for p in self.patches
            if p.manager == manager and p.status == 200
        ]

    def annotations(self) -> dict[str, str]:
        with self.lock:
            return dict(self.object()["metadata"].get("annotations") or {})

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(handler.path)
        isvc = ISVC_PATH.format(ns=self.namespace, name=self.name)
        with self.lock:
            if url.path == f"/api/v1/namespaces/{self.namespace}/pods" and method == "GET":
                _reply(handler, 200, self.pods)
            elif url.path != isvc:
                _reply(handler, 404, fixture("status-404-not-found.json"))
            elif method == "GET":
                if self.pending_reconcile:
                    self.pending_reconcile = False
                    self._reconcile()
                _reply(handler, 200, self.object())
            else:
                self._patch(handler, parse_qs(url.query))

    def _patch(self, handler: BaseHTTPRequestHandler, query: dict[str, list[str]]) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = yaml.safe_load(handler.rfile.read(length))
        manager = query.get("fieldManager", [""])[0]
        assert handler.headers.get("Content-Type", "").startswith("application/apply-patch")
        fault = next((f for f in self.faults if f[0] == manager), None)
        if fault is not None:
            self.faults.remove(fault)
            self.patches.append(Patch(manager, body, fault[1]))
            _reply(handler, fault[1], fixture(fault[2]))
            return
        expected = (body.get("metadata") or {}).get("resourceVersion")
        if expected is not None and str(expected) != str(self.resource_version):
            self.patches.append(Patch(manager, body, 409))
            _reply(handler, 409, fixture("status-409-conflict.json"))
            return
        before = self.object()["spec"]
        body.get("metadata", {}).pop("resourceVersion", None)
        self.applied[manager] = body
        self.resource_version += 1
        if self.object()["spec"] != before:
            self.generation += 1
            self.pending_reconcile = True
        self.patches.append(Patch(manager, body, 200))
        _reply(handler, 200, self.object())

    def close(self) -> None:
        self.server.down()


@dataclass
class Behaviour:
    error_rate: float = 0.0
    shares: dict[str, float] = field(
        default_factory=lambda: {"negative": 0.5, "neutral": 0.3, "positive": 0.2}
    )
    latency_s: float = 0.004
    confidence: float = 0.8


class FakePrometheus:
    """Prometheus' instant-query API over counters driven by KServe's traffic split."""

    buckets = ("0.001", "0.005", "0.01", "0.05", "0.1", "0.5", "1", "+Inf")

    def __init__(self, kube: FakeKube, rps: float = 200.0, model: str = "sentiment") -> None:
        self.kube, self.rps, self.model = kube, rps, model
        self.behaviour: dict[str, Behaviour] = {}
        self.counters: dict[tuple[tuple[str, str], ...], float] = {}
        self.last = time.monotonic()
        self.queries: list[str] = []
        self.lock = threading.Lock()
        self.server = _Server(self._handle)
        self.server.up()

    @property
    def url(self) -> str:
        return self.server.url

    def down(self) -> None:
        self.server.down()

    def up(self) -> None:
        self.server.up()

    def _add(self, value: float, **labels: str) -> None:
        key = tuple(sorted({"model": self.model, "namespace": "roost", **labels}.items()))
        self.counters[key] = self.counters.get(key, 0.0) + value

    def _advance(self) -> None:
        now = time.monotonic()
        seconds, self.last = now - self.last, now
        for version, percent in self.kube.split().items():
            n = self.rps * seconds * percent / 100
            if n <= 0:
                continue
            b = self.behaviour.get(version, Behaviour())
            pod = {"pod": f"sentiment-predictor-v{version}", "version": version}
            ok = n * (1 - b.error_rate)
            self._add(ok, __name__="roost_inference_requests_total", outcome="ok", **pod)
            self._add(n - ok, __name__="roost_inference_requests_total", outcome="error", **pod)
            for le in self.buckets:
                share = 1.0 if le == "+Inf" or float(le) >= b.latency_s else 0.0
                self._add(ok * share, __name__="roost_inference_seconds_bucket", le=le, **pod)
            for label, fraction in b.shares.items():
                self._add(ok * fraction, __name__="roost_predictions_total", label=label, **pod)
            self._add(ok * b.confidence, __name__="roost_prediction_confidence_sum", **pod)
            self._add(ok, __name__="roost_prediction_confidence_count", **pod)

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(handler.path)
        if url.path != "/api/v1/query":
            _reply(handler, 404, {"status": "error", "error": "not found"})
            return
        query = parse_qs(url.query).get("query", [""])[0]
        with self.lock:
            self.queries.append(query)
            if "__name__=~" not in query or f'model="{self.model}"' not in query:
                _reply(handler, 400, fixture("prometheus-error.json"))
                return
            self._advance()
            template = fixture("prometheus-query.json")
            stamp = time.time()
            template["data"]["result"] = [
                {"metric": dict(key), "value": [stamp, repr(value)]}
                for key, value in self.counters.items()
            ]
        _reply(handler, 200, template)

    def close(self) -> None:
        self.server.down()
