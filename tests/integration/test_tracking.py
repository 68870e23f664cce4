"""`roost mlflow up|status|down` start and stop a real server; the store survives restarts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from roost.proc import pid_alive

pytestmark = pytest.mark.integration


def roost(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "roost", "--state-dir", str(state), *args],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def test_up_status_down_and_persistence(tmp_path: Path) -> None:
    state = tmp_path / "state"
    try:
        up = roost(state, "mlflow", "up", "--json")
        assert up.returncode == 0, up.stderr
        server = json.loads(up.stdout)
        uri, pid = server["uri"], server["pid"]
        assert uri.startswith("http://127.0.0.1:") and pid_alive(pid)
        assert (
            server["backend_store_uri"].startswith("sqlite:///")
            and str(state.resolve()) in server["backend_store_uri"]
        )
        recorded = json.loads((state / "mlflow" / "server.json").read_text())
        assert recorded["pid"] == pid and recorded["uri"] == uri

        # A second `up` reuses the running server.
        again = json.loads(roost(state, "mlflow", "up", "--json").stdout)
        assert again["pid"] == pid

        status = roost(state, "mlflow", "status", "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["healthy"] is True

        created = httpx.post(
            f"{uri}/api/2.0/mlflow/experiments/create", json={"name": "persisted"}, timeout=10
        )
        assert created.status_code == 200, created.text

        down = roost(state, "mlflow", "down", "--json")
        assert json.loads(down.stdout) == {"stopped": True, "pid": pid}
        assert not pid_alive(pid)
        assert roost(state, "mlflow", "status").returncode == 4

        # `up` brings the same store back: the experiment is still there.
        back = json.loads(roost(state, "mlflow", "up", "--json").stdout)
        got = httpx.get(f"{back['uri']}/api/2.0/mlflow/experiments/get-by-name",
                        params={"experiment_name": "persisted"}, timeout=10)  # fmt: skip
        assert got.status_code == 200 and got.json()["experiment"]["name"] == "persisted"
    finally:
        roost(state, "mlflow", "down")


def test_external_server_is_used_not_started(tmp_path: Path, mlflow_server) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        [sys.executable, "-m", "roost", "--state-dir", str(tmp_path), "mlflow", "up", "--json"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**__import__("os").environ, "MLFLOW_TRACKING_URI": mlflow_server.uri},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"uri": mlflow_server.uri, "embedded": False, "pid": None}
    assert not (tmp_path / "mlflow" / "server.json").exists()
