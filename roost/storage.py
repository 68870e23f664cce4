"""Bytes in and out of a local path or an ``s3://`` URI (boto3; endpoint from the usual env)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from roost import config
from roost.errors import DataError, NotFound, Unavailable


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise DataError(f"not an s3://bucket/key URI: {uri}")
    return parsed.netloc, parsed.path.lstrip("/")


def s3_client() -> Any:
    import boto3

    # boto3 reads AWS_ENDPOINT_URL itself; MLflow users set MLFLOW_S3_ENDPOINT_URL instead.
    endpoint = config.environ("MLFLOW_S3_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint) if endpoint else boto3.client("s3")


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(uri)
        try:
            body: bytes = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in {"NoSuchKey", "NoSuchBucket", "404"}:
                raise NotFound(f"no object at {uri}") from None
            raise Unavailable(f"cannot read {uri}: {code or exc}") from None
        except BotoCoreError as exc:
            raise Unavailable(f"cannot read {uri}: {exc}") from None
        return body
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        raise NotFound(f"no such file: {path}")
    return path.read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise Unavailable(f"cannot write {uri}: {exc}") from None
        return
    path = Path(uri.removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: a killed writer never leaves half a file


def exists(uri: str) -> bool:
    """Whether the object is there; only S3's own "not found" answer means no.

    A 5xx, a refusal (403) or a dropped connection raises :class:`Unavailable`: read as
    "absent", it would make a caller redo (and overwrite) work that is done.
    """
    if not is_s3(uri):
        return Path(uri.removeprefix("file://")).is_file()
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}:
            return False
        raise Unavailable(f"cannot check {uri}: {code or exc}") from None
    except BotoCoreError as exc:
        raise Unavailable(f"cannot check {uri}: {exc}") from None
    return True


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])
