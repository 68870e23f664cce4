"""The artifact bucket on S3 (or MinIO): bootstrap it, and the IAM policies its users need.

``roost aws bootstrap`` makes the bucket that MLflow (artifacts), training (data,
checkpoints) and KServe (model files) share: versioning, default encryption, the public
access block and a lifecycle rule. Each step reads the current state first and changes only
what differs, so a second run changes nothing; ``--dry-run`` reads and reports without
writing. :func:`iam_policies` is the least-privilege policy of each IRSA role
(manifests/eks/cluster.yaml carries the same documents).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from roost.config import AwsSettings
from roost.errors import ConfigError, Conflict, Unavailable

log = logging.getLogger(__name__)

Action = Literal["create", "update", "unchanged", "skipped", "unknown"]

# S3-compatible stores answer these for features they lack.
NOT_IMPLEMENTED = {"NotImplemented", "XNotImplemented", "NotSupported"}
MISSING_CONFIG = {
    "NoSuchBucket",
    "ServerSideEncryptionConfigurationNotFoundError",
    "NoSuchPublicAccessBlockConfiguration",
    "NoSuchLifecycleConfiguration",
}
LIFECYCLE_RULE_ID = "roost-housekeeping"


@dataclass(frozen=True)
class Step:
    name: str
    action: Action
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"step": self.name, "action": self.action, "detail": self.detail}


@dataclass
class Plan:
    bucket: str
    region: str
    endpoint_url: str | None
    dry_run: bool
    steps: list[Step] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(s.action in ("create", "update") for s in self.steps)

    def summary(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "region": self.region,
            "endpoint_url": self.endpoint_url,
            "dry_run": self.dry_run,
            "changed": self.changed,
            "steps": [s.to_dict() for s in self.steps],
        }


# -- what the bucket should look like (pure) --------------------------------------------------


def _prefix(value: str) -> str:
    return value.strip("/") + "/"


def encryption_rules(cfg: AwsSettings) -> list[dict[str, Any]]:
    if cfg.kms_key_id:
        default = {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": cfg.kms_key_id}
        return [{"ApplyServerSideEncryptionByDefault": default, "BucketKeyEnabled": True}]
    return [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]


PUBLIC_ACCESS_BLOCK = {
    "BlockPublicAcls": True,
    "IgnorePublicAcls": True,
    "BlockPublicPolicy": True,
    "RestrictPublicBuckets": True,
}


def lifecycle_rules(cfg: AwsSettings) -> list[dict[str, Any]]:
    """Old object versions and checkpoints expire; unfinished uploads are aborted.

    MinIO implements expiry but not AbortIncompleteMultipartUpload, so an S3-compatible
    store gets the rules without it.
    """
    rules: list[dict[str, Any]] = [
        {
            "ID": LIFECYCLE_RULE_ID,
            "Status": "Enabled",
            "Filter": {"Prefix": ""},
            "NoncurrentVersionExpiration": {"NoncurrentDays": cfg.noncurrent_version_days},
        },
        {
            "ID": f"{LIFECYCLE_RULE_ID}-checkpoints",
            "Status": "Enabled",
            "Filter": {"Prefix": _prefix(cfg.checkpoints_prefix)},
            "Expiration": {"Days": cfg.checkpoint_days},
        },
    ]
    if not cfg.s3_compatible:
        rules[0]["AbortIncompleteMultipartUpload"] = {"DaysAfterInitiation": cfg.multipart_days}
    return rules


def iam_policies(cfg: AwsSettings) -> dict[str, dict[str, Any]]:
    """The IAM policy of each IRSA role, scoped to the bucket and its prefixes (pure)."""
    bucket = require_bucket(cfg)
    arn = f"arn:aws:s3:::{bucket}"

    def listing(sid: str, prefixes: list[str]) -> dict[str, Any]:
        names = [p.strip("/") for p in prefixes]
        return {
            "Sid": sid,
            "Effect": "Allow",
            "Action": ["s3:ListBucket"],
            "Resource": arn,
            "Condition": {"StringLike": {"s3:prefix": [x for n in names for x in (n, f"{n}/*")]}},
        }

    # GetBucketLocation carries no s3:prefix: under the listing's condition it never matched.
    location = {
        "Sid": "BucketLocation",
        "Effect": "Allow",
        "Action": ["s3:GetBucketLocation"],
        "Resource": arn,
    }

    def objects(sid: str, actions: list[str], prefixes: list[str]) -> dict[str, Any]:
        resources = [f"{arn}/{_prefix(p)}*" for p in prefixes]
        return {
            "Sid": sid,
            "Effect": "Allow",
            "Action": actions,
            "Resource": resources[0] if len(resources) == 1 else resources,
        }

    rw = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    artifacts, ckpt, data, ts = (
        cfg.artifacts_prefix,
        cfg.checkpoints_prefix,
        cfg.data_prefix,
        cfg.torchserve_prefix,
    )
    return {
        "roost-mlflow": {
            "Version": "2012-10-17",
            "Statement": [
                listing("ListArtifacts", [artifacts]),
                location,
                objects("ReadWriteArtifacts", rw, [artifacts]),
            ],
        },
        "roost-training": {
            "Version": "2012-10-17",
            "Statement": [
                listing("ListTrainingPrefixes", [ckpt, data]),
                location,
                objects("ReadData", ["s3:GetObject"], [data]),
                objects("ReadWriteCheckpoints", rw, [ckpt]),
            ],
        },
        "roost-kserve-storage": {
            "Version": "2012-10-17",
            "Statement": [
                listing("ListModels", [artifacts, ts]),
                location,
                objects("ReadModels", ["s3:GetObject"], [artifacts, ts]),
            ],
        },
    }


def require_bucket(cfg: AwsSettings) -> str:
    if not cfg.bucket:
        raise ConfigError("no bucket: pass --bucket or set aws.bucket (ROOST_AWS__BUCKET)")
    return cfg.bucket


# -- talking to S3 ----------------------------------------------------------------------------


def s3_client(cfg: AwsSettings) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        region_name=cfg.region,
        endpoint_url=cfg.endpoint_url,
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10),
    )


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Code") or "")


class _Unknown(Exception):
    """The current state could not be read (dry run without access)."""


def bootstrap(cfg: AwsSettings, dry_run: bool = False, client: Any = None) -> Plan:
    """Bring the bucket to the wanted state, one idempotent step at a time."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = require_bucket(cfg)
    s3 = client or s3_client(cfg)
    plan = Plan(bucket, cfg.region, cfg.endpoint_url, dry_run)

    def run(
        name: str,
        read: Callable[[], Any],
        wanted: Any,
        write: Callable[[], None],
        describe: str,
    ) -> None:
        try:
            try:
                current = read()
            except ClientError as exc:
                code = _code(exc)
                if code in NOT_IMPLEMENTED and cfg.s3_compatible:
                    plan.steps.append(
                        Step(name, "skipped", f"not implemented by {cfg.endpoint_url}")
                    )
                    return
                if code not in MISSING_CONFIG:
                    raise
                current = None
        except (ClientError, BotoCoreError) as exc:
            if not dry_run:
                raise Unavailable(f"s3://{bucket}: cannot read {name}: {exc}") from None
            plan.steps.append(
                Step(name, "unknown", f"{describe} (current state unreadable: {exc})")
            )
            return
        if current == wanted:
            plan.steps.append(Step(name, "unchanged", describe))
            return
        action: Action = "create" if current is None else "update"
        if not dry_run:
            try:
                write()
            except ClientError as exc:
                if _code(exc) in NOT_IMPLEMENTED and cfg.s3_compatible:
                    plan.steps.append(
                        Step(name, "skipped", f"not implemented by {cfg.endpoint_url}")
                    )
                    return
                raise Unavailable(f"s3://{bucket}: cannot set {name}: {exc}") from None
        plan.steps.append(Step(name, action, describe))

    # 1. the bucket
    def read_bucket() -> Any:
        s3.head_bucket(Bucket=bucket)
        return True

    def create_bucket() -> None:
        args: dict[str, Any] = {"Bucket": bucket}
        if cfg.region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": cfg.region}
        try:
            s3.create_bucket(**args)
        except ClientError as exc:
            if _code(exc) == "BucketAlreadyOwnedByYou":
                return
            if _code(exc) == "BucketAlreadyExists":
                raise Conflict(
                    f"bucket {bucket} belongs to another account: pick another name"
                ) from None
            raise

    def read_bucket_checked() -> Any:
        try:
            return read_bucket()
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                return None
            if _code(exc) in ("403", "AccessDenied"):
                raise Conflict(
                    f"bucket {bucket} exists but this identity may not use it "
                    "(another account's, or missing s3:ListBucket)"
                ) from None
            raise

    run("bucket", read_bucket_checked, True, create_bucket, f"s3://{bucket} in {cfg.region}")
    bucket_missing = plan.steps[-1].action == "create"

    def state_or_absent(read: Callable[[], Any]) -> Callable[[], Any]:
        # In a dry run the bucket may not exist yet: then nothing is configured either.
        return (lambda: None) if bucket_missing else read

    # 2. versioning
    run(
        "versioning",
        state_or_absent(lambda: s3.get_bucket_versioning(Bucket=bucket).get("Status")),
        "Enabled",
        lambda: s3.put_bucket_versioning(
            Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
        ),
        "object versions kept (overwrites and deletes are recoverable)",
    )

    # 3. default encryption
    rules = encryption_rules(cfg)
    run(
        "encryption",
        state_or_absent(
            lambda: _normalise_encryption(
                s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"][
                    "Rules"
                ]
            )
        ),
        _normalise_encryption(rules),
        lambda: s3.put_bucket_encryption(
            Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": rules}
        ),
        "SSE-KMS with " + cfg.kms_key_id if cfg.kms_key_id else "SSE-S3 (AES256) by default",
    )

    # 4. public access block
    run(
        "public-access-block",
        state_or_absent(
            lambda: s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
        ),
        PUBLIC_ACCESS_BLOCK,
        lambda: s3.put_public_access_block(
            Bucket=bucket, PublicAccessBlockConfiguration=PUBLIC_ACCESS_BLOCK
        ),
        "no public ACLs or policies",
    )

    # 5. lifecycle: roost's rules (IDs roost-housekeeping*); the bucket's other rules stay,
    # since a put replaces the whole configuration.
    wanted_rules = lifecycle_rules(cfg)
    others: list[dict[str, Any]] = []

    def read_lifecycle() -> Any:
        rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
        others[:] = [r for r in rules if not _roost_rule(r)]
        mine = [r for r in rules if _roost_rule(r)]
        return _normalise_rules(mine) if mine else None

    run(
        "lifecycle",
        state_or_absent(read_lifecycle),
        _normalise_rules(wanted_rules),
        lambda: s3.put_bucket_lifecycle_configuration(
            Bucket=bucket, LifecycleConfiguration={"Rules": others + wanted_rules}
        ),
        f"old versions expire after {cfg.noncurrent_version_days} d, "
        f"{_prefix(cfg.checkpoints_prefix)} after {cfg.checkpoint_days} d"
        + ("" if cfg.s3_compatible else f", unfinished uploads after {cfg.multipart_days} d"),
    )
    for step in plan.steps:
        log.info("bucket=%s step=%s action=%s", bucket, step.name, step.action)
    return plan


def _normalise_encryption(rules: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(algorithm, key) pairs: S3 adds BucketKeyEnabled and the like to what it stores."""
    out = []
    for rule in rules:
        default = rule.get("ApplyServerSideEncryptionByDefault") or {}
        out.append((str(default.get("SSEAlgorithm")), str(default.get("KMSMasterKeyID") or "")))
    return out


def _roost_rule(rule: dict[str, Any]) -> bool:
    return str(rule.get("ID", "")).startswith(LIFECYCLE_RULE_ID)


def _normalise_rules(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Lifecycle rules in a comparable form (S3 adds empty fields and may reorder)."""
    keep = ("ID", "Status", "Expiration", "NoncurrentVersionExpiration",
            "AbortIncompleteMultipartUpload")  # fmt: skip
    out = []
    for rule in rules:
        item = {k: rule[k] for k in keep if k in rule and rule[k] not in (None, {}, "")}
        flt = rule.get("Filter") or {}
        item["Filter"] = (
            flt if "And" in flt else {"Prefix": flt.get("Prefix", rule.get("Prefix", ""))}
        )
        out.append(item)
    return sorted(out, key=lambda r: str(r.get("ID")))
