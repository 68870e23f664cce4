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
from typing import Any

import httpx

from roost import config, proc
from roost.config import Settings, TrackingSettings
from roost.errors import RoostError, TrackingUnavailable

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


# -- MLflow's errors: "does not exist" versus everything else ------------------------------------

# What MLflow's servers answer for an entity that is not there (a run, a version, a registered
# model: RESOURCE_DOES_NOT_EXIST; an alias that is not set: INVALID_PARAMETER_VALUE with
# "Registered model alias X not found."). tests/faults/test_registry_faults.py checks both
# against a real server, so an MLflow upgrade that changes them fails there.
_ABSENT_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST"})
_ALIAS_ABSENT = "registered model alias "
# Codes a server answers when it, not the request, is the problem.
_SERVER_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})


def error_code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", "") or "")


def error_message(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


def is_absent(exc: BaseException, kind: str = "") -> bool:
    """True only when the MLflow server said the thing does not exist.

    Only a parsed answer of the server counts (``RestException``): MLflow's client reports a
    5xx, a reset or a refused connection with other classes, and its artifact download
    reports even those as RESOURCE_DOES_NOT_EXIST (see :func:`download_artifact`).
    ``kind="alias"`` also accepts the answer for an alias that is not set, which comes as
    INVALID_PARAMETER_VALUE, a code that otherwise means a bad request.
    """
    if not any(cls.__name__ == "RestException" for cls in type(exc).__mro__):
        return False
    code = error_code(exc)
    text = error_message(exc).removeprefix(f"{code}: ").lower()
    if code in _ABSENT_CODES:
        return "not found" in text or "does not exist" in text
    if kind == "alias" and code == "INVALID_PARAMETER_VALUE":
        return text.startswith(_ALIAS_ABSENT) and text.rstrip(".").endswith("not found")
    return False


def download_artifact(client: Any, run_id: str, path: str, dst: str) -> str | None:
    """Download one artifact of a run; None only if the run's listing says it is not there.

    MLflow's download answers "Failed to download artifacts ... RESOURCE_DOES_NOT_EXIST"
    for a missing file *and* for a 500 or a dropped connection, so the listing decides.
    """
    from mlflow.exceptions import MlflowException

    try:
        return str(client.download_artifacts(run_id, path, dst))
    except MlflowException as exc:
        failure = exc
    parent = path.rsplit("/", 1)[0] if "/" in path else None
    try:
        listed = {item.path for item in client.list_artifacts(run_id, parent)}
    except MlflowException as exc:
        raise registry_error(exc, f"listing the artifacts of run {run_id}") from None
    if path not in listed:
        return None
    raise TrackingUnavailable(
        f"MLflow failed while downloading {path} of run {run_id}: {error_message(failure)}"
    )


def registry_error(exc: BaseException, doing: str) -> RoostError:
    """An MLflow failure while ``doing`` something, as a RoostError with the right exit code.

    The server failing (5xx, reset, timeout) is :class:`TrackingUnavailable` (exit 4); any
    other refusal (permission, bad request) is a plain :class:`RoostError` (exit 1).
    """
    code = error_code(exc)
    message = f"MLflow failed while {doing}: {error_message(exc)}"
    if code in _SERVER_CODES or not code or _transport_failure(exc):
        return TrackingUnavailable(message)
    return RoostError(message)


def _transport_failure(exc: BaseException) -> bool:
    # MLflow wraps requests' errors ("Max retries exceeded", connection reset, read timeout)
    # into MlflowException without a specific code.
    text = str(exc)
    return any(
        marker in text
        for marker in (
            "Max retries exceeded", "Connection aborted", "Connection refused",
            "Read timed out", "RemoteDisconnected", "ConnectionResetError",
            "failed with error code 5",
        )
    )  # fmt: skip
