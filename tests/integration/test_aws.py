"""`roost aws bootstrap` against moto in server mode (a real S3 HTTP endpoint on loopback)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from typer.testing import CliRunner

from roost import aws
from roost.cli.app import app
from roost.config import AwsSettings
from roost.errors import Unavailable
from roost.proc import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def endpoint(moto_s3, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:  # type: ignore[no-untyped-def]
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    yield moto_s3.url


def s3(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def actions(plan: aws.Plan) -> dict[str, str]:
    return {step.name: step.action for step in plan.steps}


def test_bootstrap_creates_a_hardened_bucket_and_is_idempotent(endpoint: str) -> None:
    cfg = AwsSettings(bucket="roost-boot-1", endpoint_url=endpoint)

    first = aws.bootstrap(cfg)

    assert actions(first) == {
        "bucket": "create",
        "versioning": "create",
        "encryption": "create",
        "public-access-block": "create",
        "lifecycle": "create",
    }
    client = s3(endpoint)
    assert client.get_bucket_versioning(Bucket="roost-boot-1")["Status"] == "Enabled"
    rule = client.get_bucket_encryption(Bucket="roost-boot-1")["ServerSideEncryptionConfiguration"][
        "Rules"
    ][0]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    block = client.get_public_access_block(Bucket="roost-boot-1")["PublicAccessBlockConfiguration"]
    assert block == aws.PUBLIC_ACCESS_BLOCK
    rules = client.get_bucket_lifecycle_configuration(Bucket="roost-boot-1")["Rules"]
    assert {r["ID"] for r in rules} == {"roost-housekeeping", "roost-housekeeping-checkpoints"}

    second = aws.bootstrap(cfg)
    assert set(actions(second).values()) == {"unchanged"} and not second.changed


def test_bootstrap_repairs_drift(endpoint: str) -> None:
    cfg = AwsSettings(bucket="roost-boot-2", endpoint_url=endpoint)
    aws.bootstrap(cfg)
    s3(endpoint).put_bucket_versioning(
        Bucket="roost-boot-2", VersioningConfiguration={"Status": "Suspended"}
    )
    s3(endpoint).delete_bucket_lifecycle(Bucket="roost-boot-2")

    plan = aws.bootstrap(cfg)

    assert actions(plan)["versioning"] == "update"
    assert actions(plan)["lifecycle"] == "create"
    assert actions(plan)["public-access-block"] == "unchanged"
    assert s3(endpoint).get_bucket_versioning(Bucket="roost-boot-2")["Status"] == "Enabled"


def test_bootstrap_keeps_the_buckets_own_lifecycle_rules(endpoint: str) -> None:
    """A lifecycle put replaces every rule: roost adds its own beside the bucket's."""
    client = s3(endpoint)
    client.create_bucket(Bucket="roost-boot-7")
    theirs = {"ID": "logs-expire", "Status": "Enabled", "Filter": {"Prefix": "logs/"},
              "Expiration": {"Days": 90}}  # fmt: skip
    client.put_bucket_lifecycle_configuration(
        Bucket="roost-boot-7", LifecycleConfiguration={"Rules": [theirs]}
    )
    cfg = AwsSettings(bucket="roost-boot-7", endpoint_url=endpoint)

    assert actions(aws.bootstrap(cfg))["lifecycle"] == "create"  # none of roost's yet

    rules = {
        r["ID"]: r
        for r in client.get_bucket_lifecycle_configuration(Bucket="roost-boot-7")["Rules"]
    }
    assert set(rules) == {"logs-expire", "roost-housekeeping", "roost-housekeeping-checkpoints"}
    assert rules["logs-expire"]["Expiration"] == {"Days": 90}
    assert actions(aws.bootstrap(cfg))["lifecycle"] == "unchanged"


def test_dry_run_changes_nothing(endpoint: str) -> None:
    cfg = AwsSettings(bucket="roost-boot-3", endpoint_url=endpoint)
    plan = aws.bootstrap(cfg, dry_run=True)
    assert plan.dry_run and plan.changed
    assert actions(plan)["bucket"] == "create"
    names = {b["Name"] for b in s3(endpoint).list_buckets()["Buckets"]}
    assert "roost-boot-3" not in names


def test_s3_compatible_lifecycle(endpoint: str) -> None:
    cfg = AwsSettings(bucket="roost-boot-4", endpoint_url=endpoint, s3_compatible=True)
    aws.bootstrap(cfg)
    rules = s3(endpoint).get_bucket_lifecycle_configuration(Bucket="roost-boot-4")["Rules"]
    assert all("AbortIncompleteMultipartUpload" not in r for r in rules)
    assert not aws.bootstrap(cfg).changed


def test_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    cfg = AwsSettings(bucket="roost-boot-5", endpoint_url=f"http://127.0.0.1:{free_port()}")
    plan = aws.bootstrap(cfg, dry_run=True)  # a dry run reports what it could not read
    assert set(actions(plan).values()) == {"unknown"}
    with pytest.raises(Unavailable, match="cannot read bucket"):
        aws.bootstrap(cfg)


def test_cli_bootstrap_json_and_human(endpoint: str) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app, ["aws", "bootstrap", "--bucket", "roost-boot-6", "--endpoint-url", endpoint, "--json"]
    )
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["bucket"] == "roost-boot-6" and document["changed"] is True
    assert {s["step"] for s in document["steps"]} == {
        "bucket", "versioning", "encryption", "public-access-block", "lifecycle",
    }  # fmt: skip
    assert set(document["policies"]) == {"roost-mlflow", "roost-training", "roost-kserve-storage"}

    again = runner.invoke(
        app,
        ["aws", "bootstrap", "--bucket", "roost-boot-6", "--endpoint-url", endpoint, "--dry-run"],
    )
    assert again.exit_code == 0 and again.stdout == ""
    assert "would change: nothing" in again.stderr
    assert "roost-kserve-storage" in again.stderr
