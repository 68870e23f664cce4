"""``roost tune --on k8s`` against recorded API responses (tests/fixtures/k8s/tune-*).

The worker Job comes from the chart's templates ConfigMap rendered from ``charts/roost``; the
replay server plays a study whose second worker pod is deleted mid-trial and replaced.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from roost.cli.app import app
from roost.config import load_settings
from roost.errors import ConfigError
from roost.tune import cluster
from tests.fixtures.k8s.chart import templates_configmap
from tests.fixtures.k8s.replay import ReplayServer, Reply, kubeconfig, serve

pytestmark = pytest.mark.integration

NS = "roost"
JOBS = rf"/apis/batch/v1/namespaces/{NS}/jobs"
JOB = JOBS + r"/roost-tune-[0-9a-z-]+"
PODS = rf"/api/v1/namespaces/{NS}/pods"
CONFIGMAP = rf"/api/v1/namespaces/{NS}/configmaps/roost-templates"


@pytest.fixture
def replay() -> Iterator[ReplayServer]:
    with serve() as server:
        yield server


def study_replies(replay: ReplayServer, values: list[str]) -> None:
    replay.on("GET", CONFIGMAP, Reply.obj(templates_configmap(values)))
    replay.on("POST", JOBS, Reply.file("tune-job-running.json", 201))
    replay.on(
        "GET", JOB, Reply.file("tune-job-running.json"), Reply.file("tune-job-running.json"),
        Reply.file("tune-job-complete.json"),
    )  # fmt: skip
    replay.on(
        "GET", PODS, Reply.file("tune-pods-running.json"), Reply.file("tune-pods-replaced.json"),
        Reply.file("tune-pods-succeeded.json"),
    )  # fmt: skip
    for pod, log in (("a1b2c", "a"), ("d3e4f", "b"), ("g5h6i", "c")):
        replay.on(
            "GET",
            PODS + rf"/roost-tune-[0-9a-z-]+-{pod}/log",
            Reply.file(f"tune-pod-log-{log}.txt"),
        )


def cli(replay: ReplayServer, tmp_path: Path, *args: str) -> Any:
    config = kubeconfig(tmp_path / "kubeconfig", replay.url)
    env = {"KUBECONFIG": str(config), "ROOST_K8S__POLL_S": "0.05"}
    return CliRunner().invoke(app, ["tune", "--on", "k8s", *args], env=env)


def test_tune_on_k8s_submits_the_chart_job_and_streams_trials(
    replay: ReplayServer, tmp_path: Path
) -> None:
    study_replies(replay, ["values-kind.yaml"])
    result = cli(
        replay, tmp_path, "--study", "lr-sweep", "--trials", "4", "--parallel", "2",
        "--data", "s3://roost/data/tweets.parquet", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["succeeded"] and doc["finished"] == 4 and doc["target"] == 4
    assert doc["best"] == {"trial": 3, "value": 0.6688}
    assert doc["summary"]["parent_run_id"] == "9f8e7d6c5b4a39281706f5e4d3c2b1a0"
    assert len(doc["pods"]) == 3  # the deleted worker's replacement too

    (created,) = replay.calls("POST", JOBS)
    body = created.json()
    spec = body["spec"]
    assert spec["parallelism"] == 2 and "completions" not in spec
    assert body["metadata"]["name"].startswith("roost-tune-lr-sweep-")
    (container,) = spec["template"]["spec"]["containers"]
    assert container["name"] == "tune" and container["args"] == ["tune-worker", "--summarize"]
    env = {e["name"]: e for e in container["env"]}
    assert env["ROOST_TUNE__STUDY"]["value"] == "lr-sweep"
    assert env["ROOST_TUNE__TRIALS"]["value"] == "4"
    assert env["ROOST_DATA__URI"]["value"] == "s3://roost/data/tweets.parquet"
    assert json.loads(env["ROOST_TUNE__SPACE"]["value"])["train.lr"]["log"] is True
    # the storage: a URL without credentials plus the password as a Secret reference
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "roost-postgresql",
        "key": "password",
    }
    assert re.fullmatch(
        r"postgresql\+psycopg2://mlflow@roost-postgresql\.roost\.svc\.cluster\.local:5432/optuna",
        env["ROOST_TUNE__STORAGE"]["value"],
    )
    # every worker's log followed (the tune container), the deleted pod's too
    followed = {
        r.path.rsplit("/", 2)[-2][-5:] for r in replay.calls("GET", PODS + r"/[a-z0-9-]+/log")
    }
    assert followed == {"a1b2c", "d3e4f", "g5h6i"}
    assert all(
        r.query["container"] == ["tune"] for r in replay.calls("GET", PODS + r"/[a-z0-9-]+/log")
    )


def test_tune_on_k8s_prints_progress_lines(replay: ReplayServer, tmp_path: Path) -> None:
    study_replies(replay, ["values-kind.yaml"])
    result = cli(replay, tmp_path, "--study", "lr-sweep", "--trials", "4", "--parallel", "2")
    assert result.exit_code == 0, result.output
    err = " ".join(result.stderr.split())  # rich wraps at 80 columns without a terminal
    assert "trial 2 PRUNED" in err and "trial 4 COMPLETE" in err
    assert "best #3 0.6688" in err
    assert "4/4 trials finished" in err
    assert result.stdout == ""


def test_the_storage_url_never_goes_into_the_job(tmp_path: Path) -> None:
    settings = load_settings(None, {"tune": {"storage": "postgresql://u:secret@db/optuna"}})
    with pytest.raises(ConfigError, match=r"tune\.storage"):
        cluster.worker_env(settings)


def test_an_external_storage_comes_from_its_secret() -> None:
    import yaml

    configmap = templates_configmap(
        ["values-eks.yaml"], {"tuning": {"storage": {"existingSecret": "optuna-db"}}}
    )
    job = yaml.safe_load(configmap["data"]["tuning-job.yaml"])
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ROOST_TUNE__STORAGE"]["valueFrom"]["secretKeyRef"] == {
        "name": "optuna-db",
        "key": "url",
    }
    assert "PGPASSWORD" not in env


def test_local_data_cannot_reach_a_worker_pod(replay: ReplayServer, tmp_path: Path) -> None:
    result = cli(replay, tmp_path, "--data", str(tmp_path / "x.csv"))
    assert result.exit_code == 2
    assert "cannot read local files" in result.stderr
    assert replay.calls("POST", JOBS) == []
