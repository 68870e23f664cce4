"""``storage.exists`` on S3 (moto in server mode behind the fault proxy): only S3's own "not
found" answer means absent; a 5xx, a refusal or a dropped connection is ``Unavailable``.

(The batch runner asks ``exists`` for its ``_SUCCESS`` marker: read as absent, an S3 outage
would make it score and overwrite a finished job.)
"""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest

from roost import storage
from roost.errors import Unavailable
from tests.conftest import S3Endpoint
from tests.faults.proxy import FaultProxy, fault_proxy

pytestmark = pytest.mark.faults

BUCKET = "roost-faults"
KEY = "jobs/job-1/_SUCCESS"


@pytest.fixture
def s3_proxy(moto_s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3")
    if BUCKET not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=KEY, Body=b"")
    with fault_proxy(moto_s3.url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore retries 5xx; keep it short
        yield proxy


def test_absent_only_on_a_not_found_answer(s3_proxy: FaultProxy) -> None:
    assert storage.exists(f"s3://{BUCKET}/{KEY}") is True
    assert storage.exists(f"s3://{BUCKET}/jobs/job-2/_SUCCESS") is False
    assert storage.exists("s3://no-such-bucket-roost/x") is False
    assert s3_proxy.hits("HEAD", "_SUCCESS")  # the calls really went through the proxy


@pytest.mark.parametrize("fault", ["500", "503", "403", "dropped", "refused"])
def test_a_failing_s3_is_never_absent(s3_proxy: FaultProxy, fault: str) -> None:
    uri = f"s3://{BUCKET}/{KEY}"
    if fault == "dropped":
        s3_proxy.drop("HEAD", "_SUCCESS")
    elif fault == "refused":
        s3_proxy.refuse()
    else:
        s3_proxy.fail("HEAD", "_SUCCESS", int(fault))
    with pytest.raises(Unavailable, match="cannot check s3://"):
        storage.exists(uri)
    s3_proxy.restore()
    assert storage.exists(uri) is True
