"""The kind render's data tier, started from its manifests: PostgreSQL, S3, bucket Job, MLflow.

Which image each process stands for:
  roost-postgresql (postgres image)  -> Debian's PostgreSQL (initdb/postgres/createdb)
  roost-minio (MinIO image)          -> moto's S3 server
  roost-bucket Job (roost-mlflow)    -> `roost aws bootstrap ...`, the Job's own args
  roost-mlflow (roost-mlflow)        -> `roost mlflow serve ...`, the Deployment's own args
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.cluster.conftest import rendered_for
from tests.cluster.runner import Loopback, Runner
from tests.cluster.stack import NAMESPACE, RELEASE, Stack, start_mlflow

pytestmark = pytest.mark.cluster


def test_the_bucket_job_made_the_bucket_the_chart_names(stack: Stack) -> None:
    bucket = stack.runner.rendered.get("ConfigMap", f"{RELEASE}-templates").doc["data"][
        "artifacts-destination"
    ]
    name = bucket.removeprefix("s3://").split("/", 1)[0]
    s3 = stack.s3_client()
    assert name in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert s3.get_bucket_versioning(Bucket=name)["Status"] == "Enabled"


def test_mlflow_keeps_its_store_in_postgresql(stack: Stack) -> None:
    import psycopg

    env = stack.mlflow.container.env
    uri = env["ROOST_TRACKING__BACKEND_STORE_URI"]
    assert uri.startswith("postgresql://") and "$(" not in uri  # $(POSTGRES_PASSWORD) expanded
    created = httpx.post(
        f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/create",
        json={"name": "cluster-runner-probe"},
        timeout=30,
    )
    assert created.status_code == 200, created.text
    with psycopg.connect(uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT artifact_location FROM experiments WHERE name = %s",
                    ("cluster-runner-probe",))  # fmt: skip
        (location,) = cur.fetchone()
    # The proxied artifact store: clients see mlflow-artifacts:, the server writes to S3.
    assert location.startswith("mlflow-artifacts:")


def test_mlflow_accepts_the_host_headers_in_cluster_clients_send(stack: Stack) -> None:
    """The loopback map changes where clients connect, not the Host header a pod sends:
    MLflow 3 refuses unknown hosts, so the rendered --allowed-hosts must list the Service's."""
    service = f"{RELEASE}-mlflow"
    port = next(p for (s, p) in stack.runner.loopback.ports if s == service)
    url = f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    for form in stack.runner.loopback.forms(service):
        for host in (form, f"{form}:{port}"):
            answer = httpx.get(url, headers={"Host": host}, timeout=30)
            assert answer.status_code == 200, (host, answer.status_code, answer.text[:200])
    refused = httpx.get(url, headers={"Host": "mlflow.attacker.example"}, timeout=30)
    assert refused.status_code in (400, 403), refused.status_code  # the check is on


def test_eks_mlflow_runs_on_the_external_store_secret(stack: Stack, tmp_path: Path) -> None:
    """values-eks.yaml: no PostgreSQL or MinIO in the release; the store URI comes from a
    Secret the operator creates (an RDS endpoint), S3 through IRSA (no keys in the pod)."""
    password = stack.runner.rendered.data("Secret", f"{RELEASE}-postgresql")["password"]
    rds = "roost-db.c0ffee123456.us-east-1.rds.amazonaws.com"
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "roost-mlflow-db", "namespace": NAMESPACE},
        "stringData": {"uri": f"postgresql://mlflow:{password}@{rds}:5432/mlflow"},
    }
    rendered = rendered_for(["values-eks.yaml"], existing=[secret])
    assert not rendered.find("StatefulSet") and not rendered.find("Deployment", f"{RELEASE}-minio")
    loopback = Loopback(NAMESPACE, rendered.cluster_domain)
    # The RDS endpoint -> the PostgreSQL started from the kind render.
    loopback.bind(rds, 5432, stack.postgresql.container.ports[5432])
    runner = Runner(rendered, loopback, tmp_path)
    try:
        mlflow = start_mlflow(runner)
        env = mlflow.container.env
        assert "AWS_ACCESS_KEY_ID" not in env and "MLFLOW_S3_ENDPOINT_URL" not in env
        uri = f"http://127.0.0.1:{mlflow.port('http')}"
        created = httpx.post(
            f"{uri}/api/2.0/mlflow/experiments/create", json={"name": "eks-probe"}, timeout=30
        )
        assert created.status_code == 200, created.text
        # The kind server sees it: both run on the one database behind the Secret's URI.
        seen = httpx.get(
            f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": "eks-probe"},
            timeout=30,
        )
        assert seen.status_code == 200, seen.text
        destination = mlflow.container.argv[
            mlflow.container.argv.index("--artifacts-destination") + 1
        ]
        assert destination == "s3://roost-artifacts-123456789012/mlflow"
    finally:
        runner.stop_all()
