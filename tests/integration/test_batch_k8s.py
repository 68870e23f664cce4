"""`roost batch --on k8s` against the recorded-API replay server, with moto's S3 as storage.

The shards run here first (what the Job's pods do, each with its completion index), then
the CLI submits the Indexed Job built from the chart's template, follows it to Complete and
runs the finalize step, which writes the manifest and _SUCCESS under the S3 prefix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from roost.batch import runner
from roost.cli.app import app
from roost.config import Settings, load_settings
from tests.fixtures.k8s.chart import templates_configmap
from tests.fixtures.k8s.replay import ReplayServer, Reply, kubeconfig, serve

pytestmark = pytest.mark.integration

NS = "roost"
JOBS = rf"/apis/batch/v1/namespaces/{NS}/jobs"
JOB = JOBS + r"/roost-batch-[0-9a-f-]+"
PODS = rf"/api/v1/namespaces/{NS}/pods"
LOG = PODS + r"/[a-z0-9-]+/log"
CONFIGMAP = rf"/api/v1/namespaces/{NS}/configmaps/roost-templates"


@pytest.fixture
def replay() -> Iterator[ReplayServer]:
    with serve() as server:
        yield server


@pytest.fixture
def bucket(moto_s3, monkeypatch: pytest.MonkeyPatch) -> str:  # type: ignore[no-untyped-def]
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3")
    if "roost-shards" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket="roost-shards")
    return "roost-shards"


def put_inputs(bucket: str, count: int) -> None:
    for i in range(count):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"text": [f"great day number {i}", f"awful trip {i}"]}), sink)
        boto3.client("s3").put_object(
            Bucket=bucket, Key=f"in/f{i}.parquet", Body=sink.getvalue().to_pybytes()
        )


def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result.exit_code, result.stdout, result.stderr


def test_indexed_job_then_finalize(
    replay: ReplayServer, bucket: str, settings: Settings, champion, moto_s3, tmp_path: Path
) -> None:
    put_inputs(bucket, 3)
    src, out = f"s3://{bucket}/in/", f"s3://{bucket}/scores"
    model = f"models:/sentiment/{champion.version}"
    # the two pods' work: shard 0 gets files 0 and 2, shard 1 gets file 1
    for index in (0, 1):
        pod = load_settings(None, {
            "state_dir": settings.state_dir, "tracking": {"uri": settings.tracking.uri},
            "batch": {"model": model, "shards": 2, "shard_index": index, "chunk_rows": 500},
        })  # fmt: skip
        result = runner.run(pod, src, out)
        assert result.shards_done == [index] and not result.finalized
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert "scores/_SUCCESS" not in keys  # no pod finalizes

    replay.on("GET", CONFIGMAP, Reply.obj(templates_configmap(["values-kind.yaml"])))
    replay.on("POST", JOBS, Reply.file("job-created.json", 201))
    replay.on("GET", JOB, Reply.file("job-running.json"), Reply.file("job-complete.json"))
    replay.on("GET", PODS, Reply.file("pods-succeeded.json"))
    replay.on("GET", LOG, Reply(200, "shard done\n", "text/plain"))
    env = {
        **moto_s3.env,
        "KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", replay.url)),
        "KUBERNETES_SERVICE_HOST": "",
        "ROOST_K8S__POLL_S": "0.01",
        "MLFLOW_TRACKING_URI": str(settings.tracking.uri),
    }

    code, stdout, err = cli(
        env, "--state-dir", str(settings.state_dir), "batch", "--on", "k8s", "--shards", "2",
        "--model", "models:/sentiment@champion", "--input", src, "--output", out,
        "--chunk-rows", "500", "--json",
    )  # fmt: skip

    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["rows"] == 6 and summary["succeeded"] is True
    body: dict[str, Any] = replay.calls("POST", JOBS)[0].json()
    spec = body["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 2
    assert spec["parallelism"] == 2  # the chart's 4, capped at the shard count
    (container,) = spec["template"]["spec"]["containers"]
    # the alias is resolved here: every shard and retry scores the same version
    assert container["args"] == [
        "batch", "--model", model, "--input", src, "--output", out, "--shards", "2",
    ]  # fmt: skip
    env_sent = {e["name"]: e.get("value") for e in container["env"]}
    assert env_sent["ROOST_BATCH__CHUNK_ROWS"] == "500"  # the caller's setting replaced the chart's
    assert container["image"] == "roost-serving:dev"
    assert body["metadata"]["labels"]["app.kubernetes.io/component"] == "batch"
    log = replay.calls("GET", LOG)[0]
    assert log.query["container"] == ["batch"]
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"scores/_SUCCESS", "scores/_manifest.json"} <= keys
    manifest = json.loads(
        boto3.client("s3").get_object(Bucket=bucket, Key="scores/_manifest.json")["Body"].read()
    )
    assert [f["rows"] for f in manifest["files"]] == [2, 2, 2]


def test_local_paths_are_refused_before_anything_is_sent(
    replay: ReplayServer, tmp_path: Path, settings: Settings
) -> None:
    env = {
        "KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", replay.url)),
        "KUBERNETES_SERVICE_HOST": "",
    }
    code, _, err = cli(env, "--state-dir", str(settings.state_dir), "batch", "--on", "k8s",
                       "--input", str(tmp_path), "--output", "s3://b/out")  # fmt: skip
    assert code == 2 and "batch pods cannot read local files" in err
    assert not replay.requests
