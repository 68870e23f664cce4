"""The kind render's workloads started from their manifests against the running data tier.

Which image each process stands for:
  training Job (roost-training)         -> `roost train`, the Job `roost train --on k8s` sends
  storage-initializer (KServe's image)  -> kserve-storage from PyPI (KServe's own downloader)
  predictor (roost-serving)             -> the ServingRuntime's args + the InferenceService's
                                           env, as `roost deploy` applies it
  roost-test-model-ready Pod            -> its `python -c` command, the chart's `helm test`
  roost-rollout (roost-serving)         -> `roost rollout watch --backend kserve`
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from roost import proc
from roost.cli.app import app
from tests.cluster import kserve_pod as kserve
from tests.cluster.runner import Manifest, Running, wait_for
from tests.cluster.stack import RELEASE, Stack, job_labels
from tests.fixtures.k8s.replay import ReplayServer, Reply, kubeconfig, serve

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("own_processes")]

NS = "roost"
JOBS = rf"/apis/batch/v1/namespaces/{NS}/jobs"
JOB = JOBS + r"/roost-train-[0-9a-f-]+"
PODS = rf"/api/v1/namespaces/{NS}/pods"
LOG = PODS + r"/[a-z0-9-]+/log"
CONFIGMAP = rf"/api/v1/namespaces/{NS}/configmaps/{RELEASE}-templates"
ISVCS = rf"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices"
EPOCHS, ROWS = 2, 1500  # killed after epoch 1, the retry trains epoch 2


@pytest.fixture(scope="module")
def api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The Kubernetes API as recorded responses; its templates ConfigMap is the kind render's."""
    cm = stack.runner.rendered.get("ConfigMap", f"{RELEASE}-templates").doc
    with serve() as replay:
        replay.on("GET", CONFIGMAP, Reply.obj(cm))
        config = kubeconfig(tmp_path_factory.mktemp("kube") / "config", replay.url)
        yield {"replay": replay, "kubeconfig": config, "configmap": cm}


def cli(env: dict[str, str], *args: str) -> str:
    result = CliRunner().invoke(
        app, list(args), env={"KUBERNETES_SERVICE_HOST": "", "ROOST_K8S__POLL_S": "0.01", **env}
    )
    assert result.exit_code == 0, result.stdout + result.stderr
    return result.stdout


# -- training ---------------------------------------------------------------------------------


@dataclass
class Trained:
    job: Manifest
    first: Running
    second: Running
    checkpoint_key: str
    bucket: str


