"""The ``batch`` section of ``roost bench``: ``roost batch`` against the raw batched forward pass.

Stages, in order:

1. generate local Parquet inputs of each size (corpus texts repeated in a seeded order,
   row groups of 64k rows) under ``state_dir/bench/batch`` (kept between runs);
2. raw: the batch kernel (tokenise + forward) in this process over a sample of the same
   texts, at the batch size ``roost batch`` uses (``batch.forward_batch_size``);
3. per size: ``roost batch`` in a child process (what a user runs), its texts/s from its
   ``--json`` summary (the scoring loop: read, validate, tokenise, forward, write) and its
   wall time; its peak RSS from the kernel's accounting of that child (``wait4``);
4. raw again, keeping the higher rate (the machine's ceiling in this run);
5. the targets: texts/s of the largest size >= 80 % of raw, peak RSS of the largest within
   20 % of the smallest's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from roost import proc, tracking
from roost.config import Settings
from roost.errors import RoostError

Progress = Callable[[str], None]
SIZES = (100_000, 1_000_000)
ROW_GROUP = 65536


def generate(path: Path, rows: int, texts: Sequence[str], seed: int) -> Path:
    """A Parquet file of ``rows`` (id, text) rows; reused when it exists with that many rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_file() and pq.ParquetFile(path).metadata.num_rows == rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).integers(0, len(texts), size=rows)
    pool = pa.array(list(texts), pa.string())
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, pa.schema([("id", pa.string()), ("text", pa.string())])) as w:
        for start in range(0, rows, ROW_GROUP):
            idx = order[start : start + ROW_GROUP]
            ids = pa.array([f"r{i}" for i in range(start, start + len(idx))], pa.string())
            w.write_table(pa.table({"id": ids, "text": pool.take(pa.array(idx))}))
    tmp.replace(path)
    return path


def raw_rate(model_path: Path, texts: Sequence[str], batch_size: int, seconds: float) -> float:
    """Texts/s of the batch kernel (tokenise + forward) in this process."""
    import torch

    from roost import tokenizer
    from roost.bench import measure
    from roost.classifier import TextClassifier
    from roost.serving import kernel

    torch.set_num_threads(proc.cpu_limit())
    classifier = TextClassifier.load(model_path)
    fast = kernel.Kernel(
        classifier.module,
        kernel.encoder_for(classifier.tokenizer, tokenizer.TOKEN_RE),
        classifier.num_classes,
    )
    return measure.raw_forward(fast.predict_proba, texts, (batch_size,), seconds)[batch_size]


def run_batch(
    settings: Settings, model: str, input_path: Path, output: Path, tracking_uri: str
) -> dict[str, Any]:
    """``roost batch`` in a child process; its summary plus wall time and peak RSS."""
    if output.exists():
        shutil.rmtree(output)
    argv = [
        str(Path(sys.executable).with_name("roost")), "--state-dir", str(settings.state_dir),
        "batch", "--model", model, "--input", str(input_path), "--output", str(output),
        "--json",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    started = time.monotonic()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    out = child.stdout.read()
    err = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    if child.returncode != 0:
        raise RoostError(f"roost batch failed ({child.returncode}): {err.decode()[-500:]}")
    summary: dict[str, Any] = json.loads(out)
    return {
        "rows": summary["rows"],
        "texts_per_s": summary["rows_per_s"],
        "scoring_s": summary["seconds"],
        "wall_s": round(wall, 2),
        "texts_per_s_wall": round(summary["rows"] / wall, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kilobytes
        "chunks": summary["chunks_written"],
        "errors": summary["errors"],
    }


def run(
    settings: Settings,
    model: str,
    sizes: Sequence[int] = SIZES,
    texts_sample: int = 20000,
    raw_seconds: float = 3.0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The bench.json ``batch`` section (see the module docstring)."""
    from roost import registry
    from roost.bench import workload

    say = progress or (lambda message: None)
    cfg = settings.batch
    local = registry.fetch_model(settings, model)
    texts = workload.sample_texts(settings.data, texts_sample, settings.bench.seed)
    work = (settings.state_dir / "bench" / "batch").resolve()
    tracking_uri = tracking.resolve_uri(settings)
    raw = raw_rate(local.path, texts, cfg.forward_batch_size, raw_seconds)
    say(f"batch: raw forward {raw:,.0f} texts/s at batch {cfg.forward_batch_size}")
    runs: dict[str, Any] = {}
    for size in sizes:
        path = generate(work / f"input-{size}.parquet", size, texts, settings.bench.seed)
        result = run_batch(settings, str(local.path), path, work / f"output-{size}", tracking_uri)
        shutil.rmtree(work / f"output-{size}", ignore_errors=True)
        runs[str(size)] = {**result, "input_mb": round(path.stat().st_size / 2**20, 1)}
        say(
            f"batch: {size:,} rows at {result['texts_per_s']:,.0f} texts/s "
            f"(wall {result['wall_s']:.1f}s), peak RSS {result['peak_rss_mb']:.0f} MB"
        )
    again = raw_rate(local.path, texts, cfg.forward_batch_size, raw_seconds)
    best_raw = max(raw, again)
    small, large = runs[str(min(sizes))], runs[str(max(sizes))]
    ratio = large["texts_per_s"] / best_raw if best_raw else 0.0
    rss_growth = large["peak_rss_mb"] / small["peak_rss_mb"] - 1 if small["peak_rss_mb"] else 0.0
    return {
        "model": model,
        "model_version": local.version or "local",
        "chunk_rows": cfg.chunk_rows,
        "forward_batch_size": cfg.forward_batch_size,
        "raw_forward_texts_per_s": round(best_raw, 1),
        "raw_before_after": [raw, again],
        "sizes": runs,
        "targets": {
            "batch_vs_raw": {"value": round(ratio, 3), "target": 0.8, "met": ratio >= 0.8},
            "rss_growth": {
                "value": round(rss_growth, 3),
                "target": 0.2,
                "met": rss_growth <= 0.2,
                "sizes": [min(sizes), max(sizes)],
            },
        },
        "note": "texts/s: roost batch's scoring loop (read Parquet, validate, tokenise, "
        "forward, write Parquet) from its --json summary; wall includes process start and "
        "model load; raw: the same batch kernel in-process on a corpus sample, the higher of "
        "before and after",
    }
