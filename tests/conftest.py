"""Shared fixtures: one real MLflow server, one trained + registered model, one model server.

Everything runs on loopback ports chosen at start-up and is torn down by the fixture, not
by the test body, so a failing assertion never leaks a process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from roost import registry, tracking
from roost.config import Settings, load_settings
from roost.serving import local
from roost.train import TrainOutcome, run_training

# Small but real: a stratified sample of the tweet corpus trains in a few seconds.
TEST_ROWS = 6000
TEST_EPOCHS = 4


def _clean_env() -> None:
    for name in list(os.environ):
        if name.startswith("ROOST_") and name not in ("ROOST_SCHEMA_DIR", "ROOST_CHECKOV"):
            del os.environ[name]
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


_clean_env()


# What mlflow.set_tracking_uri / set_registry_uri / set_experiment export to os.environ.
MLFLOW_EXPORTS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
)


@pytest.fixture(autouse=True, scope="module")
def _no_inherited_mlflow_env_in_module_fixtures() -> None:
    """A module's own fixtures (they run before any function-scoped one) start without what
    an earlier module's in-process MLflow calls exported: a subprocess they start (a demo,
    a server) must find the server it is told about, not a stopped one from before."""
    for name in MLFLOW_EXPORTS:
        os.environ.pop(name, None)


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; session fixtures call it.

    Every test starts without it, so a subprocess or CLI call under test finds the server
    it is told about (flag, settings, state dir), never the one a fixture happened to use.
    """
    for name in MLFLOW_EXPORTS:
        monkeypatch.delenv(name, raising=False)


def make_settings(state_dir: Path, tracking_uri: str | None = None, **sections: dict) -> Settings:
    overrides: dict = {
        "state_dir": state_dir,
        "data": {"max_rows": TEST_ROWS},
        "train": {"epochs": TEST_EPOCHS},
    }
    if tracking_uri:
        overrides["tracking"] = {"uri": tracking_uri}
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_settings(None, overrides)


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("roost-state")


@pytest.fixture(scope="session")
def mlflow_server(state_dir: Path) -> Iterator[tracking.ServerState]:
    """A real `mlflow server` (SQLite + local artifacts) on a free loopback port."""
    settings = make_settings(state_dir)
    server = tracking.up(settings)
    try:
        yield server
    finally:
        tracking.down(settings)


@pytest.fixture(scope="session")
def settings(state_dir: Path, mlflow_server: tracking.ServerState) -> Settings:
    return make_settings(state_dir, mlflow_server.uri)


@dataclass(frozen=True)
class Champion:
    outcome: TrainOutcome
    version: str
    model_uri: str  # models:/sentiment/<version>


@pytest.fixture(scope="session")
def champion(settings: Settings) -> Champion:
    """A model trained on a corpus sample, registered, gated and aliased `champion`."""
    outcome = run_training(settings)
    result = registry.promote(settings, run_id=outcome.run_id)
    assert result.decision.passed, result.decision.reason
    return Champion(
        outcome, result.version, f"models:/{settings.registry.model_name}/{result.version}"
    )


def serve_champion(
    settings: Settings,
    log: Path,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    verbose: int = 0,
) -> Iterator[local.LocalServer]:
    """`roost serve` for models:/sentiment@champion on free ports, ready, stopped afterwards."""
    server = local.start(
        settings,
        f"models:/{settings.registry.model_name}@{settings.registry.champion_alias}",
        log,
        tracking_uri=settings.tracking.uri,
        env=env,
        extra_args=extra_args,
        verbose=verbose,
    )
    try:
        server.wait_ready(timeout=120)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def model_server(
    settings: Settings, champion: Champion, state_dir: Path
) -> Iterator[local.LocalServer]:
    """`roost serve` (KServe ModelServer) for models:/sentiment@champion on free ports."""
    yield from serve_champion(settings, state_dir / "logs" / "model-server.log")


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    env: dict[str, str]


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """moto in server mode: a real HTTP S3 endpoint on a free loopback port."""
    import sys

    from roost import proc

    port = proc.free_port()
    server = proc.start_background(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        tmp_path_factory.mktemp("moto") / "moto.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(url + "/moto-api/", timeout=60, proc=server, what="moto server")
        yield S3Endpoint(
            url,
            {
                "AWS_ENDPOINT_URL": url,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            },
        )
    finally:
        server.stop()
