"""`make demo`'s entry point (`roost demo`) end to end, twice on the same store.

The first run stops what it started; the second runs with --keep-running (the store and its
servers are what tests/e2e/test_lineage_ui.py checks next)."""

from __future__ import annotations

import pytest

from roost.proc import http_ok
from tests.e2e.demo_store import DemoStore

# The two demo runs happen in this test's setup (tests/e2e/conftest.py: test_lineage_ui.py
# reads the same store afterwards): generous on a busy machine, as that module's.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]


def test_demo_runs_the_whole_loop_and_is_rerunnable(demo_store: DemoStore) -> None:
    first = demo_store.first

    assert first["version"] == "1" and first["alias"] == "champion" and first["gate"]["passed"]
    assert first["champion_version"] == "1"
    assert 0.5 < first["test_accuracy"] < 1 and 0.4 < first["test_macro_f1"] < 1
    assert set(first["predictions"]) == {"v1", "v2", "grpc"}
    labels = {p: [row["label"] for row in rows] for p, rows in first["predictions"].items()}
    assert labels["v1"] == labels["v2"] == labels["grpc"] and len(labels["v1"]) == 3
    for stage in ("mlflow", "train", "promote", "serve", "predict"):
        assert first["stages"][stage] > 0
    assert first["mlflow_ui"].startswith("http://127.0.0.1:")
    # The demo stopped what it started: MLflow and the model server no longer answered
    # (observed right after the first run, before the second started its own).
    assert demo_store.after_first == {"server_json": False, "mlflow": False, "metrics": False}

    second = demo_store.second  # same store, no clean-up in between (with --keep-running)
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
    # --keep-running (for test_lineage_ui): MLflow and the new champion's proxy still serve.
    assert http_ok(second["mlflow_ui"] + "/health")
    assert second["rollout"]["proxy"], second["rollout"]
