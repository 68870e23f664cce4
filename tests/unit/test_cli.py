"""CLI contract: bad input gives one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from roost.cli.app import app
from roost.proc import free_port

pytestmark = pytest.mark.unit


def run(*args: str, **env: str) -> tuple[int, str, str]:
    # (MLFLOW_TRACKING_URI is unset for every test by conftest's autouse fixture.)
    result = CliRunner().invoke(app, list(args), env=env or None)
    # CliRunner keeps an unhandled exception instead of printing its traceback: an error
    # the CLI handled ends in SystemExit (its exit code), anything else is a crash.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result.exit_code, result.stdout, result.stderr


def unreachable() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_help_lists_commands() -> None:
    code, out, _ = run("--help")
    assert code == 0
    for command in (
        "train",
        "promote",
        "serve",
        "predict",
        "demo",
        "mlflow",
        "registry",
        "rollout",
        "deploy",
        "aws",
        "bench",
    ):
        assert command in out


def test_missing_data_file(tmp_path: Path) -> None:
    code, out, err = run(
        "train", "--data", str(tmp_path / "missing.csv"), MLFLOW_TRACKING_URI=unreachable()
    )
    assert code != 0
    assert "error:" in err and len(err.strip().splitlines()) == 1
    assert out == ""


def test_unreachable_tracking_server(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    texts = [f"text number {i}" for i in range(15)]
    pd.DataFrame({"text": texts, "sentiment": ["x", "y", "z"] * 5}).to_csv(csv, index=False)
    uri = unreachable()
    code, _, err = run("train", "--data", str(csv), MLFLOW_TRACKING_URI=uri)
    assert code == 4
    assert f"MLflow tracking server {uri} is unreachable" in err
    assert len(err.strip().splitlines()) == 1


def test_csv_without_named_columns(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    pd.DataFrame({"body": ["a"], "mood": ["x"]}).to_csv(csv, index=False)
    # Data is checked before the tracking server is needed: the column error comes first.
    code, out, err = run("train", "--data", str(csv), MLFLOW_TRACKING_URI=unreachable())
    assert code == 2
    assert "column(s) 'text', 'sentiment' not in data; columns are: body, mood" in err
    assert len(err.strip().splitlines()) == 1 and out == ""


def test_no_tracking_server_configured(tmp_path: Path) -> None:
    code, _, err = run("--state-dir", str(tmp_path), "promote")
    assert code == 4
    assert "no MLflow tracking server" in err


def test_mlflow_status_when_down(tmp_path: Path) -> None:
    code, out, _ = run("--state-dir", str(tmp_path), "mlflow", "status", "--json")
    assert code == 4
    assert json.loads(out) == {"uri": None, "healthy": False, "embedded": True, "pid": None}


def test_predict_unreachable_server() -> None:
    code, _, err = run("predict", "hello", "--url", unreachable())
    assert code == 4 and "is unreachable" in err


def test_invalid_config_value(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: -1\n")
    code, _, err = run("--config", str(config), "train")
    assert code == 2 and "train.epochs" in err


def test_a_storage_uri_pattern_with_unknown_placeholders_is_a_config_error() -> None:
    code, _, err = run(
        "deploy", "--version", "2", ROOST_K8S__TORCHSERVE_STORAGE_URI="s3://b/{name}/{version}"
    )
    assert code == 2 and "k8s.torchserve_storage_uri" in err and "{model}" in err


def test_bad_choice_is_a_usage_error() -> None:
    code, _, _ = run("train", "--on", "mars")
    assert code == 2


@pytest.mark.parametrize(
    ("arg", "printed"),
    [
        ("postgresql://mlflow:s3cr%40t@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("sqlite:////data/mlflow.db", "sqlite:////data/mlflow.db"),
        ("s3://roost-artifacts/mlflow", "s3://roost-artifacts/mlflow"),
        ("--workers", "--workers"),
    ],
)
def test_mlflow_serve_never_prints_the_database_password(arg: str, printed: str) -> None:
    from roost.cli.tracking import _redact

    assert _redact(arg) == printed
