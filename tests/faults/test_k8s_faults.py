"""`roost train --on k8s` and `roost deploy` under API-server faults.

The recorded-API replay server (tests/fixtures/k8s) stands in for the cluster; the fault
proxy sits between it and the CLI's kubernetes client (reached through a kubeconfig, as on
a cluster) and answers 5xx, 409 or resets the connection on one call. Each time: one
`error:` line, the documented exit code (4 unavailable, 1 conflict), and the same command
after the fault clears succeeds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roost import tracking
from tests.faults.conftest import FAST_RETRIES, CliResult, roost
from tests.faults.proxy import FaultProxy, fault_proxy
from tests.fixtures.k8s.chart import templates_configmap
from tests.fixtures.k8s.pod import records_a_run
from tests.fixtures.k8s.replay import ReplayServer, Reply, kubeconfig, serve

pytestmark = pytest.mark.faults

NS = "roost"
JOBS = rf"/apis/batch/v1/namespaces/{NS}/jobs"
JOB = JOBS + r"/roost-train-[0-9a-f-]+"
PODS = rf"/api/v1/namespaces/{NS}/pods"
LOG = PODS + r"/[a-z0-9-]+/log"
CONFIGMAP = rf"/api/v1/namespaces/{NS}/configmaps/roost-templates"
ISVC = rf"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices/sentiment"


@pytest.fixture(scope="module")
def kind_templates() -> dict[str, Any]:
    return templates_configmap(["values-kind.yaml"])


@pytest.fixture
def cluster(
    kind_templates: dict[str, Any], mlflow_server: tracking.ServerState
) -> Iterator[tuple[ReplayServer, FaultProxy]]:
    """The replay server answering a successful Job and deploy, behind a fault proxy.

    The "pod" records its run, tagged with the Job's name, in the session's MLflow server.
    """
    with serve() as replay, fault_proxy(replay.url) as proxy:
        records_a_run(replay, mlflow_server.uri)
        replay.on("GET", CONFIGMAP, Reply.obj(kind_templates))
        replay.on("POST", JOBS, Reply.file("job-created.json", 201))
        replay.on("GET", JOB, Reply.file("job-running.json"), Reply.file("job-complete.json"))
        replay.on("GET", PODS, Reply.file("pods-running.json"), Reply.file("pods-succeeded.json"))
        replay.on("GET", LOG, Reply.file("pod-log-success.txt"))
        replay.on("PATCH", ISVC, Reply.file("isvc-applied.json"))
        replay.on("GET", ISVC, Reply.file("isvc-ready.json"))
        yield replay, proxy


@pytest.fixture
def tracking_uri(mlflow_server: tracking.ServerState) -> str:
    return mlflow_server.uri


def env_for(proxy: FaultProxy, tmp_path: Path, tracking_uri: str = "") -> dict[str, str]:
    env = {
        "KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", proxy.url)),
        "KUBERNETES_SERVICE_HOST": "",
        "ROOST_K8S__POLL_S": "0.01",
        "ROOST_STATE_DIR": str(tmp_path / "state"),
        **FAST_RETRIES,
    }
    if tracking_uri:
        env["ROOST_TRACKING__URI"] = tracking_uri
    return env


def reset(replay: ReplayServer) -> None:
    """Replies start again from the first (a new Job runs, then completes)."""
    for route in replay.routes:
        route.served = 0


TRAIN = ("train", "--on", "k8s", "--epochs", "3", "--json")
DEPLOY = ("deploy", "--version", "2", "--storage-uri", "s3://roost/x", "--json")


def assert_trained(result: CliResult) -> None:
    assert result.code == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["succeeded"] is True and summary["run_id"]


TRAIN_FAULTS = [
    pytest.param("POST", JOBS, "500", 4, id="job-create-500"),
    pytest.param("POST", JOBS, "drop", 4, id="job-create-dropped"),
    pytest.param("POST", JOBS, "409", 1, id="job-create-409"),
    pytest.param("GET", CONFIGMAP, "503", 4, id="templates-read-503"),
    pytest.param("GET", JOB, "500", 4, id="job-status-500-mid-wait"),
    pytest.param("GET", PODS, "drop", 4, id="pod-list-dropped-every-retry"),
    pytest.param("GET", LOG, "500", 4, id="log-follow-500"),
]


def inject(proxy: FaultProxy, fault: str, method: str, path: str) -> None:
    if fault == "drop":
        proxy.drop(method, path + r"(\?|$)")
    else:
        status = int(fault)
        reason = {409: "AlreadyExists", 500: "InternalError"}.get(status, "ServiceUnavailable")
        body = json.dumps(
            {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status,
             "reason": reason, "message": f"injected {status}"}
        ).encode()  # fmt: skip
        proxy.fail(method, path + r"(\?|$)", status, body=body)


@pytest.mark.parametrize(("method", "path", "fault", "code"), TRAIN_FAULTS)
def test_train_on_k8s_fails_with_one_line_then_reruns(
    cluster: tuple[ReplayServer, FaultProxy],
    tmp_path: Path,
    tracking_uri: str,
    method: str,
    path: str,
    fault: str,
    code: int,
) -> None:
    replay, proxy = cluster
    env = env_for(proxy, tmp_path, tracking_uri)
    inject(proxy, fault, method, path)

    failed = roost(env, *TRAIN)

    line = failed.one_error_line()
    assert failed.code == code, failed.stderr[-3000:]
    assert failed.stdout == ""
    assert proxy.hits(method, path), "the fault was never reached"
    if method != "POST" and path != CONFIGMAP:
        # the Job was created: the message says it keeps running and how to stop it
        assert "keeps running" in line and "kubectl -n roost delete job" in line, line

    proxy.restore()
    reset(replay)
    assert_trained(roost(env, *TRAIN))


def test_a_connection_dropped_once_on_a_read_is_retried(
    cluster: tuple[ReplayServer, FaultProxy], tmp_path: Path, tracking_uri: str
) -> None:
    """The kubernetes client retries idempotent reads: one reset costs nothing."""
    _, proxy = cluster
    proxy.drop("GET", JOB + r"(\?|$)", times=1)
    assert_trained(roost(env_for(proxy, tmp_path, tracking_uri), *TRAIN))
    assert [s.outcome for s in proxy.hits("GET", JOB)][:2] == ["dropped", "forwarded"]


def test_job_run_lookup_fails_closed(
    cluster: tuple[ReplayServer, FaultProxy], tmp_path: Path, tracking_uri: str
) -> None:
    """The Job succeeded but its run cannot be read: no run id is made up, exit 4 / 3."""
    replay, proxy = cluster
    with fault_proxy(tracking_uri) as mlflow:
        mlflow.fail("GET", r"/api/2\.0/mlflow/(experiments/get-by-name|runs/search)", 500)
        mlflow.fail("POST", r"/api/2\.0/mlflow/runs/search", 500)
        failed = roost(env_for(proxy, tmp_path, mlflow.url), *TRAIN)
        line = failed.one_error_line()
        assert failed.code == 4 and "looking up the run of Job roost-train-" in line, line

        mlflow.refuse()
        reset(replay)
        failed = roost(env_for(proxy, tmp_path, mlflow.url), *TRAIN)
        line = failed.one_error_line()
        assert failed.code == 4 and "succeeded, but" in line, line

    replay.hooks.clear()  # the pod recorded nothing (another MLflow server?)
    reset(replay)
    failed = roost(env_for(proxy, tmp_path, tracking_uri), *TRAIN)
    line = failed.one_error_line()
    assert failed.code == 3 and "no finished run tagged roost.k8s.job=roost-train-" in line, line


DEPLOY_FAULTS = [
    pytest.param("GET", ISVC, "500", 4, id="rollout-check-500"),
    pytest.param("PATCH", ISVC, "500", 4, id="apply-500"),
    pytest.param("PATCH", ISVC, "drop", 4, id="apply-dropped"),
    pytest.param("PATCH", ISVC, "409", 1, id="apply-409"),
    pytest.param("GET", CONFIGMAP, "drop", 4, id="templates-read-dropped-every-retry"),
]


@pytest.mark.parametrize(("method", "path", "fault", "code"), DEPLOY_FAULTS)
def test_deploy_fails_with_one_line_then_reruns(
    cluster: tuple[ReplayServer, FaultProxy],
    tmp_path: Path,
    method: str,
    path: str,
    fault: str,
    code: int,
) -> None:
    replay, proxy = cluster
    env = env_for(proxy, tmp_path)
    inject(proxy, fault, method, path)

    failed = roost(env, *DEPLOY)

    failed.one_error_line()
    assert failed.code == code, failed.stderr[-3000:]
    assert failed.stdout == ""
    assert proxy.hits(method, path), "the fault was never reached"
    if method == "GET" and path == ISVC:
        assert not replay.calls("PATCH", ISVC)  # unknown rollout state: nothing applied

    proxy.restore()
    reset(replay)
    rerun = roost(env, *DEPLOY)
    assert rerun.code == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["ready"] is True
