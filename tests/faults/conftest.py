"""Fixtures of the fault-injection suite: a fault proxy in front of each real dependency.

The MLflow server, the trained run and the model server are the session's (tests/conftest.py);
each test works on a registered model of its own, so a fault here never moves another
test's aliases. MLflow's client retries 5xx with back-off; the back-off is made short here
(the retries themselves stay) so a fault costs a second, not half a minute.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from roost import registry, tracking
from roost.cli.app import app
from roost.config import Settings
from roost.train import TrainOutcome, run_training
from tests.conftest import make_settings
from tests.faults.proxy import FaultProxy, fault_proxy

FAULT_ROWS = 1500  # a few seconds of training; the gate only needs a test split
FAST_RETRIES = {
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAST_RETRIES.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def mlflow_proxy(mlflow_server: tracking.ServerState) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's MLflow server."""
    with fault_proxy(mlflow_server.uri) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def small_run(state_dir: Path, mlflow_server: tracking.ServerState) -> TrainOutcome:
    """One small training run; promoting it again and again gives as many versions."""
    settings = make_settings(
        state_dir, mlflow_server.uri, data={"max_rows": FAULT_ROWS}, train={"epochs": 1},
        tracking={"experiment": "faults"},
    )  # fmt: skip
    return run_training(settings)


@dataclass(frozen=True)
class Model:
    """A registered model of one test: direct access (no proxy) to check what really changed."""

    name: str
    registry: registry.Registry

    def aliases(self) -> dict[str, str]:
        return self.registry.aliases()

    def versions(self) -> list[str]:
        return [str(v.version) for v in self.registry.versions()]


def fresh_model(mlflow_server: tracking.ServerState, prefix: str) -> Model:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    return Model(name, registry.Registry(mlflow_server.uri, name))


@pytest.fixture
def champion_v2(mlflow_server: tracking.ServerState, small_run: TrainOutcome) -> Model:
    """A model with v1 and v2 registered from ``small_run``, @champion on v2."""
    model = fresh_model(mlflow_server, "faults")
    tags = {"roost.source_run": small_run.run_id}
    model.registry.register(small_run.model_uri, tags)
    v2 = model.registry.register(small_run.model_uri, tags)
    model.registry.set_alias("champion", v2)
    return model


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    def one_error_line(self) -> str:
        """The command ended with exactly one ``error:`` line and no traceback."""
        assert "Traceback" not in self.stdout + self.stderr, self.stderr[-3000:]
        assert len(self.error_lines) == 1, self.stderr[-3000:]
        last = self.stderr.strip().splitlines()[-1]
        assert last.startswith("error:"), self.stderr[-3000:]
        return last


def roost(env: dict[str, str], *args: str) -> CliResult:
    """The ``roost`` CLI in process (the same Typer app the console script runs)."""
    result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # An exception the CLI did not turn into an exit code: show it as the traceback would.
        import traceback

        detail = "".join(traceback.format_exception(result.exception))
        return CliResult(1, result.stdout, result.stderr + "\nTraceback:\n" + detail)
    return CliResult(result.exit_code, result.stdout, result.stderr)


def cli_env(state_dir: Path, tracking_uri: str, **extra: str) -> dict[str, str]:
    return {
        "ROOST_STATE_DIR": str(state_dir),
        "ROOST_TRACKING__URI": tracking_uri,
        "MLFLOW_TRACKING_URI": tracking_uri,
        **FAST_RETRIES,
        **extra,
    }


def settings_for(state_dir: Path, uri: str, model: str) -> Settings:
    return make_settings(
        state_dir, uri, data={"max_rows": FAULT_ROWS}, train={"epochs": 1},
        registry={"model_name": model}, tracking={"experiment": "faults"},
    )  # fmt: skip


def endpoint(path: str) -> str:
    """A regex for one MLflow REST endpoint (with or without a query string)."""
    return re.escape(path) + r"(\?|$)"
