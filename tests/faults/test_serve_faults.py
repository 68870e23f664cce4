"""`roost serve` when its model cannot be had: the registry down or failing, the files corrupt.

The server must not start half-loaded: it exits at once with one `error:` line and its exit
code (4 registry unavailable, 2 unreadable model), and started again after the fault clears
it serves.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from roost import proc, tracking
from roost.serving import local
from roost.train import TrainOutcome
from tests.faults.conftest import (
    FAST_RETRIES,
    CliResult,
    Model,
    endpoint,
    settings_for,
)
from tests.faults.proxy import FaultProxy

pytestmark = pytest.mark.faults

ALIAS = endpoint("/api/2.0/mlflow/registered-models/alias")
ARTIFACTS = r"/api/2\.0/mlflow-artifacts/artifacts/"


def roost_serve(state_dir: Path, tracking_uri: str, model_uri: str) -> CliResult:
    """`roost serve` as an operator runs it; it must exit by itself on these faults."""
    argv = [
        str(Path(sys.executable).with_name("roost")), "--log-format", "plain", "serve",
        "--model-uri", model_uri,
        "--http-port", str(proc.free_port()), "--grpc-port", str(proc.free_port()),
    ]  # fmt: skip
    env = {
        "PATH": "/usr/bin:/bin",
        "ROOST_STATE_DIR": str(state_dir),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "ROOST_TRACKING__URI": tracking_uri,
        **FAST_RETRIES,
    }
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=False)
    return CliResult(done.returncode, done.stdout, done.stderr)


def serves(state_dir: Path, tracking_uri: str, model_uri: str, log: Path) -> None:
    """Started again, the server becomes ready and answers."""
    settings = settings_for(state_dir, tracking_uri, "sentiment")
    server = local.start(settings, model_uri, log, tracking_uri=tracking_uri)
    try:
        server.wait_ready(timeout=180)
        r = httpx.post(
            f"{server.http_url}/v1/models/sentiment:predict",
            json={"instances": ["what a lovely flight"]}, timeout=30,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["label"] in {"negative", "neutral", "positive"}
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("fault", "method", "path"),
    [
        pytest.param("refuse", None, None, id="registry-down-at-start"),
        pytest.param("500", "GET", ALIAS, id="alias-read-500"),
        pytest.param("500", "GET", ARTIFACTS, id="model-download-500"),
    ],
)
def test_serve_with_the_registry_failing_exits_then_serves(
    mlflow_proxy: FaultProxy,
    champion_v2: Model,
    tmp_path: Path,
    fault: str,
    method: str | None,
    path: str | None,
) -> None:
    state_dir = tmp_path / "state"  # an empty model cache: the download is needed
    model_uri = f"models:/{champion_v2.name}@champion"
    if fault == "refuse":
        mlflow_proxy.refuse()
    else:
        assert path is not None
        mlflow_proxy.fail(method, path, int(fault))

    failed = roost_serve(state_dir, mlflow_proxy.url, model_uri)

    line = failed.one_error_line()
    assert failed.code == 4, failed.stderr[-3000:]
    assert "MLflow" in line, line
    if path is not None:
        assert mlflow_proxy.hits(method, path), "the fault was never reached"

    mlflow_proxy.restore()
    serves(state_dir, mlflow_proxy.url, model_uri, tmp_path / "serve.log")


def test_serve_with_unreadable_model_files_exits_then_serves(
    mlflow_server: tracking.ServerState, small_run: TrainOutcome, tmp_path: Path
) -> None:
    from roost.registry import download

    model_dir = download(small_run.model_uri, tmp_path / "model")
    (weights,) = model_dir.rglob("weights.pt")
    good = tmp_path / "weights.good"
    shutil.copy(weights, good)
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a half-finished copy

    failed = roost_serve(tmp_path / "state", mlflow_server.uri, str(model_dir))

    line = failed.one_error_line()
    assert failed.code == 2, failed.stderr[-3000:]
    assert "cannot load the classifier" in line and str(weights.parent) in line, line

    shutil.copy(good, weights)
    serves(tmp_path / "state", mlflow_server.uri, str(model_dir), tmp_path / "serve.log")
