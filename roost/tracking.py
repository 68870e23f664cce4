"""The MLflow tracking server: the embedded one (start, health, pid, stop) and URI discovery.

``roost mlflow up`` starts ``mlflow server`` in the background with a SQLite backend store and
an artifact root under ``state_dir/mlflow`` and records its pid and URI in
``state_dir/mlflow/server.json``. Every other command finds the server there when no
tracking URI is configured. In a container, ``roost mlflow serve`` runs the same command
line in the foreground.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from roost import config, proc
from roost.config import Settings, TrackingSettings
from roost.errors import TrackingUnavailable

log = logging.getLogger(__name__)


# MLflow 3's job runner (GenAI evaluation jobs, huey consumers: ~9 processes, ~2 GB RSS) is
# not used by roost; without it the server starts faster and fits a small pod.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class ServerState:
    pid: int
    uri: str
    backend_store_uri: str
    artifacts_destination: str
    log_file: str
    started_at: float


def store_dir(settings: Settings) -> Path:
    return (settings.state_dir / "mlflow").resolve()


def state_file(settings: Settings) -> Path:
    return store_dir(settings) / "server.json"


def backend_store_uri(settings: Settings) -> str:
    return settings.tracking.backend_store_uri or f"sqlite:///{store_dir(settings) / 'mlflow.db'}"


def artifacts_destination(settings: Settings) -> str:
    return settings.tracking.artifacts_destination or str(store_dir(settings) / "artifacts")


def server_argv(
    tracking: TrackingSettings,
    backend: str,
    artifacts: str,
    host: str,
    port: int,
    workers: int = 1,
    allowed_hosts: str | None = None,
) -> list[str]:
    """The ``mlflow server`` command line, the same locally and in the container."""
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend,
        "--artifacts-destination", artifacts,
        "--serve-artifacts",
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
    ]  # fmt: skip
    if allowed_hosts:
        argv += ["--allowed-hosts", allowed_hosts]
    return argv


def read_state(settings: Settings) -> ServerState | None:
    path = state_file(settings)
    try:
        return ServerState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def healthy(uri: str, timeout: float = 2.0) -> bool:
    return proc.http_ok(uri.rstrip("/") + "/health", timeout)


def running_server(settings: Settings) -> ServerState | None:
    """The embedded server recorded under state_dir, if its process is alive and healthy."""
    state = read_state(settings)
    if state and proc.pid_alive(state.pid) and healthy(state.uri):
        return state
    return None


def up(settings: Settings) -> ServerState:
    """Start the embedded server (or return the one already running)."""
    current = running_server(settings)
    if current is not None:
        return current
    stale = read_state(settings)
    if stale is not None and proc.pid_alive(stale.pid):
        proc.stop_pid(stale.pid)  # alive but unhealthy: replace it
    directory = store_dir(settings)
    (directory / "artifacts").mkdir(parents=True, exist_ok=True)
    host = settings.tracking.host
    port = settings.tracking.port or proc.free_port(host)
    uri = f"http://{host}:{port}"
    backend, artifacts = backend_store_uri(settings), artifacts_destination(settings)
    argv = server_argv(settings.tracking, backend, artifacts, host, port)
    server = proc.start_background(
        argv,
        directory / "server.log",
        env=SERVER_ENV,
        cwd=directory,
    )
    state = ServerState(
        pid=server.pid,
        uri=uri,
        backend_store_uri=backend,
        artifacts_destination=artifacts,
        log_file=str(server.log_file),
        started_at=time.time(),
    )
    try:
        proc.wait_http(
            uri + "/health", settings.tracking.startup_timeout_s, server, what="mlflow server"
        )
    except Exception:
        server.stop()
        raise
    _write_state(settings, state)
    log.info("mlflow server up uri=%s pid=%d", uri, server.pid)
    return state


def _write_state(settings: Settings, state: ServerState) -> None:
    path = state_file(settings)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(path)


def down(settings: Settings) -> ServerState | None:
    """Stop the embedded server; returns what was stopped (None if nothing ran)."""
    state = read_state(settings)
    if state is None:
        return None
    proc.stop_pid(state.pid)
    state_file(settings).unlink(missing_ok=True)
    log.info("mlflow server down pid=%d", state.pid)
    return state


def resolve_uri(settings: Settings) -> str:
    """The tracking URI to use: configured, else the embedded server's; checked for health."""
    uri = settings.tracking.uri
    if uri is None:
        state = read_state(settings)
        if state is None:
            raise TrackingUnavailable(
                "no MLflow tracking server: run `roost mlflow up` or set MLFLOW_TRACKING_URI"
            )
        uri = state.uri
    if uri.startswith(("http://", "https://")):
        ensure_reachable(uri, settings.tracking.request_timeout_s)
    return uri


def ensure_reachable(uri: str, timeout: float = 5.0) -> None:
    try:
        response = httpx.get(uri.rstrip("/") + "/health", timeout=timeout)
    except httpx.HTTPError as exc:
        raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable ({exc})") from None
    if response.status_code != 200:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unhealthy (HTTP {response.status_code} on /health)"
        )


def use(settings: Settings) -> str:
    """Point the mlflow client library at the resolved server and return its URI."""
    import mlflow

    uri = resolve_uri(settings)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # Fail fast instead of MLflow's default minutes of retries when the server goes away.
    config.export_defaults(
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
        MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(settings.tracking.request_timeout_s * 3)),
    )
    return uri
