"""`roost batch` end to end: real MLflow server and registry, local files and moto's S3 server.

Every run scores with the session's champion (a model trained on a corpus sample) and is
checked against the reference classifier (``TextClassifier.predict``) row by row.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from roost import data, proc, registry
from roost.batch import plan, runner
from roost.classifier import TextClassifier
from roost.cli.app import app
from roost.config import Settings, load_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def texts() -> list[str]:
    frame = data.read_table(str(data.default_corpus_path()))
    return frame["text"].astype(str).tolist()[:3000]


@pytest.fixture(scope="module")
def reference(settings: Settings, champion) -> TextClassifier:
    model = registry.fetch_model(settings, champion.model_uri)
    return TextClassifier.load(model.path)


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": str(settings.tracking.uri), "COLUMNS": "200"}


def cli(settings: Settings, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        app, ["--state-dir", str(settings.state_dir), "batch", *args], env=env
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result.exit_code, result.stdout, result.stderr


def read_parts(directory: Path, names: list[str]) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(directory / n) for n in names], ignore_index=True)


def expected_labels(reference: TextClassifier, texts: list[str]) -> list[str]:
    labels, _ = reference.predict(texts)
    return labels


# -- local files -----------------------------------------------------------------------------


def test_parquet_chunks_rows_and_manifest(
    tmp_path: Path, settings: Settings, env, champion, reference, texts
) -> None:
    rows = texts[:1050]
    src = tmp_path / "in" / "tweets.parquet"
    src.parent.mkdir()
    ids = [f"t{i}" for i in range(len(rows))]
    pq.write_table(pa.table({"id": ids, "text": rows}), src, row_group_size=128)
    out = tmp_path / "out"

    code, stdout, err = cli(
        settings, env, "--model", champion.model_uri, "--input", str(src), "--output", str(out),
        "--chunk-rows", "200", "--json",
    )  # fmt: skip

    assert code == 0, err
    summary = json.loads(stdout)
    assert (summary["rows"], summary["errors"], summary["succeeded"]) == (1050, 0, True)
    assert summary["model_version"] == champion.version
    manifest = json.loads((out / plan.MANIFEST_FILE).read_text())
    assert (out / plan.SUCCESS_FILE).is_file()
    # chunk boundaries: 5 full chunks of 200 rows, then the last 50
    assert manifest["parts"] == [f"part-00000-{i:06d}.parquet" for i in range(6)]
    sizes = [len(pd.read_parquet(out / p)) for p in manifest["parts"]]
    assert sizes == [200, 200, 200, 200, 200, 50]
    frame = read_parts(out, manifest["parts"])
    assert frame.columns.tolist() == manifest["columns"]
    assert frame["id"].tolist() == ids and frame["row"].tolist() == list(range(1050))
    assert frame["label"].tolist() == expected_labels(reference, rows)
    probs = frame[[c for c in frame.columns if c.startswith("prob_")]]
    assert ((probs.sum(axis=1) - 1).abs() < 1e-4).all()
    assert (frame["confidence"] == probs.max(axis=1)).all()
    assert set(frame["model_version"]) == {champion.version}
    assert set(frame["model_run_id"]) == {champion.outcome.run_id}
    file = manifest["files"][0]
    assert file["rows"] == 1050 and file["digest"].startswith("sha256:")

    # the MLflow run records the job, and the model version is tagged with it
    from mlflow import MlflowClient

    client = MlflowClient(str(settings.tracking.uri))
    run = client.get_run(summary["run_id"])
    assert run.data.params["model_version"] == champion.version
    assert run.data.params["output"] == str(out)
    assert run.data.metrics["rows"] == 1050 and run.data.metrics["errors"] == 0
    assert run.data.metrics["rows_per_s"] > 0
    inputs = run.inputs.dataset_inputs
    assert [i.dataset.digest for i in inputs] == [file["digest"].split(":", 1)[1][:36]]
    version = client.get_model_version("sentiment", champion.version)
    assert version.tags[f"roost.batch.run.{summary['run_id']}"] == str(out)

    # a rerun of a finished job changes nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    code, stdout, _ = cli(settings, env, "--model", champion.model_uri, "--input", str(src),
                          "--output", str(out), "--chunk-rows", "200", "--json")  # fmt: skip
    assert code == 0 and json.loads(stdout)["chunks_written"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before


def test_every_bad_row_kind_goes_to_errors(
    tmp_path: Path, settings: Settings, env, champion, reference, texts
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    # CSV: undecodable bytes, an empty cell (missing), a quoted empty string, whitespace only
    good_csv = [t.replace(",", " ").replace('"', " ").encode() for t in texts[:2]]
    csv_rows = [b"id,text", b"c0," + good_csv[0], b"c1,caf\xe9 \xff", b"c2,", b'c3,""',
                b"c4,   ", b"c5," + good_csv[1]]  # fmt: skip
    (src / "a.csv").write_bytes(b"\n".join(csv_rows) + b"\n")
    # JSON lines: non-string, key missing, malformed JSON, undecodable line, null
    lines = [
        json.dumps({"id": "j0", "text": texts[2]}).encode(),
        json.dumps({"id": "j1", "text": 12345}).encode(),
        json.dumps({"id": "j2", "other": "x"}).encode(),
        b'{"id": "j3", "text": "unterminated',
        b'{"id": "j4", "text": "\xff\xfe"}',
        json.dumps({"id": "j5", "text": None}).encode(),
        json.dumps({"id": "j6", "text": texts[3]}).encode(),
    ]
    (src / "b.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"

    code, stdout, err = cli(
        settings, env, "--model", champion.model_uri, "--input", str(src), "--output", str(out),
        "--format", "jsonl", "--max-error-rate", "0.9", "--json",
    )  # fmt: skip

    assert code == 0, err
    summary = json.loads(stdout)
    assert (summary["rows"], summary["errors"]) == (13, 9)
    errors = pd.concat(
        [pd.read_json(out / "errors" / n, lines=True, dtype={"id": str})
         for n in sorted(os.listdir(out / "errors"))]
    )  # fmt: skip
    reasons = dict(zip(errors["id"], errors["reason"], strict=True))
    assert reasons == {
        "c1": plan.UNDECODABLE, "c2": plan.MISSING, "c3": plan.EMPTY, "c4": plan.EMPTY,
        "j1": "non-string text (int)", "j2": plan.MISSING, "j5": plan.MISSING,
        # a line that does not parse has no id: its row number stands in
        "3": plan.INVALID_JSON, "4": plan.UNDECODABLE,
    }  # fmt: skip
    scored = pd.concat(
        [pd.read_json(out / p, lines=True, dtype={"id": str})
         for p in json.loads((out / plan.MANIFEST_FILE).read_text())["parts"]]
    )  # fmt: skip
    assert scored["id"].tolist() == ["c0", "c5", "j0", "j6"]
    good = [good_csv[0].decode(), good_csv[1].decode(), texts[2], texts[3]]
    assert scored["label"].tolist() == expected_labels(reference, good)

    # above the allowed rate: the job fails with one line, the manifest says why, no _SUCCESS
    out2 = tmp_path / "out2"
    code, stdout, err = cli(
        settings, env, "--model", champion.model_uri, "--input", str(src), "--output", str(out2),
        "--max-error-rate", "0.5",
    )  # fmt: skip
    assert code == 1 and stdout == ""
    assert err.strip().splitlines()[-1].startswith("error: 9 of 13 rows are bad")
    assert (out2 / plan.MANIFEST_FILE).is_file() and not (out2 / plan.SUCCESS_FILE).exists()


@pytest.mark.parametrize(
    ("case", "needle", "exit_code"),
    [
        ("missing-input", "no input files match", 2),
        ("unknown-column", "no column 'body'", 2),
        ("bad-model", "cannot load model", 2),
        ("missing-version", "no version 999", 3),
    ],
)
def test_bad_invocations_are_one_line_and_write_nothing(
    tmp_path: Path, settings: Settings, env, champion, texts, case, needle, exit_code
) -> None:
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": texts[:20]}), src)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "classifier.json").write_text("{not json")
    args = {
        "missing-input": ["--model", champion.model_uri, "--input", str(tmp_path / "nope/*.csv")],
        "unknown-column": ["--model", champion.model_uri, "--input", str(src),
                           "--text-column", "body"],
        "bad-model": ["--model", str(broken), "--input", str(src)],
        "missing-version": ["--model", "999", "--input", str(src)],
    }[case]  # fmt: skip
    out = tmp_path / "out"
    code, stdout, err = cli(settings, env, *args, "--output", str(out))
    assert code == exit_code and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not out.exists()


def test_output_of_another_job_is_refused(
    tmp_path: Path, settings: Settings, env, champion, texts
) -> None:
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": texts[:30]}), src)
    out = tmp_path / "out"
    base = ["--model", champion.model_uri, "--input", str(src), "--output", str(out)]
    assert cli(settings, env, *base, "--chunk-rows", "10")[0] == 0
    code, _, err = cli(settings, env, *base, "--chunk-rows", "20")
    assert code == 2 and "holds another batch job (differs in: chunk_rows)" in err


# -- SIGKILL, then resume ----------------------------------------------------------------------


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_output(
    tmp_path: Path, settings: Settings, champion, texts
) -> None:
    rows = (texts * 20)[:40000]
    src = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": rows}), src, row_group_size=4096)
    argv = [
        str(Path(sys.executable).with_name("roost")), "--state-dir", str(settings.state_dir),
        "batch", "--model", champion.model_uri, "--input", str(src), "--chunk-rows", "1000",
        "--json",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": str(settings.tracking.uri)}
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*argv, "--output", str(killed)], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        chunks = killed / plan.CHUNKS_DIR

        def two_chunks_or_exit() -> bool:
            return process.poll() is not None or (chunks.is_dir() and len(os.listdir(chunks)) >= 2)

        proc.wait_until(two_chunks_or_exit, timeout=180, interval=0.02, what="two chunks")
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / plan.SUCCESS_FILE).exists()
    done_before = len(os.listdir(killed / plan.CHUNKS_DIR))
    assert 0 < done_before < 40

    resumed = subprocess.run(
        [*argv, "--output", str(killed)], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["chunks_skipped"] >= done_before
    assert summary["chunks_written"] + summary["chunks_skipped"] == 40

    clean = tmp_path / "clean"  # the uninterrupted run, in this process
    one_go = load_settings(None, {
        "state_dir": settings.state_dir, "tracking": {"uri": settings.tracking.uri},
        "batch": {"model": champion.model_uri, "chunk_rows": 1000},
    })  # fmt: skip
    assert runner.run(one_go, str(src), str(clean)).succeeded

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("part-*"))}

    killed_files, clean_files = files(killed), files(clean)
    assert list(killed_files) == list(clean_files) and len(clean_files) == 40
    assert killed_files == clean_files  # byte for byte
    assert not list(killed.rglob("*.tmp"))
    frame = read_parts(killed, sorted(killed_files))
    assert frame["row"].tolist() == list(range(40000))  # every row once, in order


# -- S3 (moto in server mode) -----------------------------------------------------------------


@pytest.fixture
def bucket(moto_s3, monkeypatch: pytest.MonkeyPatch) -> str:  # type: ignore[no-untyped-def]
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    name = "roost-batch"
    s3 = boto3.client("s3")
    if name not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=name)
    return name


def put_parquet(bucket: str, key: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=sink.getvalue().to_pybytes())


def s3_keys(bucket: str, prefix: str) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def s3_frame(bucket: str, key: str) -> pd.DataFrame:
    import io

    body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    return pd.read_parquet(io.BytesIO(body))


def test_s3_glob_in_s3_prefix_out(
    bucket: str, settings: Settings, champion, reference, texts, moto_s3
) -> None:
    put_parquet(bucket, "in/day=1/a.parquet", pa.table({"id": ["a0", "a1", "a2"],
                                                        "text": texts[:3]}))  # fmt: skip
    csv = "id,text\n" + "\n".join(f"b{i},{t.replace(',', ' ')}" for i, t in enumerate(texts[3:7]))
    boto3.client("s3").put_object(Bucket=bucket, Key="in/day=2/b.csv", Body=csv.encode())
    boto3.client("s3").put_object(Bucket=bucket, Key="in/notes.txt", Body=b"ignored")
    env = {**moto_s3.env, "MLFLOW_TRACKING_URI": str(settings.tracking.uri)}

    code, stdout, err = cli(
        settings, env, "--model", champion.model_uri, "--input", f"s3://{bucket}/in/*/*",
        "--output", f"s3://{bucket}/scores/run1", "--chunk-rows", "2", "--json",
    )  # fmt: skip

    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["inputs"] == [f"s3://{bucket}/in/day=1/a.parquet",
                                 f"s3://{bucket}/in/day=2/b.csv"]  # fmt: skip
    keys = s3_keys(bucket, "scores/run1/")
    assert "scores/run1/_SUCCESS" in keys and "scores/run1/_manifest.json" in keys
    parts = [k for k in keys if k.rsplit("/", 1)[-1].startswith("part-")]
    assert [k.rsplit("/", 1)[-1] for k in parts] == [
        "part-00000-000000.parquet", "part-00000-000001.parquet",
        "part-00001-000000.parquet", "part-00001-000001.parquet",
    ]  # fmt: skip
    frame = pd.concat([s3_frame(bucket, k) for k in parts], ignore_index=True)
    assert frame["id"].tolist() == ["a0", "a1", "a2", "b0", "b1", "b2", "b3"]
    good = texts[:3] + [t.replace(",", " ") for t in texts[3:7]]
    assert frame["label"].tolist() == expected_labels(reference, good)
    manifest = json.loads(boto3.client("s3").get_object(
        Bucket=bucket, Key="scores/run1/_manifest.json")["Body"].read())  # fmt: skip
    assert [f["digest"][:5] for f in manifest["files"]] == ["etag:", "etag:"]
    assert not any(k.endswith(".tmp") for k in keys)


def test_missing_s3_input_writes_nothing(
    bucket: str, settings: Settings, champion, moto_s3
) -> None:
    env = {**moto_s3.env, "MLFLOW_TRACKING_URI": str(settings.tracking.uri)}
    code, _, err = cli(settings, env, "--model", champion.model_uri,
                       "--input", f"s3://{bucket}/absent/*.parquet",
                       "--output", f"s3://{bucket}/scores/none")  # fmt: skip
    assert code == 2 and "no input files match" in err
    assert s3_keys(bucket, "scores/none") == []
