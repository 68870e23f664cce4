"""``roost monitor up|down``: the receiver as a local background process (like ``mlflow up``)."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from roost import proc
from roost.config import Settings

log = logging.getLogger(__name__)


@dataclass
class ReceiverState:
    pid: int
    url: str
    store: str
    log_file: str
    started_at: float


def store_uri(settings: Settings) -> str:
    """Where the Parquet parts go: ``monitor.store`` (a directory or ``s3://``), else local."""
    store = settings.monitor.store
    if store and store.startswith("s3://"):
        return store
    return str(store_dir(settings))


def store_dir(settings: Settings) -> Path:
    """The local directory: journal, watch state, logs (and the parts unless on ``s3://``)."""
    cfg = settings.monitor
    if cfg.journal_dir:
        return Path(cfg.journal_dir).resolve()
    if cfg.store and not cfg.store.startswith("s3://"):
        return Path(cfg.store).resolve()
    return (settings.state_dir / "monitor").resolve()


def state_file(settings: Settings) -> Path:
    return settings.state_dir / "monitor-receiver.json"


def read_state(settings: Settings) -> ReceiverState | None:
    try:
        return ReceiverState(**json.loads(state_file(settings).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def healthy(url: str) -> bool:
    return proc.http_ok(url.rstrip("/") + "/healthz")


def receiver_url(settings: Settings) -> str | None:
    """The configured receiver, else the one `monitor up` started (if it still answers)."""
    if settings.monitor.url:
        return settings.monitor.url
    state = read_state(settings)
    if state is not None and proc.pid_alive(state.pid):
        return state.url
    return None


def serve_argv(
    settings: Settings, host: str, port: int, store: Path, parts: str | None = None
) -> list[str]:
    argv = [sys.executable, "-m", "roost"]
    if settings.state_dir:
        argv += ["--state-dir", str(settings.state_dir)]
    argv += ["monitor", "serve", "--host", host, "--port", str(port)]
    if parts is not None and parts != str(store):
        return [*argv, "--store", parts, "--journal-dir", str(store)]
    return [*argv, "--store", str(store)]


def up(settings: Settings, port: int = 0) -> ReceiverState:
    """Start the receiver in the background (or return the one already running)."""
    current = read_state(settings)
    if current is not None and proc.pid_alive(current.pid) and healthy(current.url):
        return current
    if current is not None and proc.pid_alive(current.pid):
        proc.stop_pid(current.pid)
    cfg = settings.monitor
    store = store_dir(settings)
    store.mkdir(parents=True, exist_ok=True)
    port = port or proc.free_port(cfg.host)
    url = f"http://{cfg.host}:{port}"
    server = proc.start_background(
        serve_argv(settings, cfg.host, port, store, store_uri(settings)), store / "receiver.log"
    )
    try:
        proc.wait_http(url + "/healthz", cfg.startup_timeout_s, server, what="monitor receiver")
    except Exception:
        server.stop()
        raise
    state = ReceiverState(server.pid, url, store_uri(settings), str(server.log_file), time.time())
    path = state_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(path)
    log.info("monitor receiver up url=%s pid=%d", url, server.pid)
    return state


def down(settings: Settings) -> ReceiverState | None:
    state = read_state(settings)
    if state is None:
        return None
    proc.stop_pid(state.pid)
    state_file(settings).unlink(missing_ok=True)
    return state
