"""Values the schema accepts but whose containers cannot start: the runner names the manifest
and quotes the program (or says what the kubelet would refuse)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.conftest import KIND_VALUES, rendered_for
from tests.cluster.runner import ContainerFailed, Loopback, Runner
from tests.cluster.stack import NAMESPACE, RELEASE, job_labels

pytestmark = pytest.mark.cluster


def runner_for(extra: dict, tmp_path: Path) -> Runner:
    rendered = rendered_for(KIND_VALUES, extra)
    return Runner(rendered, Loopback(NAMESPACE, rendered.cluster_domain), tmp_path)


def test_an_unknown_flag_fails_with_the_manifest_path_and_the_programs_message(
    tmp_path: Path,
) -> None:
    # A typo in training.args (--epoch for --epochs): valid YAML, valid for the schema.
    runner = runner_for({"training": {"hook": {"enabled": True}, "args": ["--epoch", "2"]}},
                        tmp_path)  # fmt: skip
    (job,) = [m for m in runner.rendered.find("Job") if m.name.startswith(f"{RELEASE}-train-")]
    container = runner.container(job, labels=job_labels(job.name))
    try:
        with pytest.raises(ContainerFailed) as failed:
            runner.run_once(container, timeout=120)
    finally:
        runner.stop_all()
    message = str(failed.value)
    assert message.startswith("roost/templates/training/job.yaml (Job/roost-train-1 ")
    assert "container 'train'" in message and "exited with code 2" in message
    assert "No such option: --epoch" in message  # click's own words, from the program


def test_a_secret_the_render_lacks_fails_before_the_program_starts(tmp_path: Path) -> None:
    # An external backend store whose Secret nobody created: CreateContainerConfigError.
    runner = runner_for(
        {"mlflow": {"backendStore": {"type": "external", "existingSecret": "roost-mlflow-db"}}},
        tmp_path,
    )
    deployment = runner.rendered.get("Deployment", f"{RELEASE}-mlflow")
    with pytest.raises(ContainerFailed) as failed:
        runner.container(deployment)
    message = str(failed.value)
    assert "templates/mlflow/deployment.yaml" in message
    assert (
        "ROOST_TRACKING__BACKEND_STORE_URI" in message and "'roost-mlflow-db' not found" in message
    )


def test_a_server_that_exits_at_start_up_is_reported_with_its_output(tmp_path: Path) -> None:
    # A backend store URI the server cannot use: MLflow exits before /health answers.
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "roost-mlflow-db", "namespace": NAMESPACE},
        "stringData": {"uri": "postgresql+nosuchdriver://mlflow:pw@db:5432/mlflow"},
    }
    rendered = rendered_for(
        KIND_VALUES,
        {"mlflow": {"backendStore": {"type": "external", "existingSecret": "roost-mlflow-db"}}},
        existing=[secret],
    )
    runner = Runner(rendered, Loopback(NAMESPACE, rendered.cluster_domain), tmp_path)
    deployment = rendered.get("Deployment", f"{RELEASE}-mlflow")
    container = runner.container(deployment)
    try:
        with pytest.raises(ContainerFailed) as failed:
            runner.start(container).wait_ready(180)
    finally:
        runner.stop_all()
    message = str(failed.value)
    assert "templates/mlflow/deployment.yaml" in message and "before its readinessProbe" in message
    assert "nosuchdriver" in message  # the server's own error, quoted


def test_a_probe_on_a_port_nothing_listens_on_is_caught(tmp_path: Path) -> None:
    # The readiness probe moved to 5001 while the server listens on mlflow.port (5000): the
    # pod would never become ready.
    probe = {"httpGet": {"path": "/health", "port": 5001}, "periodSeconds": 5}
    runner = runner_for({"mlflow": {"probes": {"readiness": probe}}}, tmp_path)
    with pytest.raises(ContainerFailed) as failed:
        runner.container(runner.rendered.get("Deployment", f"{RELEASE}-mlflow"))
    message = str(failed.value)
    assert message.startswith("roost/templates/mlflow/deployment.yaml (Deployment/roost-mlflow ")
    assert "readinessProbe checks port 5001, where nothing listens" in message
    assert "http=5000" in message