@pytest.fixture(scope="module")
def trained(stack: Stack, api: dict[str, Any]) -> Trained:
    """`roost train --on k8s` builds the Job; its pod runs, is SIGKILLed, and a retry resumes."""
    replay: ReplayServer = api["replay"]
    # The Job runs while the CLI watches it, as in a cluster: "running" until its pods (the
    # processes below) are done, then "complete"; the CLI then finds the pods' MLflow run by
    # its roost.k8s.job tag on the (port-forwarded, here loopback) MLflow server.
    replay.on("POST", JOBS, Reply.file("job-created.json", 201))
    replay.on("GET", JOB, Reply.file("job-running.json"))
    replay.on("GET", PODS, Reply.file("pods-running.json"))
    replay.on("GET", LOG, Reply.file("pod-log-success.txt"))
    env = {"KUBECONFIG": str(api["kubeconfig"]), "MLFLOW_TRACKING_URI": stack.mlflow_uri,
           "ROOST_K8S__POLL_S": "0.5"}  # fmt: skip
    outcome: list[str | BaseException] = []

    def submit() -> None:
        try:
            outcome.append(cli(env, "train", "--on", "k8s", "--epochs", str(EPOCHS),
                               "--max-rows", str(ROWS), "--json"))  # fmt: skip
        except BaseException as exc:  # the assertion, handed to the test thread
            outcome.append(exc)

    watcher = threading.Thread(target=submit, daemon=True)
    watcher.start()
    wait_for(lambda: replay.calls("POST", JOBS) or outcome, 120, "the Job's submission")
    if outcome:  # the CLI ended before it submitted anything
        raise AssertionError(f"roost train --on k8s: {outcome[0]}")
    body = replay.calls("POST", JOBS)[-1].json()
    cm_path = stack.runner.rendered.get("ConfigMap", f"{RELEASE}-templates").path
    job = Manifest(f"{cm_path}#training-job.yaml (as `roost train --on k8s` sent it)", body)
    name = job.name

    runner = stack.runner
    first = runner.start(runner.container(job, labels=job_labels(name), pod=f"{name}-a1"))
    env = first.container.env
    bucket, _, prefix = env["ROOST_TRAIN__CHECKPOINT_DIR"].removeprefix("s3://").partition("/")
    key = f"{prefix}/checkpoint.pt"
    s3 = stack.s3_client()

    def checkpointed() -> bool:
        if not first.alive():
            raise first.failure("exited before its first checkpoint")
        return bool(s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount"))

    wait_for(checkpointed, 300, f"s3://{bucket}/{key}")
    first.kill()  # the node dies under the pod
    # The Job controller's retry: a new pod (fresh emptyDirs), the same Job name and env.
    second = runner.start(runner.container(job, labels=job_labels(name), pod=f"{name}-b2"))
    second.wait_exit(600)
    # The Job controller marks the Job complete; the CLI sees it and looks up the run.
    replay.on("GET", JOB, Reply.file("job-complete.json"))
    replay.on("GET", PODS, Reply.file("pods-succeeded.json"))
    replay.routes[:] = replay.routes[-2:] + replay.routes[:-2]  # the new answers come first
    watcher.join(300)
    assert outcome, "roost train --on k8s did not finish after the Job completed"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    summary = json.loads(outcome[0])
    assert summary["succeeded"] and summary["run_id"], summary
    return Trained(job, first, second, key, bucket)


def test_training_job_env_is_what_the_chart_renders(trained: Trained) -> None:
    env = trained.second.container.env
    assert env["ROOST_JOB_NAME"] == trained.job.name  # fieldRef to the Job controller's label
    assert env["ROOST_TRAIN__CHECKPOINT_DIR"] == f"s3://roost/checkpoints/{trained.job.name}"
    assert env["ROOST_TRAIN__EPOCHS"] == str(EPOCHS)  # from `--epochs`, through the CLI
    assert trained.first.process.popen.returncode == -9


def test_training_resumes_into_one_run_with_the_model_under_the_artifact_root(
    stack: Stack, trained: Trained
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow_uri)
    experiment = client.get_experiment_by_name(
        trained.second.container.env["ROOST_TRACKING__EXPERIMENT"]
    )
    runs = client.search_runs([experiment.experiment_id])
    # The retried pod picked up the killed pod's run from the checkpoint: one run, finished.
    assert [r.info.status for r in runs] == ["FINISHED"], [r.info for r in runs]
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
    # Epoch 1 was checkpointed before the kill, so the retry resumed after it and never
    # trained it again. The killed pod may have logged epoch 2 before its own checkpoint of
    # it landed; the retry then trains and logs epoch 2 again (at-least-once, as in a cluster).
    assert steps[0] == 1 and steps.count(1) == 1, steps
    assert set(steps) == set(range(1, EPOCHS + 1)) and steps == sorted(steps), steps
    # The server keeps artifacts under the chart's --artifacts-destination (s3://roost/mlflow).
    destination = stack.mlflow.container.argv[
        stack.mlflow.container.argv.index("--artifacts-destination") + 1
    ]
    bucket, _, prefix = destination.removeprefix("s3://").partition("/")
    keys = [
        o["Key"]
        for page in stack.s3_client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=prefix + "/")
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith("/MLmodel") for k in keys), keys[:20]


# -- roost deploy -> storage initializer -> predictor ------------------------------------------


@dataclass
class Served:
    isvc: Manifest
    predictor: Running
    model_dir: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.predictor.container.ports[8080]}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.predictor.container.ports[8081]}"


def storage_python() -> str:
    """The interpreter that has kserve-storage (this venv's; see docs/cluster-runner.md)."""
    import importlib.util

    if importlib.util.find_spec("kserve_storage") is None:
        pytest.fail(f"kserve-storage=={kserve.KSERVE_STORAGE_VERSION} is not installed: make venv")
    return sys.executable


