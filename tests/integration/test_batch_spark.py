"""`roost batch --engine spark` on a local Spark (local[1]) against the local engine."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from roost import data
from roost.batch import plan
from roost.cli.app import app
from roost.config import Settings

pytestmark = pytest.mark.integration


def test_spark_engine_gives_the_local_engines_labels(
    tmp_path: Path, settings: Settings, champion
) -> None:
    texts = data.read_table(str(data.default_corpus_path()))["text"].astype(str).tolist()[:300]
    texts[7] = "   "  # a bad row: both engines send it to errors/
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(300)], "text": texts}), src)
    env = {"MLFLOW_TRACKING_URI": str(settings.tracking.uri)}
    common = ["--state-dir", str(settings.state_dir), "batch", "--model", champion.model_uri,
              "--input", str(src), "--json"]  # fmt: skip

    local = CliRunner().invoke(app, [*common, "--output", str(tmp_path / "local")], env=env)
    assert local.exit_code == 0, local.stderr
    spark = CliRunner().invoke(
        app,
        [*common, "--output", str(tmp_path / "spark"), "--engine", "spark", "--master", "local[1]"],
        env=env,
    )
    assert spark.exit_code == 0, spark.stderr
    summary = json.loads(spark.stdout)
    assert (summary["engine"], summary["rows"], summary["errors"]) == ("spark", 300, 1)

    manifest = json.loads((tmp_path / "local" / plan.MANIFEST_FILE).read_text())
    expected = pd.concat(pd.read_parquet(tmp_path / "local" / p) for p in manifest["parts"])
    parts = sorted((tmp_path / "spark").glob("part-*.parquet"))  # Spark's names; errors/ apart
    got = pd.concat(pd.read_parquet(p) for p in parts)
    assert got.columns.tolist() == manifest["columns"]
    merged = expected.merge(got, on="id", suffixes=("_local", "_spark"))
    assert len(merged) == 299
    assert (merged["label_local"] == merged["label_spark"]).all()
    assert (merged["row_local"] == merged["row_spark"]).all()
    assert ((merged["confidence_local"] - merged["confidence_spark"]).abs() < 1e-6).all()
    errors = pd.read_parquet(tmp_path / "spark" / "errors")
    assert errors[["id", "reason"]].values.tolist() == [["s7", plan.EMPTY]]
    assert (tmp_path / "spark" / "_SUCCESS").is_file()
