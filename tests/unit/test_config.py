"""Config precedence: flags > environment > YAML file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from roost.config import load_settings, nested
from roost.errors import ConfigError

pytestmark = pytest.mark.unit


def test_defaults() -> None:
    s = load_settings()
    assert s.train.epochs == 10
    assert s.serving.max_body_bytes == 1 << 20
    assert s.registry.champion_alias == "champion"


def test_precedence_flags_over_env_over_file_over_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "roost.yaml"
    config.write_text("train:\n  epochs: 3\n  batch_size: 32\n  lr: 0.5\ndata:\n  seed: 7\n")
    monkeypatch.setenv("ROOST_TRAIN__EPOCHS", "5")
    monkeypatch.setenv("ROOST_TRAIN__BATCH_SIZE", "16")

    s = load_settings(config, nested({"train.epochs": 9}))

    assert s.train.epochs == 9  # flag beats env and file
    assert s.train.batch_size == 16  # env beats file
    assert s.train.lr == 0.5  # file beats default
    assert s.data.seed == 7
    assert s.train.weight_decay == 1e-4  # default


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("serving:\n  http_port: 9090\n")
    monkeypatch.setenv("ROOST_CONFIG", str(config))
    assert load_settings().serving.http_port == 9090


def test_mlflow_tracking_uri_env_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert load_settings().tracking.uri == "http://mlflow.example:5000"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("train:\n  epochs: many\n", "train.epochs"),
        ("train:\n  epoch: 3\n", "train.epoch"),  # misspelt key
        ("serving:\n  http_port: 70000\n", "serving.http_port"),
    ],
)
def test_invalid_values_name_the_field(tmp_path: Path, content: str, fragment: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_settings(config)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "absent.yaml")


def test_nested_drops_unset_flags() -> None:
    assert nested({"a.b": 1, "a.c": None, "d": 2}) == {"a": {"b": 1}, "d": 2}
