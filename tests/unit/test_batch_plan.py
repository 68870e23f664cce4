"""The pure parts of roost batch: row validation, shards, chunk records, manifest, pod env."""

from __future__ import annotations

import pytest

from roost.batch import plan
from roost.batch.k8s import batch_env
from roost.config import BatchSettings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("good text", ("good text", None)),
        (b"good", ("good", None)),
        (None, (None, plan.MISSING)),
        ("", (None, plan.EMPTY)),
        ("  \t\n", (None, plan.EMPTY)),
        (b"\xff\xfe bad", (None, plan.UNDECODABLE)),
        (42, (None, "non-string text (int)")),
        ({"a": 1}, (None, "non-string text (dict)")),
    ],
)
def test_classify(value, expected) -> None:
    assert plan.classify(value) == expected


def test_shards_split_files_round_robin_and_cover_each_once() -> None:
    shards = [plan.shard_files(7, 3, i) for i in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert plan.shard_files(2, 4, 3) == []  # more shards than files: some are empty
    with pytest.raises(ValueError):
        plan.shard_files(3, 2, 2)


def test_input_format_from_names() -> None:
    assert plan.input_format("s3://b/x/part-1.parquet") == "parquet"
    assert plan.input_format("a.CSV.gz") == "csv"
    assert plan.input_format("a.jsonl.zst") == "jsonl"
    assert plan.input_format("a.txt") == ""


def record(index: int, rows: int, errors: int = 0, last: bool = False) -> plan.ChunkRecord:
    name = plan.part_name(0, index, "parquet")
    return plan.ChunkRecord(0, index, index * 10, rows, errors, name,
                            f"errors/{name}" if errors else None, last)  # fmt: skip


def test_file_result_needs_every_chunk_up_to_the_last() -> None:
    done = plan.file_result("f", "sha256:x", 5, [record(1, 3, 1, last=True), record(0, 10)])
    assert (done.rows, done.errors) == (13, 1)
    assert done.parts == ["part-00000-000000.parquet", "part-00000-000001.parquet"]
    assert done.error_parts == ["errors/part-00000-000001.parquet"]
    with pytest.raises(ValueError):
        plan.file_result("f", "d", 5, [record(0, 10), record(2, 3, last=True)])  # a gap
    with pytest.raises(ValueError):
        plan.file_result("f", "d", 5, [record(0, 10), record(1, 10)])  # the last never came


def test_error_rate_fails_only_above_the_limit() -> None:
    assert not plan.too_many_errors(100, 1, 0.01)
    assert plan.too_many_errors(100, 2, 0.01)
    assert not plan.too_many_errors(0, 0, 0.0)


def spec(**changes) -> plan.JobSpec:
    base = {
        "inputs": ("a.parquet",), "model_name": "sentiment", "model_version": "1",
        "model_run_id": "r", "text_column": "text", "id_column": None, "chunk_rows": 10,
        "format": "parquet", "shards": 1, "labels": ("negative", "positive"),
    }  # fmt: skip
    return plan.JobSpec(**{**base, **changes})


def test_job_spec_round_trip_and_differences() -> None:
    one = spec()
    assert plan.JobSpec.from_dict(one.to_dict()) == one
    assert one.fingerprint() == spec().fingerprint()
    other = spec(model_version="2", chunk_rows=20)
    assert other.differences(one) == ["model_version", "chunk_rows"]
    assert other.fingerprint() != one.fingerprint()


def test_manifest_sums_files_in_input_order() -> None:
    files = [
        plan.FileResult("a", "d1", 1, rows=10, errors=1, parts=["p1"], error_parts=["e1"]),
        plan.FileResult("b", "d2", 1, rows=5, errors=0, parts=["p2"]),
    ]
    doc = plan.manifest(spec(inputs=("a", "b")), "out", files, 0.2)
    assert (doc["rows"], doc["scored"], doc["errors"]) == (15, 14, 1)
    assert doc["parts"] == ["p1", "p2"] and doc["error_parts"] == ["e1"]
    assert doc["columns"] == [
        "id", "row", "label", "confidence", "prob_negative", "prob_positive",
        "model_version", "model_run_id",
    ]  # fmt: skip


def test_pods_get_only_the_callers_non_default_settings() -> None:
    assert batch_env(BatchSettings()) == []
    env = batch_env(BatchSettings(chunk_rows=500, format="csv", text_column="body"))
    assert env == [
        {"name": "ROOST_BATCH__TEXT_COLUMN", "value": "body"},
        {"name": "ROOST_BATCH__CHUNK_ROWS", "value": "500"},
        {"name": "ROOST_BATCH__FORMAT", "value": "csv"},
    ]