@pytest.fixture(scope="module")
def served(
    stack: Stack,
    api: dict[str, Any],
    trained: Trained,
    tmp_path_factory: pytest.TempPathFactory,
) -> Served:
    from mlflow import MlflowClient

    from roost import registry
    from roost.config import load_settings

    client = MlflowClient(stack.mlflow_uri)
    experiment = client.get_experiment_by_name(
        trained.second.container.env["ROOST_TRACKING__EXPERIMENT"]
    )
    (run,) = client.search_runs([experiment.experiment_id])
    settings = load_settings(
        None,
        {
            "tracking": {"uri": stack.mlflow_uri},
            "state_dir": tmp_path_factory.mktemp("state"),
        },
    )
    version = registry.promote(settings, run_id=run.info.run_id).version

    replay: ReplayServer = api["replay"]
    replay.on("GET", ISVCS + "/sentiment", Reply.file("status-404-isvc.json", 404))
    replay.on("PATCH", ISVCS + "/sentiment", Reply.file("isvc-applied.json"))
    out = cli(
        {"KUBECONFIG": str(api["kubeconfig"]), "MLFLOW_TRACKING_URI": stack.mlflow_uri},
        "deploy", "--version", version, "--no-wait", "--json",
    )  # fmt: skip
    applied = yaml.safe_load(replay.calls("PATCH", ISVCS + "/sentiment")[-1].body)
    assert json.loads(out)["storage_uri"] == applied["spec"]["predictor"]["model"]["storageUri"]
    cm_path = stack.runner.rendered.get("ConfigMap", f"{RELEASE}-templates").path
    isvc = Manifest(f"{cm_path}#inferenceservice.yaml (as `roost deploy` applied it)", applied)

    runner = stack.runner
    model_dir = tmp_path_factory.mktemp("mnt-models")
    init = runner.container(
        kserve.storage_initializer_pod(runner.rendered, isvc),
        mounts={kserve.MODEL_DIR: model_dir},
    )
    python = storage_python()
    runner.run_once(init, [python, "-c", kserve.INITIALIZER, *init.argv], timeout=300)

    pod = kserve.predictor_pod(runner.rendered, isvc)
    http_port = proc.free_port()
    container = runner.container(
        pod,
        ports={8080: http_port},
        mounts={kserve.MODEL_DIR: model_dir},
        add_env=kserve.knative_env(isvc, http_port),
    )
    predictor = runner.start(container)
    predictor.wait_ready(300)
    return Served(isvc, predictor, model_dir)


def test_storage_initializer_fetched_the_registry_versions_files(served: Served) -> None:
    uri = served.isvc.doc["spec"]["predictor"]["model"]["storageUri"]
    assert uri.startswith("s3://roost/mlflow/")
    assert (served.model_dir / "MLmodel").is_file(), sorted(
        p.name for p in served.model_dir.iterdir()
    )


def test_predictor_answers_rest_v2_and_grpc(served: Served) -> None:
    from roost import client

    texts = ["the flight was wonderful, thank you", "lost my bag and nobody helps"]
    rest = client.predict(texts, client.Protocol.V2, served.http, served.grpc, "sentiment", 60)
    grpc = client.predict(texts, client.Protocol.GRPC, served.http, served.grpc, "sentiment", 60)
    assert [p.label for p in rest.predictions] == [p.label for p in grpc.predictions]
    assert len(rest.predictions) == 2
    assert rest.model_version == served.predictor.container.env["ROOST_SERVING__MODEL_VERSION"]


def test_helm_test_pod_passes_against_the_predictor(stack: Stack, served: Served) -> None:
    runner = stack.runner
    pod = runner.rendered.get("Pod", f"{RELEASE}-test-model-ready")
    url = pod.doc["spec"]["containers"][0]["args"][0]
    host = url.split("//", 1)[1].split("/", 1)[0]
    # Knative's route (not rendered by the chart) -> the predictor's HTTP port.
    runner.loopback.bind(host.split(".", 1)[0], 80, served.predictor.container.ports[8080])
    container = runner.container(pod)
    assert "127.0.0.1" in container.argv[-1], container.argv
    done = runner.run_once(container, timeout=180)
    assert "HTTP 200" in done.log()


# -- the rollout controller ------------------------------------------------------------------


def test_rollout_controller_starts_and_watches(stack: Stack, api: dict[str, Any]) -> None:
    replay: ReplayServer = api["replay"]
    replay.on("GET", ISVCS + "/sentiment", Reply.file("isvc-ready.json"))
    replay.routes.insert(0, replay.routes.pop())  # ahead of the deploy test's 404
    before = len(replay.calls("GET", ISVCS + "/sentiment"))
    runner = stack.runner
    deployment = runner.rendered.get("Deployment", f"{RELEASE}-rollout")
    # In a pod the client finds the API through the projected token at a fixed absolute path
    # (/var/run/secrets/kubernetes.io/serviceaccount); here a kubeconfig points at the replay.
    container = runner.container(
        deployment, add_env=[{"name": "KUBECONFIG", "value": str(api["kubeconfig"])}]
    )
    controller = runner.start(container)

    def two_passes() -> bool:
        if not controller.alive():
            raise controller.failure("exited")
        return len(replay.calls("GET", ISVCS + "/sentiment")) >= before + 2

    wait_for(two_passes, 120, "two reconcile passes of the rollout controller")
    log = controller.log(200)
    assert "watching sentiment@challenger" in log
    assert "waiting:" not in log, log  # MLflow and the API answered every pass
    controller.stop()


