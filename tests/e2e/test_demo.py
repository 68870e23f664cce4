"""`make demo`'s entry point (`roost demo`) end to end, twice on the same store."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from roost.proc import http_ok

pytestmark = pytest.mark.e2e


def demo(state: Path) -> dict:  # type: ignore[type-arg]
    result = subprocess.run(
        [sys.executable, "-m", "roost", "--state-dir", str(state), "demo", "--json",
         "--max-rows", "6000", "--epochs", "4"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """The demo's store; whatever a failed or timed-out demo left running is stopped after.

    The servers run in sessions of their own, so killing the timed-out ``roost demo`` leaves
    MLflow, nginx and the model servers serving (and loading the machine for the tests after).
    """
    state = tmp_path / "state"
    try:
        yield state
    finally:
        for command in (["rollout", "down"], ["mlflow", "down"]):
            subprocess.run(
                [sys.executable, "-m", "roost", "--state-dir", str(state), *command],
                capture_output=True, timeout=120, check=False,
            )  # fmt: skip


def test_demo_runs_the_whole_loop_and_is_rerunnable(state: Path) -> None:
    first = demo(state)

    assert first["version"] == "1" and first["alias"] == "champion" and first["gate"]["passed"]
    assert first["champion_version"] == "1"
    assert 0.5 < first["test_accuracy"] < 1 and 0.4 < first["test_macro_f1"] < 1
    assert set(first["predictions"]) == {"v1", "v2", "grpc"}
    labels = {p: [row["label"] for row in rows] for p, rows in first["predictions"].items()}
    assert labels["v1"] == labels["v2"] == labels["grpc"] and len(labels["v1"]) == 3
    for stage in ("mlflow", "train", "promote", "serve", "predict"):
        assert first["stages"][stage] > 0
    assert first["mlflow_ui"].startswith("http://127.0.0.1:")
    # The demo stopped what it started: MLflow and the model server no longer answer.
    assert not (state / "mlflow" / "server.json").exists()
    assert not http_ok(first["mlflow_ui"] + "/health")
    assert not http_ok(first["endpoints"]["metrics"])

    second = demo(state)  # same store, no clean-up in between
    assert second["version"] == "2"
    assert second["run_id"] != first["run_id"]
    assert second["gate"]["passed"]  # same data and seed: the same score passes (>=)
    # A champion existed, so v2 went through the canary (same weights: no drift, no errors).
    assert second["rollout"]["outcome"] == "promoted", second["rollout"]
    # ...after a shadow phase: pairs judged, all agreeing (the same weights), then the steps.
    shadow = second["rollout"]["shadow"]
    assert shadow["status"] == "passed" and shadow["pairs"] >= 60, shadow
    assert shadow["agreement"] == 1.0
    assert [row["step"] for row in second["rollout"]["steps"]][:2] == ["shadow", 1]
    assert second["rollout"]["traffic"]["failed"] == 0
    assert second["rollout"]["traffic"]["by_version"].get("2", 0) > 0
    assert second["champion_version"] == "2"
    assert not http_ok(second["mlflow_ui"] + "/health")
