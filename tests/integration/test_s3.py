"""Training data and checkpoints on S3 (moto in server mode as the endpoint)."""

from __future__ import annotations

import io
from pathlib import Path

import boto3
import pandas as pd
import pytest

from roost import data, storage
from roost.config import DataSettings, ModelSettings, TrainSettings
from roost.errors import DataError
from roost.train import Checkpointer, fit

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket(moto_s3, monkeypatch: pytest.MonkeyPatch) -> str:  # type: ignore[no-untyped-def]
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    name = "roost-data"
    s3 = boto3.client("s3")
    if name not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=name)
    return name


def corpus_sample(n: int) -> pd.DataFrame:
    df = data.read_table(str(data.default_corpus_path()))
    return df.groupby("sentiment", group_keys=False).head(n // 3)


def test_load_csv_and_parquet_from_s3(bucket: str) -> None:
    frame = corpus_sample(300)
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="tweets.csv", Body=frame.to_csv(index=False).encode())
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    s3.put_object(Bucket=bucket, Key="tweets.parquet", Body=buffer.getvalue())

    for key in ("tweets.csv", "tweets.parquet"):
        splits = data.load_splits(DataSettings(uri=f"s3://{bucket}/{key}"))
        assert sum(splits.counts.values()) == len(frame.drop_duplicates("text"))
        assert splits.labels == ["negative", "neutral", "positive"]


def test_missing_s3_object_is_a_data_error(bucket: str) -> None:
    with pytest.raises(DataError, match=r"data file not found: s3://roost-data/absent\.csv"):
        data.read_table(f"s3://{bucket}/absent.csv")


def test_checkpoint_round_trip_on_s3(bucket: str, tmp_path: Path) -> None:
    frame = data.clean(corpus_sample(300), "text", "sentiment", dedupe=True)
    train, val, test = data.stratified_split(frame, 0.2, 0.2, seed=0)
    splits = data.Splits(train, val, test, ["negative", "neutral", "positive"], "s3")
    ckpt = Checkpointer(f"s3://{bucket}/checkpoints/job-1", fingerprint="f1")
    fit(
        splits, ModelSettings(embed_dim=8, min_count=1), TrainSettings(epochs=2, patience=5),
        on_epoch=lambda stats, payload: ckpt.save({**payload, "run_id": "run-1"}),
    )  # fmt: skip
    assert storage.exists(f"s3://{bucket}/checkpoints/job-1/checkpoint.pt")
    payload = ckpt.load()
    assert payload is not None and payload["epoch"] == 2 and payload["run_id"] == "run-1"
