"""The servers a bench run compares: roost's predictor and TorchServe, on loopback.

Each server is started (cold start measured: process start -> ready), handed to the loader
once per protocol or request shape (a :class:`~roost.bench.plan.Target`), and stopped before
the next starts, in a ``finally`` on any error too. Logs go under ``work/logs``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from roost import proc, registry, tracking
from roost.bench import h2grpc, loadgen, measure, stream, workload
from roost.bench import torchserve as ts
from roost.bench.plan import Profile, Progress, ServerResult, Target
from roost.config import Settings
from roost.errors import MissingTool, Timeout
from roost.serving import local

AIO_CLIENT = "roost (grpc.aio client)"  # roost's gRPC rows again, loaded by grpc.aio's client


class Servers:
    def __init__(
        self,
        settings: Settings,
        work: Path,
        profile: Profile,
        progress: Progress,
        load: Callable[[Target], None],
    ) -> None:
        self.settings = settings
        self.cfg = settings.bench
        self.work = work
        self.profile = profile
        self.progress = progress
        self.load = load
        self.models_uri_cold_start: float | None = None

    def roost(
        self,
        model: registry.LocalModel,
        name: str,
        version: str,
        texts: list[str],
        expected: workload.Expected,
    ) -> list[ServerResult]:
        p = self.profile
        logs = self.work / "logs"
        env = {"ROOST_SERVING__MODEL_ALIAS": model.alias} if model.alias else {}
        extra = ["--model-version", version]
        cold: list[float] = []
        server: local.LocalServer | None = None
        try:
            for i in range(p.cold_starts):
                if server is not None:
                    server.stop()
                server, seconds = self._start_roost(
                    str(model.path), name, logs / f"roost-{i}.log", env, extra
                )
                cold.append(seconds)
            assert server is not None
            self.progress(f"roost ready: cold start {statistics.median(cold):.2f}s {cold}")
            if p.models_uri_start and model.name and model.version:
                self.models_uri_cold_start = self._models_uri_start(model, logs)
            config = {
                "model_dir": True,
                # Limits: within them the server sizes its batches from the forward cost it
                # measures at load (its log says `batch=` and `wait_ms=`).
                "batching": "limits",
                "max_batch_size": self.settings.serving.max_batch_size,
                "max_batch_wait_ms": self.settings.serving.max_batch_wait_ms,
                "fast_path": self.settings.serving.fast_path,
            }

            def result(protocol: str, per_request: int = 1) -> ServerResult:
                return ServerResult(
                    "roost", protocol, per_request, statistics.median(cold), cold, config
                )

            http = server
            targets = [
                Target(
                    result("rest-v2"),
                    http.process.pid,
                    len(texts),
                    lambda: loadgen.HttpSender(
                        "127.0.0.1", http.http_port, f"/v2/models/{name}/infer",
                        workload.v2_bodies(texts),
                        workload.check_v2(expected, 1, len(texts)), self.cfg.connections,
                    ),
                ),
            ]  # fmt: skip
            if p.grpc:
                targets.append(
                    Target(
                        result("grpc-v2"),
                        http.process.pid,
                        len(texts),
                        lambda: h2grpc.unary(
                            http.grpc_target,
                            workload.grpc_requests(texts, name),
                            workload.check_grpc(expected),
                        ),
                    )
                )
                targets.append(
                    stream.target(result(stream.STREAM_PROTOCOL), http, texts, name, expected)
                )
                if not p.quick and h2grpc.client() == "h2":
                    # The same gRPC rows with grpc.aio's client: what the client costs, side
                    # by side (its CPU per request is in each row).
                    def aio(protocol: str) -> ServerResult:
                        row = result(protocol)
                        row.name = AIO_CLIENT
                        return row

                    requests = workload.grpc_requests(texts, name)
                    targets += [
                        Target(
                            aio("grpc-v2"), http.process.pid, len(texts),
                            lambda: loadgen.GrpcSender(
                                http.grpc_target, requests, workload.check_grpc(expected)
                            ),
                        ),
                        Target(
                            aio(stream.STREAM_PROTOCOL), http.process.pid, len(texts),
                            lambda: stream.GrpcStreamSender(
                                http.grpc_target, requests, workload.check_grpc(expected)
                            ),
                        ),
                    ]  # fmt: skip
            if p.multi_text > 1:
                k = p.multi_text
                groups = len(texts) // k
                targets.append(
                    Target(
                        result("rest-v2", k),
                        http.process.pid,
                        groups,
                        lambda: loadgen.HttpSender(
                            "127.0.0.1", http.http_port, f"/v2/models/{name}/infer",
                            workload.v2_bodies(texts, k), workload.check_v2(expected, k, groups),
                            self.cfg.connections,
                        ),
                    )
                )  # fmt: skip
            for target in targets:
                self.load(target)
            return [t.server for t in targets]
        finally:
            if server is not None:
                server.stop()

    def roost_logging(
        self,
        model: registry.LocalModel,
        name: str,
        version: str,
        texts: list[str],
        expected: workload.Expected,
    ) -> list[ServerResult]:
        """rest-v2 again with payload logging on (sample rate 1.0), twice.

        Same run, same ladder as the plain rest-v2 row, so each row against it gives a cost:

        - ``roost+payload-logging``: what logging costs the predictor. The events go to a
          receiver that takes none of this machine's CPU, as ``roost monitor serve`` on another
          node does in a cluster: Debian's nginx, answering 200 to every batch unread
          (``roost.bench.servers.SINK_CONF``). Without nginx the row says so;
        - ``roost+payload-logging+receiver``: the receiver (``roost monitor serve``, storing
          every event) on the same CPUs as the predictor: the whole pipeline on one machine.
        """
        import shutil
        import sys

        logs = self.work / "logs"
        rows: list[ServerResult] = []
        from roost.rollout.backends.nginx import find_nginx

        try:
            nginx: str | None = find_nginx(shutil.which("nginx") or self.settings.rollout.nginx)
        except MissingTool:
            nginx = None
        if nginx is None:
            rows.append(self._logging_row(model, name, version, texts, expected, None, ""))
        else:
            port = proc.free_port()
            prefix = self.work / "sink"
            (prefix / "logs").mkdir(parents=True, exist_ok=True)
            (prefix / "nginx.conf").write_text(SINK_CONF.format(prefix=prefix, port=port))
            sink = proc.start_background(
                [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")], logs / "sink.log"
            )
            try:
                url = f"http://127.0.0.1:{port}/"
                proc.wait_http(url + "healthz", 30, sink, what="nginx (payload sink)")
                rows.append(
                    self._logging_row(
                        model, name, version, texts, expected, url,
                        "nginx answering 200 unread (a receiver elsewhere)",
                    )
                )  # fmt: skip
            finally:
                sink.stop()
        port = proc.free_port()
        receiver = proc.start_background(
            [sys.executable, "-m", "roost", "monitor", "serve", "--port", str(port),
             "--store", str(self.work / "monitor-store")], logs / "receiver.log",
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            proc.wait_http(url + "/healthz", 60, receiver, what="monitor receiver")
            stored_before = _stored_events(url)
            cpu_before = measure.tree_cpu_s(receiver.pid)
            row = self._logging_row(
                model, name, version, texts, expected, url,
                "roost monitor serve, same machine", suffix="+receiver",
            )  # fmt: skip
            stored = (_stored_events(url) or 0) - (stored_before or 0)
            row.config["receiver_events_stored"] = stored
            if stored > 0:
                cpu = measure.tree_cpu_s(receiver.pid) - cpu_before
                row.config["receiver_cpu_us_per_event"] = round(cpu / stored * 1e6, 1)
            rows.append(row)
        finally:
            receiver.stop()
        return rows

    def _logging_row(
        self,
        model: registry.LocalModel,
        name: str,
        version: str,
        texts: list[str],
        expected: workload.Expected,
        url: str | None,
        receiver: str,
        suffix: str = "",
    ) -> ServerResult:
        logging_cfg = self.settings.serving.logging
        result = ServerResult(
            f"roost+payload-logging{suffix}", "rest-v2", 1, 0.0, [],
            {"payload_logging": {"sample_rate": 1.0, "format": logging_cfg.format,
                                 "batch_size": logging_cfg.batch_size, "receiver": receiver}},
        )  # fmt: skip
        if url is None:
            result.unavailable = "nginx not found (Debian package nginx-light: `make apt-deps`)"
            return result
        env = {"ROOST_SERVING__LOGGING__URL": url, "ROOST_SERVING__LOGGING__SAMPLE_RATE": "1"}
        server, seconds = self._start_roost(
            str(model.path), name, self.work / "logs" / f"roost-logging{suffix}.log", env,
            ["--model-version", version],
        )  # fmt: skip
        result.cold_start_s, result.cold_starts_s = seconds, [seconds]
        try:
            self.load(
                Target(
                    result, server.process.pid, len(texts),
                    lambda: loadgen.HttpSender(
                        "127.0.0.1", server.http_port, f"/v2/models/{name}/infer",
                        workload.v2_bodies(texts), workload.check_v2(expected, 1, len(texts)),
                        self.cfg.connections,
                    ),
                )
            )  # fmt: skip
            result.config["events_dropped"] = _dropped_events(server.http_url)
        finally:
            server.stop()
        return result

    def _start_torchserve(
        self, export: ts.Export, workdir: Path, tuning: ts.Tuning
    ) -> tuple[ts.LocalTorchServe, float]:
        """Start TorchServe and wait until it answers; (server, cold start seconds).

        Its five ports are picked free here, then bound by Java seconds later; a start that
        lost one to another process in between is tried once more on fresh ports."""
        for attempt in (1, 2):
            started = time.perf_counter()
            server = ts.start_local(export, workdir, tuning)
            probe = measure.http_ready(server.url + server.predict_path, "POST", {"text": "ready?"})
            try:
                seconds = measure.wait_ready(
                    probe, started, 180, server.process.alive, server.process.log_tail
                )
                return server, seconds
            except Timeout:
                server.stop()
                if attempt == 2 or not _port_taken(server.process.log_tail(200)):
                    raise
                self.progress("torchserve lost a port to another process at start; once more")
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_roost(
        self,
        uri: str,
        name: str,
        log_file: Path,
        env: dict[str, str],
        extra: list[str],
        tracking_uri: str | None = None,
    ) -> tuple[local.LocalServer, float]:
        started = time.perf_counter()
        server = local.start(
            self.settings, uri, log_file, name=name, env=env, extra_args=extra,
            tracking_uri=tracking_uri,
        )  # fmt: skip
        try:
            seconds = measure.wait_ready(
                measure.http_ready(server.ready_url), started, 120,
                server.process.alive, lambda: server.process.log_tail(5),
            )  # fmt: skip
        except BaseException:
            server.stop()
            raise
        return server, seconds

    def _models_uri_start(self, model: registry.LocalModel, logs: Path) -> float:
        """Cold start from ``models:/NAME/VERSION`` with an empty model cache (a download)."""
        uri = f"models:/{model.name}/{model.version}"
        with tempfile.TemporaryDirectory(prefix="roost-bench-cache-") as state:
            server, seconds = self._start_roost(
                uri, model.name or "model", logs / "roost-models-uri.log",
                {"ROOST_STATE_DIR": state}, [], tracking.resolve_uri(self.settings),
            )  # fmt: skip
            server.stop()
        self.progress(f"roost from {uri} (download included): {seconds:.2f}s")
        return round(seconds, 3)

    def torchserve(
        self, export: ts.Export, texts: list[str], expected: workload.Expected
    ) -> tuple[list[ServerResult], list[dict[str, Any]]]:
        results: list[ServerResult] = []
        for workers in self.profile.ts_workers:
            tuning = ts.Tuning(
                workers=workers,
                batch_size=self.cfg.torchserve_batch_size,
                max_batch_delay_ms=self.cfg.torchserve_max_batch_delay_ms,
            )
            workdir = self.work / "logs" / f"torchserve-w{workers}"
            server, seconds = self._start_torchserve(export, workdir, tuning)
            try:
                self.progress(f"torchserve (workers={workers}) ready: cold start {seconds:.2f}s")
                result = ServerResult(
                    "torchserve", "rest", 1, seconds, [seconds],
                    {"workers": workers, "batch_size": tuning.batch_size,
                     "max_batch_delay_ms": tuning.max_batch_delay_ms,
                     "threads_per_worker": tuning.threads_per_worker,
                     "logging": "warnings only (as roost)"},
                )  # fmt: skip
                self.load(
                    Target(
                        result,
                        server.process.pid,
                        len(texts),
                        partial(
                            loadgen.HttpSender, "127.0.0.1", server.inference_port,
                            server.predict_path, workload.ts_bodies(texts),
                            workload.check_ts(expected), self.cfg.connections,
                        ),
                    )
                )  # fmt: skip
                results.append(result)
            finally:
                server.stop()
        sweep = [
            {**r.config, "max_rps_p99_50ms": round(r.max_rps, 1), "cold_start_s": r.cold_start_s}
            for r in results
        ]
        best = max(results, key=lambda r: (r.max_rps, -r.config["workers"]))
        return [best], sweep


# nginx as a payload sink: it reads each batch, answers 200 and keeps nothing.
SINK_CONF = """daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  client_max_body_size 64m;
  client_body_buffer_size 4m;
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type application/json; return 200 '{{"stored":0,"duplicates":0}}'; }}
  }}
}}
"""


def _port_taken(log: str) -> bool:
    """TorchServe died because a port picked free was bound by someone else meanwhile."""
    return any(m in log for m in ("Address already in use", "BindException", "ServerImpl.start"))


def _stored_events(url: str) -> int | None:
    """What a receiver has stored so far (its /healthz)."""
    import httpx

    try:
        return int(httpx.get(url + "/healthz", timeout=10).json()["stored"])
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def _dropped_events(url: str) -> float | None:
    """``roost_payload_events_dropped_total`` of a server (all reasons), from its /metrics."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("roost_payload_events_dropped_total{")
    )
