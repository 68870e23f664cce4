"""``roost tune`` end to end on one machine: the real CLI in its own process, real worker
processes sharing a journal file, the real MLflow server of tests/conftest.py, small data.

Three studies share one state directory (and so one journal file): a K=2 study that is then
continued and promoted, a study whose second trial the median pruner must stop, and a K=2
study that starts warm from it and loses a worker to SIGKILL mid-trial.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest

from roost import proc, tracking
from roost.tune.storage import HeartbeatJournalStorage

pytestmark = pytest.mark.integration

ROWS = "1500"
MODEL = "sentiment-tune-test"
EXPERIMENT = "tune-tests"
SPACE = """\
train.lr: {type: float, low: 3.0e-3, high: 3.0e-2, log: true}
model.embed_dim: {type: categorical, choices: [16, 32]}
"""


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tune")


@pytest.fixture(scope="module")
def client(mlflow_server: tracking.ServerState) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)


def env_for(home: Path, uri: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROOST_", "MLFLOW_TRACKING"))}
    env.update(
        {
            "ROOST_STATE_DIR": str(home / "state"),
            "MLFLOW_TRACKING_URI": uri,
            "ROOST_TRAIN__EPOCHS": "2",
            "ROOST_TRAIN__NUM_THREADS": "1",
            "ROOST_TRAIN__DEVICE": "cpu",
            "ROOST_REGISTRY__MODEL_NAME": MODEL,
            "ROOST_TUNE__POLL_S": "0.2",
            "MLFLOW_CONFIGURE_LOGGING": "false",
        }
    )
    env.update(extra)
    return env


def tune_argv(home: Path, *args: str) -> list[str]:
    space = home / "space.yaml"
    if not space.exists():
        space.write_text(SPACE)
    return [
        sys.executable, "-m", "roost", "tune", "--max-rows", ROWS, "--experiment", EXPERIMENT,
        "--space", str(space), "--json", *args,
    ]  # fmt: skip


def tune(home: Path, uri: str, *args: str, timeout: float = 400, **env: str) -> dict[str, Any]:
    done = subprocess.run(
        tune_argv(home, *args), env=env_for(home, uri, **env), capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def journal(home: Path) -> HeartbeatJournalStorage:
    return HeartbeatJournalStorage(home / "state" / "tune" / "studies.journal", 1, 3600)


def children(client: Any, parent: str) -> list[Any]:
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=100
    )


@pytest.fixture(scope="module")
def parallel_study(home: Path, mlflow_server: tracking.ServerState) -> dict[str, Any]:
    return tune(
        home, mlflow_server.uri, "--study", "k2", "--trials", "4", "--parallel", "2",
        "--sampler", "random", "--pruner", "none",
    )  # fmt: skip


def test_k2_study_records_parent_and_child_runs(parallel_study, client, home: Path) -> None:
    summary = parallel_study
    assert summary["trials"] == {
        "target": 4, "complete": 4, "pruned": 0, "failed": 0, "retried": 0,
    }, summary["errors"]  # fmt: skip
    assert summary["epochs_run"] == 8
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["roost.kind"] == "tune-study"
    assert parent.data.metrics["best_value"] == pytest.approx(summary["best"]["value"])
    assert {"best.train.lr", "best.model.embed_dim", "tune.sampler"} <= set(parent.data.params)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_params.json", "space.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots and "plots/parallel_coordinate.png" in plots

    runs = children(client, parent.info.run_id)
    assert len(runs) == 4
    assert sorted(int(r.data.tags["roost.tune.trial"]) for r in runs) == [0, 1, 2, 3]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["roost.tune.state"] == "COMPLETE"
        assert run.data.tags["roost.kind"] == "tune-trial"
        assert "train.lr" in run.data.params and "model.embed_dim" in run.data.params
        history = client.get_metric_history(run.info.run_id, "val_macro_f1")
        assert [m.step for m in history] == [1, 2]
        assert "test_macro_f1" in run.data.metrics
    best = next(r for r in runs if r.info.run_id == summary["best"]["run_id"])
    assert best.data.metrics["tune_value"] == pytest.approx(summary["best"]["value"])
    # two real worker processes ran and exited cleanly
    logs = sorted((home / "state" / "tune" / "logs").glob("k2-worker-*.log"))
    assert len(logs) == 2
    assert all("worker done" in log.read_text() or log.read_text().count("trial ") for log in logs)


def test_rerun_continues_the_study_and_promote_gates_the_best(
    parallel_study, client, home: Path, mlflow_server: tracking.ServerState
) -> None:
    summary = tune(
        home, mlflow_server.uri, "--study", "k2", "--trials", "5", "--sampler", "random",
        "--pruner", "none", "--promote",
    )  # fmt: skip
    assert summary["parent_run_id"] == parallel_study["parent_run_id"]
    assert summary["trials"]["complete"] == 5
    assert len(children(client, summary["parent_run_id"])) == 5  # one more, not five
    promotion = summary["promotion"]
    assert promotion["promoted"] is True and promotion["alias"] == "challenger"
    version = client.get_model_version(MODEL, promotion["version"])
    assert version.run_id == summary["best"]["run_id"]  # the trial's own model, no retrain
    assert version.tags["roost.gate.decision"] == "passed"
    assert client.get_model_version_by_alias(MODEL, "challenger").version == version.version


def test_the_median_pruner_stops_a_hopeless_trial(home: Path, mlflow_server, client) -> None:
    # Queue a good trial, then a hopeless one (lr 1e-7 barely moves the weights).
    storage = journal(home)
    study = optuna.create_study(study_name="pruned", storage=storage, direction="maximize")
    study.enqueue_trial({"train.lr": 0.03, "model.embed_dim": 32})
    study.enqueue_trial({"train.lr": 1e-7, "model.embed_dim": 32})
    space = home / "space-prune.yaml"
    space.write_text(
        "train.lr: {type: float, low: 1.0e-8, high: 0.05, log: true}\n"
        "model.embed_dim: {type: categorical, choices: [32]}\n"
    )
    summary = tune(
        home, mlflow_server.uri, "--study", "pruned", "--trials", "2", "--pruner", "median",
        "--space", str(space), ROOST_TUNE__STARTUP_TRIALS="1", ROOST_TUNE__WARMUP_EPOCHS="0",
        ROOST_TRAIN__EPOCHS="3",
    )  # fmt: skip
    assert summary["trials"]["complete"] == 1 and summary["trials"]["pruned"] == 1
    assert summary["epochs_run"] == 4  # 3 + the pruned trial's one
    states = {
        r.data.tags["roost.tune.trial"]: r for r in children(client, summary["parent_run_id"])
    }
    assert states["1"].data.tags["roost.tune.state"] == "PRUNED"
    assert states["1"].info.status == "KILLED"
    assert len(client.get_metric_history(states["1"].info.run_id, "val_macro_f1")) == 1


def test_a_sigkilled_worker_trial_is_failed_retried_and_the_study_completes(
    home: Path, mlflow_server: tracking.ServerState, client
) -> None:
    # A 15 s grace: a live trial whose heartbeat a busy machine delays is not taken for dead
    # (at 4 s, one was, once, in a full make test run: "retried" read 2).
    extra = {"ROOST_TUNE__HEARTBEAT_S": "1", "ROOST_TUNE__GRACE_S": "15",
             "ROOST_TRAIN__EPOCHS": "4"}  # fmt: skip
    # (it also starts warm: the best trial of the pruned study is queued first)
    argv = tune_argv(
        home, "--study", "killed", "--trials", "3", "--parallel", "2", "--pruner", "none",
        "--max-rows", "3000", "--warm-start", "pruned",
    )  # fmt: skip
    process = subprocess.Popen(
        argv, env=env_for(home, mlflow_server.uri, **extra), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        victim = wait_for_a_trial_mid_epoch(home)
        os.kill(victim["pid"], signal.SIGKILL)
        out, err = process.communicate(timeout=400)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["trials"]["complete"] == 3 and summary["trials"]["retried"] == 1

    trials = optuna.load_study(study_name="killed", storage=journal(home)).trials
    assert trials[0].params["train.lr"] == pytest.approx(0.03)  # the warm start
    assert trials[0].user_attrs["warm_start_from"] == 0
    killed = trials[victim["number"]]
    assert killed.state.name == "FAIL"
    (retry,) = [
        t for t in trials if victim["number"] in (t.system_attrs.get("retry_history") or [])
    ]
    assert retry.state.name == "COMPLETE" and retry.params == killed.params
    runs = children(client, summary["parent_run_id"])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    lost = next(r for r in runs if r.info.run_id == killed.user_attrs["mlflow_run_id"])
    assert lost.info.status == "FAILED" and lost.data.tags["roost.tune.state"] == "FAIL"


def wait_for_a_trial_mid_epoch(home: Path) -> dict[str, Any]:
    """A running trial that has reported an epoch: its number and its worker's pid."""
    found: dict[str, Any] = {}

    def mid_trial() -> bool:
        try:
            study = optuna.load_study(study_name="killed", storage=journal(home))
        except KeyError:
            return False
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.intermediate_values and "worker" in t.user_attrs:
                found.update(number=t.number, pid=int(t.user_attrs["worker"].rsplit(":", 1)[1]))
                return True
        return False

    proc.wait_until(mid_trial, 300, 0.1, what="a tuning trial past its first epoch")
    return found
