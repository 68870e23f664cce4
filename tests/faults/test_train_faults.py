"""`roost train` when MLflow fails: down at start, a 500 mid-run, at model logging, slow, killed.

Each time: one `error:` line, exit 4 (the tracking server is unavailable), and the same
command after the fault clears records a finished run with its model.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from mlflow import MlflowClient

from roost import tracking
from tests.conftest import make_settings
from tests.faults.conftest import FAULT_ROWS, CliResult, cli_env, endpoint, roost
from tests.faults.proxy import FaultProxy, fault_proxy

pytestmark = pytest.mark.faults

TRAIN = ("train", "--max-rows", str(FAULT_ROWS), "--epochs", "1", "--experiment", "faults-train",
         "--json")  # fmt: skip
LOG_BATCH = endpoint("/api/2.0/mlflow/runs/log-batch")
ARTIFACT_PUT = r"/api/2\.0/mlflow-artifacts/artifacts/.*"


def assert_trained(result: CliResult, uri: str) -> str:
    assert result.code == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    run = MlflowClient(uri).get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["roost.model_uri"].startswith("models:/")
    return str(summary["run_id"])


FAULTS = [
    pytest.param("refuse", None, None, None, id="mlflow-down-at-start"),
    pytest.param("500", "POST", LOG_BATCH, rb"train_loss", id="metrics-500-mid-run"),
    pytest.param("500", "PUT", ARTIFACT_PUT + r"MLmodel", None, id="model-upload-500"),
    pytest.param("slow", "POST", LOG_BATCH, rb"train_loss", id="metrics-slower-than-timeout"),
]


@pytest.mark.parametrize(("fault", "method", "path", "body"), FAULTS)
def test_train_fails_with_one_line_then_reruns(
    mlflow_proxy: FaultProxy,
    mlflow_server: tracking.ServerState,
    state_dir: Path,
    fault: str,
    method: str | None,
    path: str | None,
    body: bytes | None,
) -> None:
    env = cli_env(state_dir, mlflow_proxy.url, MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    if fault == "refuse":
        mlflow_proxy.refuse()
    elif fault == "slow":
        assert path is not None
        mlflow_proxy.delay(method, path, 6.0, when_body=body)
    elif fault == "drop":
        assert path is not None
        mlflow_proxy.drop(method, path, when_body=body)
    else:
        assert path is not None
        mlflow_proxy.fail(method, path, int(fault), when_body=body)

    failed = roost(env, *TRAIN)

    line = failed.one_error_line()
    assert failed.code == 4, failed.stderr[-3000:]
    assert "MLflow" in line, line
    assert failed.stdout == ""
    if path is not None:
        assert mlflow_proxy.hits(method, path), "the fault was never reached"

    mlflow_proxy.restore()
    assert_trained(roost(env, *TRAIN), mlflow_server.uri)


def test_mlflow_sigkilled_mid_run_then_restarted(tmp_path: Path) -> None:
    """A server of its own (all its processes) SIGKILLed when the first epoch's metrics
    arrive; then restarted on its store, where the rerun records a finished run."""
    settings = make_settings(tmp_path / "state")
    server = tracking.up(settings)
    try:
        with fault_proxy(server.uri) as proxy:
            env = cli_env(tmp_path / "state", proxy.url)
            proxy.delay(
                "POST", LOG_BATCH, 0.0, times=1, when_body=rb"train_loss",
                on_hit=lambda: os.killpg(os.getpgid(server.pid), signal.SIGKILL),
            )  # fmt: skip

            failed = roost(env, *TRAIN)

            line = failed.one_error_line()
            assert failed.code == 4, failed.stderr[-3000:]
            assert "MLflow" in line, line
            assert not tracking.healthy(server.uri)

            restarted = tracking.up(settings)  # same SQLite store and artifacts
            proxy.upstream = restarted.uri
            proxy.restore()
            assert_trained(roost(env, *TRAIN), restarted.uri)
    finally:
        tracking.down(settings)