# -- the monitor's receiver -------------------------------------------------------------------


def test_monitor_receiver_takes_events_at_the_url_the_isvc_logger_renders(stack: Stack) -> None:
    """The receiver Deployment starts with its rendered args, answers its probes, and takes
    KServe-format CloudEvents at the URL the InferenceService template's logger names."""
    import httpx

    runner = stack.runner
    deployment = runner.rendered.get("Deployment", f"{RELEASE}-monitor")
    service = runner.rendered.get("Service", f"{RELEASE}-monitor")
    local = runner.loopback.bind(service.name, int(service.doc["spec"]["ports"][0]["port"]))
    (spec_container,) = deployment.doc["spec"]["template"]["spec"]["containers"]
    container = runner.container(
        deployment, ports={int(spec_container["ports"][0]["containerPort"]): local}
    )
    receiver = runner.start(container)
    receiver.wait_ready(180)

    cm = runner.rendered.get("ConfigMap", f"{RELEASE}-templates").doc
    template = yaml.safe_load(cm["data"]["inferenceservice.yaml"])
    url = runner.loopback.rewrite(template["spec"]["predictor"]["logger"]["url"])
    assert url.startswith(f"http://127.0.0.1:{local}"), url
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "cluster-1",
        "ce-type": "org.kubeflow.serving.inference.request",
        "ce-source": "http://localhost:9081/",
        "ce-inferenceservicename": "sentiment",
        "ce-namespace": NS,
        "ce-component": "predictor",
        "ce-endpoint": "default",
        "content-type": "application/json",
    }
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["fine"]}]}
    ok = httpx.post(url, headers=headers, json=body, timeout=30)
    assert ok.status_code < 300, ok.text
    missing_id = httpx.post(
        url, headers={k: v for k, v in headers.items() if k != "ce-id"}, json=body, timeout=30
    )
    assert missing_id.status_code == 400 and "ce-id" in missing_id.json()["error"]
    assert receiver.alive()
    receiver.stop()


def test_monitor_watcher_runs_one_pass_over_the_s3_store(
    stack: Stack, api: dict[str, Any], served: Served
) -> None:
    """The watcher Deployment with its rendered args (one `--once` pass): the receiver
    compacts into the bucket (MinIO's keys, the rendered s3:// store), the watcher reads that
    store, judges the champion `served` promoted, and takes its lease; nothing is triggered."""
    import httpx

    runner = stack.runner
    service = runner.rendered.get("Service", f"{RELEASE}-monitor")
    local = runner.loopback.bind(service.name, int(service.doc["spec"]["ports"][0]["port"]))
    receiver_manifest = runner.rendered.get("Deployment", f"{RELEASE}-monitor")
    (spec_container,) = receiver_manifest.doc["spec"]["template"]["spec"]["containers"]
    receiver = runner.start(runner.container(
        receiver_manifest, ports={int(spec_container["ports"][0]["containerPort"]): local},
    ))  # fmt: skip
    receiver.wait_ready(180)
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "watch-1",
        "ce-type": "org.kubeflow.serving.inference.request",
        "ce-source": "/x",
        "ce-inferenceservicename": "sentiment",
        "content-type": "application/json",
    }
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["fine"]}]}
    url = f"http://127.0.0.1:{local}"
    assert httpx.post(url, headers=headers, json=body, timeout=30).status_code == 200

    deployment = runner.rendered.get("Deployment", f"{RELEASE}-monitor-watch")
    container = runner.container(
        deployment, add_env=[{"name": "KUBECONFIG", "value": str(api["kubeconfig"])}]
    )
    args = container.argv
    assert args[args.index("--store") + 1].startswith("s3://")
    runner.run_once(container, [*args, "--once"], timeout=300)
    receiver.stop()
    state_file = container.mounts["/var/lib/roost-watch"] / "watch" / "sentiment.json"
    state = json.loads(state_file.read_text())
    assert state["model"] == "sentiment" and state["owner"], state  # the lease was taken
    assert state["pending"] is None and not state["history"], state
    keys = stack.s3_client().list_objects_v2(Bucket="roost", Prefix="monitor/events/")
    assert [o["Key"] for o in keys.get("Contents", [])], "the receiver compacted nothing to S3"
