"""`roost rollout` CLI contract: exit codes, one JSON document, one error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from roost.cli.app import app
from roost.config import load_settings
from roost.rollout import engine
from roost.rollout.backends.local import LocalBackend
from roost.rollout.state import Plan

pytestmark = pytest.mark.unit


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    return result.exit_code, result.stdout, result.stderr


def test_every_rollout_command_has_help() -> None:
    code, out, _ = run("rollout", "--help")
    assert code == 0
    for command in ("start", "watch", "status", "pause", "resume", "abort", "promote", "down"):
        assert command in out


def test_status_without_a_rollout_is_not_found(tmp_path: Path) -> None:
    code, out, err = run("--state-dir", str(tmp_path), "rollout", "status", "sentiment", "--json")
    assert code == 3 and out == ""
    assert "no rollout of sentiment" in err and len(err.strip().splitlines()) == 1


def test_overrides_without_a_rollout_are_not_found(tmp_path: Path) -> None:
    code, _, err = run("--state-dir", str(tmp_path), "rollout", "abort", "sentiment")
    assert code == 3 and "no rollout" in err


def test_bad_steps_are_a_usage_error(tmp_path: Path) -> None:
    code, _, err = run(
        "--state-dir", str(tmp_path), "rollout", "start", "sentiment", "--version", "2",
        "--steps", "50,10",
    )  # fmt: skip
    assert code == 2 and "must increase" in err


def test_status_json_is_one_document_with_the_step_table(tmp_path: Path) -> None:
    settings = load_settings(None, {"state_dir": tmp_path})
    backend = LocalBackend(settings, "http://127.0.0.1:1")
    state = engine.start(Plan(steps=(10, 100)), "sentiment", "2", "1", "local", 1.0, "r9")
    state = engine.commit(state, 2.0)
    backend.create_state(state)

    code, out, err = run("--state-dir", str(tmp_path), "rollout", "status", "sentiment", "--json")
    assert code == 0, err
    document = json.loads(out)
    assert (
        document["id"] == "r9" and document["weight"] == 10 and document["phase"] == "progressing"
    )
    assert document["table"][0]["weight"] == 10
    assert document["endpoints"]["state_dir"].endswith("rollout/sentiment")

    code, _, err = run("--state-dir", str(tmp_path), "rollout", "status", "sentiment")
    assert code == 0 and "progressing at 10%" in err
