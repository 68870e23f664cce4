"""Run the model server as a local background process on loopback ports.

The demo, the local rollout backend, the benchmark and the tests start model servers
through this one function, with the entry point a pod runs: ``roost serve``, the console
script the serving image's ENTRYPOINT names (``python -m roost`` only where this
environment has no ``roost`` script next to its python).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from roost import proc
from roost.config import Settings

SERVERS_DIR = "servers"  # under state_dir; read by roost.lineage.local


@dataclass
class LocalServer:
    process: proc.Background
    name: str
    http_port: int
    grpc_port: int
    host: str = "127.0.0.1"
    record: Path | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def ready_url(self) -> str:
        return f"{self.http_url}/v2/models/{self.name}/ready"

    def wait_ready(self, timeout: float = 120.0) -> LocalServer:
        proc.wait_http(self.ready_url, timeout, self.process, what=f"model server {self.name}")
        return self

    def stop(self) -> None:
        self.process.stop()
        if self.record is not None:
            self.record.unlink(missing_ok=True)


def entry_point() -> list[str]:
    """argv[0:] of the ``roost`` CLI: the console script of this environment, as in the image."""
    script = Path(sys.executable).with_name("roost")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "roost"]


def start(
    settings: Settings,
    model_uri: str,
    log_file: Path,
    name: str | None = None,
    http_port: int = 0,
    grpc_port: int = 0,
    tracking_uri: str | None = None,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    verbose: int = 0,
) -> LocalServer:
    """Start the model server for ``model_uri`` in the background; call ``wait_ready`` next.

    ``extra_args`` are more ``roost serve`` flags; ``verbose`` counts the CLI's ``-v``.
    """
    name = name or settings.serving.model_name
    http_port = http_port or proc.free_port()
    grpc_port = grpc_port or proc.free_port()
    argv = [
        *entry_point(), "--log-format", "json", *["-v"] * verbose, "serve",
        "--model-uri", model_uri,
        "--model-name", name,
        "--http-port", str(http_port),
        "--grpc-port", str(grpc_port),
        *(extra_args or []),
    ]  # fmt: skip
    child_env = {"ROOST_STATE_DIR": str(settings.state_dir.resolve()), "PYTHONUNBUFFERED": "1"}
    if tracking_uri:
        child_env["MLFLOW_TRACKING_URI"] = tracking_uri
    child_env.update(env or {})
    process = proc.start_background(argv, log_file, env=child_env)
    record = _record(settings, process.pid, name, model_uri, http_port, grpc_port, log_file)
    return LocalServer(process, name, http_port, grpc_port, record=record)


def _record(
    settings: Settings,
    pid: int,
    name: str,
    model_uri: str,
    http_port: int,
    grpc_port: int,
    log_file: Path,
) -> Path:
    """``state_dir/servers/<pid>.json``: what `roost lineage` finds local servers by."""
    directory = settings.state_dir.resolve() / SERVERS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{pid}.json"
    document = {
        "pid": pid,
        "name": name,
        "model_uri": model_uri,
        "http_url": f"http://127.0.0.1:{http_port}",
        "grpc_target": f"127.0.0.1:{grpc_port}",
        "log_file": str(log_file),
    }
    path.write_text(json.dumps(document, indent=2))
    return path
