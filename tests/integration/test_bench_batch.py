"""`roost bench batch` on small generated inputs: the section's shape, not its numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from roost.cli.app import app
from roost.config import Settings

pytestmark = pytest.mark.integration


def test_bench_batch_section(tmp_path: Path, settings: Settings, champion) -> None:
    out = tmp_path / "bench-out"
    (out).mkdir()
    (out / "bench.json").write_text(json.dumps({"servers": []}))  # a full run's results stay
    result = CliRunner().invoke(
        app,
        ["--state-dir", str(settings.state_dir), "bench", "batch", "--sizes", "1000,3000",
         "--out", str(out), "--json"],
        env={"MLFLOW_TRACKING_URI": str(settings.tracking.uri)},
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    section = json.loads(result.stdout)
    assert set(section["sizes"]) == {"1000", "3000"}
    for size, run in section["sizes"].items():
        assert run["rows"] == int(size) and run["errors"] == 0
        assert run["texts_per_s"] > 0 and run["peak_rss_mb"] > 0
    assert section["raw_forward_texts_per_s"] > 0
    assert set(section["targets"]) == {"batch_vs_raw", "rss_growth"}
    assert section["targets"]["rss_growth"]["sizes"] == [1000, 3000]
    document = json.loads((out / "bench.json").read_text())
    assert document["servers"] == [] and document["batch"]["command"].startswith(
        "roost bench batch --out"
    )
