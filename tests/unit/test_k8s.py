"""Pure parts of roost.k8s / roost.k8s_jobs: manifests, URIs, readiness, log parsing."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from typer.testing import CliRunner

from roost import k8s, k8s_jobs
from roost.cli.app import app
from roost.config import load_settings
from roost.errors import ConfigError, NotFound

pytestmark = pytest.mark.unit


# -- registry URI -> S3 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("download", "root", "expected"),
    [
        (
            "mlflow-artifacts:/1/models/m-abc/artifacts",
            "s3://roost/mlflow",
            "s3://roost/mlflow/1/models/m-abc/artifacts",
        ),
        (
            "mlflow-artifacts://mlflow.roost.svc:5000/1/models/m-abc/artifacts/",
            "s3://roost/mlflow/",
            "s3://roost/mlflow/1/models/m-abc/artifacts",
        ),
        ("s3://bucket/direct/model/", None, "s3://bucket/direct/model"),
    ],
)
def test_download_uri_maps_to_s3(download: str, root: str | None, expected: str) -> None:
    assert k8s.s3_storage_uri(download, root) == expected


@pytest.mark.parametrize(
    ("download", "root", "message"),
    [
        ("mlflow-artifacts:/1/models/m-abc/artifacts", None, "set k8s.artifacts_s3_root"),
        ("mlflow-artifacts:/1/x", "/var/mlflow", "set k8s.artifacts_s3_root"),
        ("mlflow-artifacts:/", "s3://roost/mlflow", "no artifact path"),
        ("file:///tmp/mlruns/1/x/artifacts", None, "KServe cannot read"),
    ],
)
def test_unmappable_download_uris_are_config_errors(
    download: str, root: str | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        k8s.s3_storage_uri(download, root)


# -- InferenceService manifest ---------------------------------------------------------------

BASE_ISVC: dict[str, Any] = {
    "apiVersion": "serving.kserve.io/v1beta1",
    "kind": "InferenceService",
    "metadata": {"name": "sentiment", "namespace": "roost", "resourceVersion": "9"},
    "spec": {
        "predictor": {
            "canaryTrafficPercent": 30,
            "model": {
                "modelFormat": {"name": "roost-text-classifier"},
                "env": [
                    {"name": "ROOST_SERVING__MAX_BATCH_SIZE", "value": "64"},
                    {"name": "ROOST_SERVING__MODEL_VERSION", "value": "1"},
                ],
            },
        }
    },
    "status": {"url": "http://old"},
}


def test_isvc_manifest_serves_the_version() -> None:
    before = copy.deepcopy(BASE_ISVC)
    manifest = k8s.isvc_manifest(BASE_ISVC, "s3://roost/mlflow/1/m", "7")
    assert before == BASE_ISVC  # the template is not changed
    model = manifest["spec"]["predictor"]["model"]
    assert model["storageUri"] == "s3://roost/mlflow/1/m"
    assert model["env"] == [
        {"name": "ROOST_SERVING__MAX_BATCH_SIZE", "value": "64"},
        {"name": "ROOST_SERVING__MODEL_VERSION", "value": "7"},
    ]
    # no canary asked: the field is left out, so the apply removes it (all to the latest)
    assert "canaryTrafficPercent" not in manifest["spec"]["predictor"]
    assert "status" not in manifest and "resourceVersion" not in manifest["metadata"]


def test_isvc_manifest_canary() -> None:
    manifest = k8s.isvc_manifest(BASE_ISVC, "s3://b/m", "2", canary_percent=10)
    assert manifest["spec"]["predictor"]["canaryTrafficPercent"] == 10
    with pytest.raises(ConfigError, match=r"0\.\.100"):
        k8s.isvc_manifest(BASE_ISVC, "s3://b/m", "2", canary_percent=101)


def _isvc(generation: int, observed: int | None, ready: str, **predictor: str) -> dict:
    status: dict[str, Any] = {
        "conditions": [
            {"type": "PredictorReady", "status": ready, "reason": "RevisionMissing"},
            {"type": "Ready", "status": ready, "reason": "RevisionMissing", "message": "waiting"},
        ],
        "components": {"predictor": predictor},
    }
    if observed is not None:
        status["observedGeneration"] = observed
    return {"metadata": {"generation": generation}, "status": status}


def test_readiness_needs_the_current_generation_and_revision() -> None:
    assert not k8s.isvc_readiness(_isvc(2, 1, "True")).ready  # stale status
    assert "generation 2" in k8s.isvc_readiness(_isvc(2, None, "True")).reason
    not_ready = k8s.isvc_readiness(_isvc(2, 2, "False"))
    assert not not_ready.ready and "Ready: RevisionMissing waiting" in not_ready.reason
    rolling = _isvc(2, 2, "True", latestCreatedRevision="p-2", latestReadyRevision="p-1")
    assert "p-2 is not ready" in k8s.isvc_readiness(rolling).reason
    done = _isvc(2, 2, "True", latestCreatedRevision="p-2", latestReadyRevision="p-2")
    assert k8s.isvc_readiness(done) == k8s.Readiness(True, "Ready")


def test_isvc_url_prefers_the_top_level_url() -> None:
    assert k8s.isvc_url({"status": {"url": "http://a", "components": {}}}) == "http://a"
    predictor_only = {"status": {"components": {"predictor": {"url": "http://p"}}}}
    assert k8s.isvc_url(predictor_only) == "http://p"
    assert k8s.isvc_url({}) is None


def test_template_rejects_missing_and_wrong_kinds() -> None:
    with pytest.raises(NotFound, match=r"no 'training-job\.yaml'"):
        k8s.template({}, k8s.TEMPLATE_JOB, "Job")
    with pytest.raises(ConfigError, match="is not a Job"):
        k8s.template({k8s.TEMPLATE_JOB: "kind: Pod\n"}, k8s.TEMPLATE_JOB, "Job")
    with pytest.raises(ConfigError, match="not valid YAML"):
        k8s.template({k8s.TEMPLATE_JOB: "a: [\n"}, k8s.TEMPLATE_JOB, "Job")


# -- training Job ----------------------------------------------------------------------------

JOB_TEMPLATE: dict[str, Any] = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {
        "name": "roost-train",
        "labels": {"app.kubernetes.io/component": "training"},
        "annotations": {"helm.sh/hook": "post-install"},
    },
    "spec": {
        "template": {
            "metadata": {"labels": {"app.kubernetes.io/component": "training"}},
            "spec": {
                "containers": [
                    {
                        "name": "train",
                        "env": [
                            {"name": "ROOST_TRAIN__DEVICE", "value": "cuda"},
                            {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"},
                        ],
                    }
                ]
            },
        }
    },
}


def test_job_manifest_renames_and_overrides_env_in_place() -> None:
    env = [
        {"name": "ROOST_TRAIN__DEVICE", "value": "cpu"},
        {"name": "ROOST_TRAIN__EPOCHS", "value": "3"},
    ]
    manifest = k8s_jobs.job_manifest(JOB_TEMPLATE, "roost-train-x", env, {"roost.io/by": "cli"})
    assert manifest["metadata"]["name"] == "roost-train-x"
    assert "annotations" not in manifest["metadata"]  # helm hook annotations dropped
    assert manifest["metadata"]["labels"]["roost.io/by"] == "cli"
    assert manifest["spec"]["template"]["metadata"]["labels"]["roost.io/by"] == "cli"
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["env"] == [
        {"name": "ROOST_TRAIN__DEVICE", "value": "cpu"},
        {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"},
        {"name": "ROOST_TRAIN__EPOCHS", "value": "3"},
    ]
    assert JOB_TEMPLATE["metadata"]["name"] == "roost-train"


def test_job_manifest_needs_the_train_container() -> None:
    template = copy.deepcopy(JOB_TEMPLATE)
    template["spec"]["template"]["spec"]["containers"][0]["name"] = "main"
    with pytest.raises(ConfigError, match="no container named 'train'"):
        k8s_jobs.job_manifest(template, "x", [], {})


def test_job_names_are_fresh_and_valid() -> None:
    a, b = k8s_jobs.job_name(0), k8s_jobs.job_name(0)
    assert a.startswith("roost-train-19700101-000000-") and a != b
    assert len(a) <= 63 and a == a.lower()


def test_training_env_carries_only_what_the_caller_set() -> None:
    assert k8s_jobs.training_env(load_settings(None, {})) == []
    settings = load_settings(
        None,
        {
            "data": {"uri": "s3://roost/data/reviews.parquet", "max_rows": 5000},
            "train": {"epochs": 3, "amp": False},
            "model": {"ngram": 1},
            "tracking": {"experiment": "reviews"},
        },
    )
    env = {e["name"]: e["value"] for e in k8s_jobs.training_env(settings)}
    assert env == {
        "ROOST_DATA__URI": "s3://roost/data/reviews.parquet",
        "ROOST_DATA__MAX_ROWS": "5000",
        "ROOST_MODEL__NGRAM": "1",
        "ROOST_TRAIN__EPOCHS": "3",
        "ROOST_TRAIN__AMP": "false",
        "ROOST_TRACKING__EXPERIMENT": "reviews",
    }


def test_training_env_values_read_back_as_the_same_settings(monkeypatch) -> None:
    settings = load_settings(None, {"train": {"lr": 0.01, "num_threads": 2}, "data": {"seed": 5}})
    for item in k8s_jobs.training_env(settings):
        monkeypatch.setenv(item["name"], item["value"])
    again = load_settings(None, {})
    assert again.train == settings.train and again.data == settings.data


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"data": {"uri": "tweets.csv"}}, "cannot read local files"),
        ({"train": {"checkpoint_dir": "/tmp/ckpt"}}, "needs an s3:// prefix"),
    ],
)
def test_training_env_refuses_local_paths(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        k8s_jobs.training_env(load_settings(None, section))


def test_job_state() -> None:
    assert k8s_jobs.job_state({"status": {}}).phase == "running"
    failed = {"status": {"conditions": [
        {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"},
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "m"},
    ]}}  # fmt: skip
    assert k8s_jobs.job_state(failed) == k8s_jobs.JobState("failed", "BackoffLimitExceeded", "m")
    complete = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert k8s_jobs.job_state(complete).phase == "succeeded"
    stale = {"status": {"conditions": [{"type": "Failed", "status": "False"}]}}
    assert k8s_jobs.job_state(stale).phase == "running"


def test_pod_waiting_reason() -> None:
    pulling = {"status": {"phase": "Pending", "containerStatuses": [
        {"state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}},
    ]}}  # fmt: skip
    assert k8s_jobs.pod_waiting_reason(pulling) == "ErrImagePull: not found"
    unschedulable = {"status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."},
    ]}}  # fmt: skip
    assert "Insufficient nvidia.com/gpu" in k8s_jobs.pod_waiting_reason(unschedulable)
    assert k8s_jobs.pod_waiting_reason({"status": {}}) == "Pending"


def test_log_parser_reads_only_progress_from_what_roost_train_prints() -> None:
    """Epoch lines drive the progress display; nothing else is read from the log."""
    from roost.cli.output import EpochProgress, console
    from roost.train import EpochStats

    stats = EpochStats(
        epoch=2, train_loss=0.7711, train_accuracy=0.668, val_loss=0.7702, val_accuracy=0.671,
        seconds=1.1, improved=True,
    )  # fmt: skip
    with console.capture() as captured:
        EpochProgress(show_bars=False).epoch_done(stats)
    report = k8s_jobs.TrainingReport()
    assert [report.feed(line) for line in captured.get().splitlines()] == [True]
    assert (report.epoch, report.loss) == (2, 0.7711)
    assert not report.feed(
        "run 4f1e2d3c4b5a69788796a5b4c3d2e1f0: test accuracy 0.69, macro-F1 0.67"
    )


def test_job_experiment_is_read_from_the_manifest() -> None:
    manifest = {"spec": {"template": {"spec": {"containers": [
        {"name": "sidecar", "env": [{"name": "ROOST_TRACKING__EXPERIMENT", "value": "no"}]},
        {"name": "train", "env": [{"name": "ROOST_TRACKING__EXPERIMENT", "value": "sentiment"}]},
    ]}}}}  # fmt: skip
    assert k8s_jobs.job_experiment(manifest) == "sentiment"
    manifest["spec"]["template"]["spec"]["containers"][1]["env"] = []
    assert k8s_jobs.job_experiment(manifest) is None


# -- CLI input errors (no cluster needed) ---------------------------------------------------


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.stdout + result.stderr
    return result.exit_code, result.stdout, result.stderr


def test_deploy_bad_protocol_and_canary_are_usage_errors() -> None:
    code, _, err = _cli("deploy", "--version", "1", "--protocol", "udp")
    assert code == 2 and "expected rest or grpc" in err
    code, _, err = _cli("deploy", "--version", "1", "--canary", "150")
    assert code == 2 and "less than or equal to 100" in err


def test_deploy_and_aws_are_registered() -> None:
    code, out, _ = _cli("--help")
    assert code == 0 and "deploy" in out and "aws" in out
    code, out, _ = _cli("aws", "--help")
    assert code == 0 and "bootstrap" in out and "policy" in out


def test_aws_policy_cli_prints_json_documents() -> None:
    code, out, _ = _cli("aws", "policy", "--bucket", "roost-artifacts-1", "--role", "roost-mlflow")
    assert code == 0
    document = json.loads(out)
    assert document["Version"] == "2012-10-17"
    code, out, _ = _cli("aws", "policy", "--bucket", "roost-artifacts-1")
    assert set(json.loads(out)) == {"roost-mlflow", "roost-training", "roost-kserve-storage"}
    code, _, err = _cli("aws", "policy", "--bucket", "b", "--role", "admin")
    assert code == 2 and "expected one of" in err
    code, _, err = _cli("aws", "policy")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: no bucket")
