"""Pure parts of roost.aws: the wanted bucket configuration and the IRSA policies."""

from __future__ import annotations

import pytest

from roost import aws
from roost.config import AwsSettings
from roost.errors import ConfigError

pytestmark = pytest.mark.unit


def test_policies_are_scoped_to_the_bucket_and_prefixes() -> None:
    policies = aws.iam_policies(AwsSettings(bucket="roost-artifacts-1"))
    assert set(policies) == {"roost-mlflow", "roost-training", "roost-kserve-storage"}
    for document in policies.values():
        for statement in document["Statement"]:
            resources = statement["Resource"]
            resources = resources if isinstance(resources, list) else [resources]
            assert all(r.startswith("arn:aws:s3:::roost-artifacts-1") for r in resources)
            assert "*" not in "".join(statement["Action"])  # no s3:* anywhere
    serving = policies["roost-kserve-storage"]["Statement"]
    assert {a for s in serving for a in s["Action"]} == {
        "s3:ListBucket",
        "s3:GetBucketLocation",
        "s3:GetObject",
    }  # KServe only reads
    training = {s["Sid"]: s for s in policies["roost-training"]["Statement"]}
    assert training["ReadData"]["Resource"] == "arn:aws:s3:::roost-artifacts-1/data/*"
    assert "s3:PutObject" in training["ReadWriteCheckpoints"]["Action"]


def test_policies_need_a_bucket() -> None:
    with pytest.raises(ConfigError, match="no bucket"):
        aws.iam_policies(AwsSettings())


def test_encryption_sse_s3_or_kms() -> None:
    assert aws.encryption_rules(AwsSettings()) == [
        {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
    ]
    kms = aws.encryption_rules(AwsSettings(kms_key_id="arn:aws:kms:us-east-1:1:key/k"))
    assert kms[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"


def test_lifecycle_rules_for_s3_and_s3_compatible_stores() -> None:
    rules = aws.lifecycle_rules(AwsSettings(checkpoint_days=3))
    by_id = {r["ID"]: r for r in rules}
    assert by_id["roost-housekeeping"]["AbortIncompleteMultipartUpload"] == {
        "DaysAfterInitiation": 7
    }
    assert by_id["roost-housekeeping-checkpoints"]["Filter"] == {"Prefix": "checkpoints/"}
    assert by_id["roost-housekeeping-checkpoints"]["Expiration"] == {"Days": 3}
    minio = aws.lifecycle_rules(AwsSettings(s3_compatible=True))
    assert all("AbortIncompleteMultipartUpload" not in r for r in minio)


def test_normalised_rules_ignore_what_s3_adds() -> None:
    stored = [
        {"Expiration": {"Days": 14}, "ID": "b", "Filter": {"Prefix": "checkpoints/"},
         "Status": "Enabled", "Transitions": None},
        {"ID": "a", "Filter": {}, "Status": "Enabled",
         "NoncurrentVersionExpiration": {"NoncurrentDays": 30}},
    ]  # fmt: skip
    wanted = [
        {"ID": "a", "Status": "Enabled", "Filter": {"Prefix": ""},
         "NoncurrentVersionExpiration": {"NoncurrentDays": 30}},
        {"ID": "b", "Status": "Enabled", "Filter": {"Prefix": "checkpoints/"},
         "Expiration": {"Days": 14}},
    ]  # fmt: skip
    assert aws._normalise_rules(stored) == aws._normalise_rules(wanted)
