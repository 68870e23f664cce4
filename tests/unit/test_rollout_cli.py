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


def test_status_shows_the_shadow_phase_as_the_first_row(tmp_path: Path) -> None:
    from roost.rollout.analysis import Counts
    from roost.rollout.shadow import Answer, Logged, Tally, failure, judge
    from roost.rollout.state import ShadowPlan

    settings = load_settings(None, {"state_dir": tmp_path})
    backend = LocalBackend(settings, "http://127.0.0.1:1")
    plan = Plan(steps=(10, 100), mode="shadow", shadow=ShadowPlan(duration_s=1.0, min_pairs=10))
    state = engine.commit(engine.start(plan, "sentiment", "2", "1", "local", 1.0, "r7"), 2.0)
    tally = Tally()
    for i in range(20):  # 5 of 20 answers differ
        tally.add(
            Logged(f"e{i}", {"instances": ["x"]}, ("a",), (0.9,)),
            Answer(f"e{i}", 0.003, ("b" if i < 5 else "a",), (0.9,)),
        )
    champion = Counts(ok=20, latency={"0.005": 20, "+Inf": 20})
    analysis = judge(tally, champion, plan.shadow.thresholds, plan.shadow.min_pairs)
    state = engine.judge_shadow(state, analysis, tally.to_dict(), {}, 5.0, failure(analysis, tally))
    state = engine.commit(state, 5.5)
    backend.create_state(state)

    code, out, err = run("--state-dir", str(tmp_path), "rollout", "status", "sentiment", "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["phase"] == "rolled_back"
    assert document["failure"]["metric"] == "agreement,js_distance"
    assert document["table"][0]["agreement"]["value"] == 0.75
    assert document["failure"]["disagreeing_ids"] == ["e0", "e1", "e2", "e3", "e4"]

    code, _, err = run("--state-dir", str(tmp_path), "rollout", "status", "sentiment")
    assert code == 0, err
    text = " ".join(err.split())
    assert "mode shadow" in text and "disagreeing ids: e0, e1, e2, e3, e4" in text
    row = next(line.split() for line in err.splitlines() if line.strip().startswith("shadow "))
    assert row[1] == "0%" and "0.750" in row and row[-3:] == ["fail", "->", "rolled_back"]


def test_a_shadow_without_a_payload_receiver_is_refused(tmp_path: Path) -> None:
    code, _, err = run(
        "--state-dir", str(tmp_path), "rollout", "start", "sentiment", "--version", "2",
    )  # fmt: skip
    assert code == 2 and "needs the champion's payload log" in err and "--mode canary" in err
    code, _, err = run(
        "--state-dir", str(tmp_path), "rollout", "start", "sentiment", "--version", "2",
        "--mode", "sometimes",
    )  # fmt: skip
    assert code == 2 and "--mode: one of shadow, canary, shadow-then-canary" in err
