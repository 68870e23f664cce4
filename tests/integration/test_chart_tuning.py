"""The chart's tuning parts: the worker Job template (in the templates ConfigMap, as the
training Job) and the Optuna database, for every value set. Kubernetes schemas, pod security,
labels, network policies and checkov run over them in tests/integration/test_chart.py (they
walk every object and every embedded template); these tests pin what tuning promises."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.fixtures.k8s.chart import CHART, VALUE_SETS, documents, find, render, values_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def docs() -> dict[str, list[dict[str, Any]]]:
    return {name: documents(render(values_of(files))) for name, files in VALUE_SETS.items()}


def tuning_job(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = find(objects, "ConfigMap", "roost-templates")
    return yaml.safe_load(cm["data"]["tuning-job.yaml"])


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env") or []}


def test_tuning_job_template_for_every_value_set(docs) -> None:
    for name, objects in docs.items():
        job = tuning_job(objects)
        spec = job["spec"]
        assert job["kind"] == "Job" and job["metadata"]["name"] == "roost-tune", name
        assert spec["parallelism"] >= 1 and "completions" not in spec, name
        assert spec["backoffLimit"] == 6, name
        rules = spec["podFailurePolicy"]["rules"]
        assert {
            "action": "Ignore",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        } in rules
        pod = spec["template"]["spec"]
        (tune,) = pod["containers"]
        assert tune["name"] == "tune" and tune["args"] == ["tune-worker", "--summarize"]
        assert pod["serviceAccountName"] == "roost-training"  # same image, same S3 access
        labels = spec["template"]["metadata"]["labels"]
        assert labels["roost.io/postgresql-access"] == "true"
        assert labels["roost.io/mlflow-access"] == "true"


def test_tuning_job_uses_gpus_like_the_training_job(docs) -> None:
    pod = tuning_job(docs["eks"])["spec"]["template"]["spec"]
    (tune,) = pod["containers"]
    assert tune["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert env_of(tune)["ROOST_TRAIN__DEVICE"]["value"] == "cuda"
    kind = tuning_job(docs["kind"])["spec"]["template"]["spec"]
    assert (
        "nodeSelector" not in kind
        and "nvidia.com/gpu" not in kind["containers"][0]["resources"]["limits"]
    )
    assert env_of(kind["containers"][0])["ROOST_TRAIN__DEVICE"]["value"] == "cpu"


def test_storage_credentials_are_secret_references_only(docs) -> None:
    kind = env_of(tuning_job(docs["kind"])["spec"]["template"]["spec"]["containers"][0])
    assert kind["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "roost-postgresql",
        "key": "password",
    }
    assert kind["ROOST_TUNE__STORAGE"]["value"] == (
        "postgresql+psycopg2://mlflow@roost-postgresql.roost.svc.cluster.local:5432/optuna"
    )
    eks = env_of(tuning_job(docs["eks"])["spec"]["template"]["spec"]["containers"][0])
    assert eks["ROOST_TUNE__STORAGE"]["valueFrom"]["secretKeyRef"] == {
        "name": "roost-optuna-db",
        "key": "url",
    }
    assert "PGPASSWORD" not in eks
    for objects in docs.values():
        text = yaml.safe_dump(tuning_job(objects))
        assert ":$(" not in text and "password@" not in text


def test_the_chart_creates_the_optuna_database(docs) -> None:
    (job,) = find(docs["kind"], "Job", "roost-tuning-db")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    script = container["command"][-1]
    assert "SELECT 1 FROM pg_database WHERE datname = 'optuna'" in script
    assert 'CREATE DATABASE "optuna"' in script
    assert (
        env_of(container)["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "roost-postgresql"
    )
    assert not find(docs["eks"], "Job", "roost-tuning-db")  # an external database there
    policy = find(docs["kind"], "NetworkPolicy", "roost-postgresql")[0]
    peers = policy["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"roost.io/postgresql-access": "true"}}} in peers


def test_tuning_can_be_switched_off() -> None:
    objects = documents(render(values_of(["values-kind.yaml"], {"tuning": {"enabled": False}})))
    (cm,) = find(objects, "ConfigMap", "roost-templates")
    assert "tuning-job.yaml" not in cm["data"]
    assert not find(objects, "Job", "roost-tuning-db")


def test_an_external_database_needs_its_secret() -> None:
    import helm_python

    values = values_of(["values-eks.yaml"], {"tuning": {"storage": {"existingSecret": ""}}})
    with pytest.raises(helm_python.HelmError, match=r"tuning\.storage\.existingSecret"):
        render(values)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"tuning": {"parallelism": 0}}, "parallelism"),
        ({"tuning": {"parallelism": "two"}}, "parallelism"),
        ({"tuning": {"backoffLimit": -1}}, "backoffLimit"),
        ({"tuning": {"gpu": {"enabled": "yes"}}}, "enabled"),
        ({"tuning": {"storage": {"database": "Optuna DB"}}}, "database"),
        ({"tuning": {"paralelism": 2}}, "paralelism"),
        ({"tuning": {"resources": {"requests": None}}}, "requests"),
    ],
)
def test_schema_rejects_bad_tuning_values(values: dict[str, Any], field: str) -> None:
    import helm_python

    chart = helm_python.Chart.load(str(CHART))
    with pytest.raises(helm_python.HelmValuesError) as error:
        chart.validate_schema(values)
    assert field in str(error.value)
