"""The Kubernetes code paths against recorded API responses served over HTTP on loopback.

The real ``kubernetes`` client talks to ``tests/fixtures/k8s/replay.py``; the CLI tests
reach it through a kubeconfig, exactly as on a cluster. The chart's templates ConfigMap is
rendered from ``charts/roost`` so the CLI is tested against the chart as it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from roost import k8s, k8s_jobs
from roost.cli.app import app
from roost.config import Settings, load_settings
from roost.errors import Conflict, NotFound, Timeout, Unavailable
from tests.fixtures.k8s.chart import templates_configmap
from tests.fixtures.k8s.pod import RecordedRun, records_a_run
from tests.fixtures.k8s.replay import (
    FIXTURES,
    ReplayServer,
    Reply,
    api_client,
    kubeconfig,
    serve,
)

pytestmark = pytest.mark.integration

NS = "roost"
JOBS = rf"/apis/batch/v1/namespaces/{NS}/jobs"
JOB = JOBS + r"/roost-train-[0-9a-f-]+"
PODS = rf"/api/v1/namespaces/{NS}/pods"
LOG = PODS + r"/[a-z0-9-]+/log"
CONFIGMAP = rf"/api/v1/namespaces/{NS}/configmaps/roost-templates"
ISVC = rf"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices/sentiment"


class FakeClock:
    """sleep() moves time on, so waits and deadlines run instantly and deterministically."""

    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def replay() -> Iterator[ReplayServer]:
    with serve() as server:
        yield server


@pytest.fixture
def kind_templates() -> dict[str, Any]:
    return templates_configmap(["values-kind.yaml"])


def job_manifest(kind_templates: dict[str, Any], name: str = "roost-train-20250601-120000-ab12"):
    base = k8s.template(kind_templates["data"], k8s.TEMPLATE_JOB, "Job")
    env = [{"name": "ROOST_TRAIN__EPOCHS", "value": "3"}]
    return k8s_jobs.job_manifest(base, name, env, {"roost.io/submitted-by": "roost-cli"})


def run(replay: ReplayServer, manifest: dict[str, Any], timeout: float = 600.0, lines=None):
    clock = FakeClock()
    return k8s_jobs.run_job(
        api_client(replay.url),
        NS,
        manifest,
        timeout_s=timeout,
        poll_s=2.0,
        on_line=(lambda pod, line: lines.append((pod, line))) if lines is not None else None,
        sleep=clock.sleep,
        clock=clock,
    )


# -- training Jobs ---------------------------------------------------------------------------


def test_job_submit_stream_and_complete(replay: ReplayServer, kind_templates) -> None:
    replay.on("POST", JOBS, Reply.file("job-created.json", 201))
    replay.on("GET", JOB, Reply.file("job-running.json"), Reply.file("job-complete.json"))
    replay.on("GET", PODS, Reply.file("pods-running.json"), Reply.file("pods-succeeded.json"))
    replay.on("GET", LOG, Reply.file("pod-log-success.txt"))
    lines: list[tuple[str, str]] = []

    result = run(replay, job_manifest(kind_templates), lines=lines)

    assert result.state.phase == "succeeded"
    assert (result.report.epoch, result.report.loss) == (3, 0.6120)  # progress, from the log
    assert result.run is None  # the run itself is looked up in MLflow by the CLI
    # every log line shown once, although the log was read again after the pod finished
    assert [line for _, line in lines] == Path(
        "tests/fixtures/k8s/pod-log-success.txt"
    ).read_text().splitlines()
    (created,) = replay.calls("POST", JOBS)
    body = created.json()
    assert body["metadata"]["name"] == "roost-train-20250601-120000-ab12"
    env = {
        e["name"]: e.get("value") for e in body["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["ROOST_TRAIN__EPOCHS"] == "3"
    assert env["MLFLOW_TRACKING_URI"].startswith("http://roost-mlflow.roost.svc")
    assert created.query.get("fieldManager") == ["roost"]
    (listing, *_) = replay.calls("GET", PODS)
    assert listing.query["labelSelector"] == [
        "batch.kubernetes.io/job-name=roost-train-20250601-120000-ab12"
    ]
    log = replay.calls("GET", LOG)[0]
    assert log.query["follow"] == ["true"] and log.query["container"] == ["train"]


def test_failed_job_streams_every_attempt_and_raises(replay: ReplayServer, kind_templates) -> None:
    replay.on("POST", JOBS, Reply.file("job-created.json", 201))
    replay.on(
        "GET", JOB, Reply.file("job-running.json"), Reply.file("job-retrying.json"),
        Reply.file("job-failed.json"),
    )  # fmt: skip
    replay.on(
        "GET", PODS, Reply.file("pods-running.json"), Reply.file("pods-first-failed.json"),
        Reply.file("pods-both-failed.json"),
    )  # fmt: skip
    replay.on("GET", LOG, Reply.file("pod-log-failed.txt"))
    lines: list[tuple[str, str]] = []

    with pytest.raises(k8s_jobs.JobFailed) as failure:
        run(replay, job_manifest(kind_templates), lines=lines)

    message = str(failure.value)
    assert "failed: BackoffLimitExceeded" in message
    assert "Could not connect to the endpoint URL" in message  # the last log line
    pods = {pod for pod, _ in lines}
    assert pods == {
        "roost-train-20250601-120000-ab12-x7k2p",
        "roost-train-20250601-120000-ab12-q9w4r",
    }
    assert failure.value.exit_code == 1


def test_a_quiet_log_at_the_deadline_is_a_timeout(replay: ReplayServer, kind_templates) -> None:
    """The log read times out when the wait's time is up: that is the wait's Timeout."""
    replay.on("POST", JOBS, Reply.file("job-created.json", 201))
    replay.on("GET", JOB, Reply.file("job-running.json"))
    replay.on("GET", PODS, Reply.file("pods-running.json"))
    log = Reply.file("pod-log-success.txt")
    replay.on("GET", LOG, Reply(log.status, log.body, log.content_type, stall_s=3.0))
    lines: list[tuple[str, str]] = []
    with pytest.raises(Timeout) as timeout:
        run(replay, job_manifest(kind_templates), timeout=1.0, lines=lines)
    assert "still running after 1s" in str(timeout.value)
    assert "kubectl -n roost delete job roost-train-20250601-120000-ab12" in str(timeout.value)
    assert len(lines) == 1  # the line sent before the log went quiet was shown


def test_job_name_taken_is_a_conflict(replay: ReplayServer, kind_templates) -> None:
    replay.on("POST", JOBS, Reply.file("status-409-job-exists.json", 409))
    with pytest.raises(Conflict, match="conflict"):
        run(replay, job_manifest(kind_templates))
    assert not replay.calls("GET", JOB)


def test_pod_stuck_pulling_times_out_with_the_reason(replay: ReplayServer, kind_templates) -> None:
    replay.on("POST", JOBS, Reply.file("job-created.json", 201))
    replay.on("GET", JOB, Reply.file("job-running.json"))
    replay.on("GET", PODS, Reply.file("pods-pending-imagepull.json"))
    with pytest.raises(Timeout) as timeout:
        run(replay, job_manifest(kind_templates), timeout=30)
    assert "ImagePullBackOff" in str(timeout.value)
    assert "kubectl -n roost delete job roost-train-20250601-120000-ab12" in str(timeout.value)
    assert not replay.calls("GET", LOG)


# -- InferenceService apply + wait ----------------------------------------------------------


def isvc_from_chart(kind_templates: dict[str, Any], version: str = "2") -> dict[str, Any]:
    base = k8s.template(kind_templates["data"], k8s.TEMPLATE_ISVC, "InferenceService")
    return k8s.isvc_manifest(
        base, "s3://roost/mlflow/1/models/m-7c2f0e5b9a8d4c1e/artifacts", version
    )


def test_deploy_applies_then_waits_for_the_new_revision(
    replay: ReplayServer, kind_templates
) -> None:
    replay.on("PATCH", ISVC, Reply.file("isvc-applied.json"))
    replay.on(
        "GET",
        ISVC,
        Reply.file("status-404-isvc.json", 404),  # deploy first looks for a rollout in flight
        Reply.file("isvc-reconciling.json"),
        Reply.file("isvc-ready.json"),
    )
    seen: list[str] = []
    clock = FakeClock()

    result = k8s.deploy(
        api_client(replay.url), NS, isvc_from_chart(kind_templates), force=False, wait=True,
        timeout_s=600, poll_s=2, on_status=lambda r: seen.append(r.reason), sleep=clock.sleep,
    )  # fmt: skip

    assert result.ready and result.generation == 2 and result.version == "2"
    assert result.url == "http://sentiment-predictor.roost.127.0.0.1.sslip.io"
    assert "RevisionMissing" in seen[0] and seen[-1] == "Ready"
    (apply,) = replay.calls("PATCH", ISVC)
    assert apply.content_type == "application/apply-patch+yaml"
    assert apply.query["fieldManager"] == ["roost"] and apply.query["force"] == ["false"]
    sent = yaml.safe_load(apply.body)
    model = sent["spec"]["predictor"]["model"]
    assert model["storageUri"] == "s3://roost/mlflow/1/models/m-7c2f0e5b9a8d4c1e/artifacts"
    assert {"name": "ROOST_SERVING__MODEL_VERSION", "value": "2"} in model["env"]
    assert "canaryTrafficPercent" not in sent["spec"]["predictor"]
    # the stale Ready of the apply answer (status of generation 1) was not taken for Ready
    assert len(replay.calls("GET", ISVC)) == 3


def test_deploy_refuses_while_a_rollout_is_in_flight(replay: ReplayServer, kind_templates) -> None:
    live = json.loads((FIXTURES / "isvc-ready.json").read_text())
    live["metadata"].setdefault("annotations", {})["rollout.roost.io/state"] = json.dumps(
        {"id": "r1", "phase": "progressing", "version": "3"}
    )
    replay.on("GET", ISVC, Reply.obj(live))
    with pytest.raises(Conflict, match=r"rollout in flight \(progressing\)"):
        k8s.deploy(
            api_client(replay.url), NS, isvc_from_chart(kind_templates), force=True, wait=False,
            timeout_s=60, poll_s=1,
        )  # fmt: skip
    assert not replay.calls("PATCH", ISVC)  # nothing applied, not even with --force

    live["metadata"]["annotations"]["rollout.roost.io/state"] = json.dumps({"phase": "promoted"})
    replay.routes.clear()  # routes match first-registered first
    replay.on("GET", ISVC, Reply.obj(live))
    replay.on("PATCH", ISVC, Reply.file("isvc-applied.json"))
    k8s.deploy(
        api_client(replay.url), NS, isvc_from_chart(kind_templates), force=False, wait=False,
        timeout_s=60, poll_s=1,
    )  # fmt: skip
    assert len(replay.calls("PATCH", ISVC)) == 1  # a finished rollout does not block deploys


def test_apply_conflict_names_the_fields_and_their_owner(
    replay: ReplayServer, kind_templates
) -> None:
    replay.on("PATCH", ISVC, Reply.file("status-409-apply-conflict.json", 409))
    with pytest.raises(Conflict) as conflict:
        k8s.apply_isvc(api_client(replay.url), NS, isvc_from_chart(kind_templates))
    message = str(conflict.value)
    assert ".spec.predictor.model.storageUri" in message and '"roost-rollout"' in message


def test_force_takes_over_the_fields(replay: ReplayServer, kind_templates) -> None:
    replay.on("PATCH", ISVC, Reply.file("isvc-applied.json"))
    k8s.apply_isvc(api_client(replay.url), NS, isvc_from_chart(kind_templates), force=True)
    assert replay.calls("PATCH", ISVC)[0].query["force"] == ["true"]


def test_wait_times_out_with_knatives_reason(replay: ReplayServer) -> None:
    replay.on("GET", ISVC, Reply.file("isvc-failing.json"))
    clock = FakeClock()
    with pytest.raises(Timeout, match=r"not Ready after 60s: .*RevisionFailed.*no such key"):
        k8s.wait_isvc_ready(
            api_client(replay.url), NS, "sentiment", 60, 5, sleep=clock.sleep, clock=clock
        )
    assert len(replay.calls("GET", ISVC)) == 13  # at 0, 5, ..., 60 s


def test_forbidden_and_missing_objects_are_clear(replay: ReplayServer) -> None:
    replay.on("PATCH", ISVC, Reply.file("status-403-forbidden.json", 403))
    replay.on("GET", CONFIGMAP, Reply.file("status-404-configmap.json", 404))
    api = api_client(replay.url)
    with pytest.raises(Unavailable, match="not allowed"):
        k8s.apply_isvc(api, NS, {"metadata": {"name": "sentiment"}})
    with pytest.raises(NotFound, match=r"install the chart first .*helm upgrade --install"):
        k8s.read_templates(api, NS, "roost-templates")


def test_unreachable_api_server_is_unavailable() -> None:
    from roost.proc import free_port

    api = api_client(f"http://127.0.0.1:{free_port()}")
    api.configuration.retries = 0
    with pytest.raises(Unavailable, match="cannot reach the Kubernetes API"):
        k8s.get_isvc(api, NS, "sentiment")


# -- the CLI, through a kubeconfig -----------------------------------------------------------


@pytest.fixture
def cli_env(replay: ReplayServer, tmp_path: Path, kind_templates) -> dict[str, str]:
    replay.on("GET", CONFIGMAP, Reply.obj(kind_templates))
    config = kubeconfig(tmp_path / "kubeconfig", replay.url)
    return {
        "KUBECONFIG": str(config),
        "KUBERNETES_SERVICE_HOST": "",  # never the in-cluster config
        "ROOST_K8S__POLL_S": "0.01",
    }


@pytest.fixture
def pod_records_a_run(replay: ReplayServer, cli_env: dict[str, str], mlflow_server) -> RecordedRun:  # type: ignore[no-untyped-def]
    """The pod's run in the session's real MLflow server, which the CLI is pointed at."""
    cli_env["ROOST_TRACKING__URI"] = mlflow_server.uri
    return records_a_run(replay, mlflow_server.uri)


def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result.exit_code, result.stdout, result.stderr


def test_cli_train_on_k8s(
    replay: ReplayServer, cli_env: dict[str, str], pod_records_a_run: RecordedRun
) -> None:
    replay.on("POST", JOBS, Reply.file("job-created.json", 201))
    replay.on("GET", JOB, Reply.file("job-running.json"), Reply.file("job-complete.json"))
    replay.on("GET", PODS, Reply.file("pods-running.json"), Reply.file("pods-succeeded.json"))
    replay.on("GET", LOG, Reply.file("pod-log-success.txt"))

    code, out, err = cli(
        cli_env, "train", "--on", "k8s", "--epochs", "3", "--data", "s3://roost/data/t.csv",
        "--json",
    )  # fmt: skip

    assert code == 0, err
    summary = json.loads(out)
    assert summary["succeeded"] is True
    assert summary["job"] == pod_records_a_run.job
    assert summary["run_id"] == pod_records_a_run.run_id  # by the tag, not from the log
    assert summary["test_accuracy"] == 0.6911 and summary["epochs_seen"] == 3
    body = replay.calls("POST", JOBS)[0].json()
    assert body["metadata"]["name"] == summary["job"]
    container = body["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ROOST_TRAIN__EPOCHS"] == "3"
    assert env["ROOST_DATA__URI"] == "s3://roost/data/t.csv"
    assert container["image"] == "roost-training:dev"  # from the chart's kind values
    assert body["metadata"]["labels"]["roost.io/submitted-by"] == "roost-cli"


def test_cli_train_on_k8s_human_output_and_failure(
    replay: ReplayServer, cli_env: dict[str, str]
) -> None:
    replay.on("POST", JOBS, Reply.file("job-created.json", 201))
    replay.on("GET", JOB, Reply.file("job-failed.json"))
    replay.on("GET", PODS, Reply.file("pods-both-failed.json"))
    replay.on("GET", LOG, Reply.file("pod-log-failed.txt"))

    code, out, err = cli(cli_env, "train", "--on", "k8s")

    assert code == 1 and out == ""
    assert "epoch 1: train loss 0.9632" in err  # the pods' logs are streamed
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: Job roost/roost-train-") and "BackoffLimitExceeded" in last


def test_cli_train_on_k8s_rejects_a_local_data_file(cli_env: dict[str, str], replay) -> None:
    code, _, err = cli(cli_env, "train", "--on", "k8s", "--data", "tweets.csv")
    assert code == 2 and "upload it to S3" in err
    assert not replay.requests  # nothing was sent to the cluster


def test_cli_deploy(replay: ReplayServer, cli_env: dict[str, str]) -> None:
    replay.on("PATCH", ISVC, Reply.file("isvc-applied.json"))
    replay.on("GET", ISVC, Reply.file("isvc-reconciling.json"), Reply.file("isvc-ready.json"))

    code, out, err = cli(
        cli_env, "deploy", "--version", "2", "--canary", "20", "--json",
        "--storage-uri", "s3://roost/mlflow/1/models/m-7c2f0e5b9a8d4c1e/artifacts",
    )  # fmt: skip

    assert code == 0, err
    summary = json.loads(out)
    assert summary["ready"] is True and summary["version"] == "2" and summary["canary"] == 20
    assert summary["url"] == "http://sentiment-predictor.roost.127.0.0.1.sslip.io"
    sent = yaml.safe_load(replay.calls("PATCH", ISVC)[0].body)
    predictor = sent["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 20
    assert predictor["model"]["runtime"] == "roost-predictor"
    assert predictor["serviceAccountName"] == "roost-serving"


def test_cli_deploy_conflict_is_one_line(replay: ReplayServer, cli_env: dict[str, str]) -> None:
    replay.on("PATCH", ISVC, Reply.file("status-409-apply-conflict.json", 409))
    code, out, err = cli(cli_env, "deploy", "--version", "2", "--storage-uri", "s3://roost/x")
    assert code == 1 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: InferenceService roost/sentiment: conflict (")
    assert "roost-rollout" in last


def test_cli_deploy_grpc_needs_the_grpc_template(cli_env: dict[str, str], replay) -> None:
    # the chart's defaults render no gRPC InferenceService (the kind values do)
    replay.on("GET", CONFIGMAP, Reply.obj(templates_configmap([])))
    replay.routes.insert(0, replay.routes.pop())
    code, _, err = cli(cli_env, "deploy", "--version", "2", "--protocol", "grpc")
    assert code == 2 and "serving.grpc.enabled=true" in err
    assert not replay.calls("PATCH", ".*")


def test_cli_deploy_without_a_cluster(tmp_path: Path) -> None:
    env = {"KUBECONFIG": str(tmp_path / "absent"), "KUBERNETES_SERVICE_HOST": ""}
    code, out, err = cli(env, "deploy", "--version", "2", "--storage-uri", "s3://roost/x")
    assert code == 4 and out == "" and "no Kubernetes configuration" in err


# -- the registry's URI of a version, with a real MLflow server ------------------------------


def test_registry_version_maps_to_its_files_under_the_artifact_root(
    settings: Settings, champion, state_dir: Path
) -> None:
    """The proxied artifact store keeps a version's files at <destination>/<path>."""
    from roost.cli.cluster import resolve_storage_uri

    cfg = load_settings(None, {"state_dir": state_dir, "tracking": {"uri": settings.tracking.uri}})
    uri = resolve_storage_uri(
        cfg, champion.version, "roost", None, {"artifacts-destination": "s3://roost/mlflow"}
    )
    assert uri.startswith("s3://roost/mlflow/")
    relative = uri.removeprefix("s3://roost/mlflow/")
    local = state_dir / "mlflow" / "artifacts" / relative  # the fixture server's destination
    assert (local / "MLmodel").is_file(), f"{uri} does not map to a model directory"
    with pytest.raises(NotFound, match="no version 999"):
        resolve_storage_uri(cfg, "999", "roost", None, {"artifacts-destination": "s3://x/y"})
