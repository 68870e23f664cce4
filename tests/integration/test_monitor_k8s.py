"""The watcher's in-cluster retraining: the chart's training Job, as `roost train --on k8s`.

The recorded-API replay server (tests/fixtures/k8s) stands in for the cluster (reached
through a kubeconfig), moto in server mode for S3, and a real MLflow server holds the run
the "pod" records (tests/fixtures/k8s/pod.py). Checked: the retraining data is on S3 before
the Job is created, the Job is the chart's template with the data's ROOST_* variables and
the action's name and labels, the run is found by the Job's tag; and a restarted watcher
whose Job already exists (HTTP 409) follows it instead of creating a second one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import pytest

from roost import tracking
from roost.errors import ConfigError
from roost.monitor.k8s_retrain import data_uri, job_name, retrain_job
from tests.conftest import TEST_EPOCHS, make_settings
from tests.fixtures.k8s.chart import templates_configmap
from tests.fixtures.k8s.pod import records_a_run
from tests.fixtures.k8s.replay import ReplayServer, Reply, kubeconfig, serve

pytestmark = pytest.mark.integration

NS = "roost"
JOBS = rf"/apis/batch/v1/namespaces/{NS}/jobs"
JOB = JOBS + r"/roost-retrain-[0-9a-z]+"
PODS = rf"/api/v1/namespaces/{NS}/pods"
LOG = PODS + r"/[a-z0-9-]+/log"
CONFIGMAP = rf"/api/v1/namespaces/{NS}/configmaps/roost-templates"
STORE = "s3://roost-monitor-k8s/monitor"
ACTION = "3f2a9c41d0"


@pytest.fixture
def cluster(
    tmp_path: Path, moto_s3, mlflow_server: tracking.ServerState, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ReplayServer]:  # type: ignore[no-untyped-def]
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3")
    if "roost-monitor-k8s" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket="roost-monitor-k8s")
    with serve() as replay:
        replay.on("GET", CONFIGMAP, Reply.obj(templates_configmap(["values-kind.yaml"])))
        replay.on("POST", JOBS, Reply.file("job-created.json", 201),
                  Reply.file("status-409-job-exists.json", 409))  # fmt: skip
        replay.on("GET", JOB, Reply.file("job-running.json"), Reply.file("job-complete.json"))
        replay.on("GET", PODS, Reply.file("pods-running.json"), Reply.file("pods-succeeded.json"))
        replay.on("GET", LOG, Reply.file("pod-log-success.txt"))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kubeconfig", replay.url)))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "")
        yield replay


def container_env(manifest: dict[str, Any]) -> dict[str, str]:
    container = next(c for c in manifest["spec"]["template"]["spec"]["containers"]
                     if c["name"] == "train")  # fmt: skip
    return {e["name"]: e.get("value", "") for e in container.get("env") or []}


def test_retraining_runs_as_the_training_job_and_a_restart_follows_it(
    tmp_path: Path, cluster: ReplayServer, mlflow_server: tracking.ServerState
) -> None:
    recorded = records_a_run(cluster, mlflow_server.uri)
    settings = make_settings(
        tmp_path / "state", mlflow_server.uri,
        k8s={"poll_s": 0.01}, monitor={"store": STORE, "train_on": "k8s"},
    )  # fmt: skip
    data = tmp_path / "data.parquet"
    pd.DataFrame({"text": ["good", "bad"], "label": ["positive", "negative"]}).to_parquet(data)

    run_id = retrain_job(settings, STORE, ACTION, data)

    assert run_id == recorded.run_id
    (created,) = cluster.calls("POST", JOBS)
    manifest = created.json()
    assert manifest["metadata"]["name"] == job_name(ACTION) == f"roost-retrain-{ACTION}"
    assert manifest["metadata"]["labels"]["roost.io/submitted-by"] == "roost-monitor"
    env = container_env(manifest)
    uri = data_uri(STORE, ACTION)
    assert env["ROOST_DATA__URI"] == uri == f"{STORE}/retrain/{ACTION}/data.parquet"
    # the whole uploaded set (no sample of it), the watcher's training settings
    assert "ROOST_DATA__MAX_ROWS" not in env
    assert env["ROOST_TRAIN__EPOCHS"] == str(TEST_EPOCHS)
    body = (
        boto3.client("s3")
        .get_object(Bucket="roost-monitor-k8s", Key=f"monitor/retrain/{ACTION}/data.parquet")[
            "Body"
        ]
        .read()
    )
    assert body == data.read_bytes()

    # A watcher killed after creating the Job, restarted: the create answers 409, it
    # follows the existing Job and finds the same run; no second training run is recorded.
    cluster.hooks.clear()
    for route in cluster.routes:
        if route.method == "GET":
            route.served = 0
    assert retrain_job(settings, STORE, ACTION, data) == recorded.run_id
    assert len(cluster.calls("POST", JOBS)) == 2  # the second create was refused (409)
    assert len(cluster.calls("GET", JOB)) >= 2


def test_k8s_retraining_needs_an_s3_store() -> None:
    with pytest.raises(ConfigError, match="s3://"):
        data_uri("/var/lib/roost-monitor", ACTION)
