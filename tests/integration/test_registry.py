"""Training record, registry gate and pyfunc loading against a real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient

from roost import registry
from roost.classifier import TextClassifier
from roost.config import Settings
from roost.registry import Registry, promote
from roost.train import MODEL_URI_TAG, TEST_SPLIT_ARTIFACT

pytestmark = pytest.mark.integration


def test_training_run_records_everything(settings: Settings, champion) -> None:  # type: ignore[no-untyped-def]
    client = MlflowClient(settings.tracking.uri)
    run = client.get_run(champion.outcome.run_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    for key in ("train.lr", "train.epochs", "train.batch_size", "model.embed_dim", "model.ngram",
                "data.seed", "data.rows_train", "data.rows_test", "model.vocab_size"):  # fmt: skip
        assert key in params, key
    assert (
        int(params["data.rows_train"])
        + int(params["data.rows_val"])
        + int(params["data.rows_test"])
        == 6000
    )
    for key in ("test_accuracy", "test_macro_f1", "test_precision_negative", "test_recall_positive",
                "train_loss", "val_loss", "val_accuracy", "train_accuracy"):  # fmt: skip
        assert key in metrics, key
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == list(range(1, len(history) + 1)) and len(history) >= 2
    assert tags[MODEL_URI_TAG].startswith("models:/")
    assert len(tags.get("mlflow.source.git.commit", "")) == 40
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "classification_report.json", "data"} <= artifacts
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"training", "validation", "test"}
    for i in run.inputs.dataset_inputs:
        assert i.dataset.digest and json.loads(i.dataset.profile)["num_rows"] > 0
    with tempfile.TemporaryDirectory() as tmp:
        png = client.download_artifacts(run.info.run_id, "confusion_matrix.png", tmp)
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


PYFUNC_CALLER = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/sentiment@champion")
frame = model.predict(pd.DataFrame({"text": sys.argv[1:]}))
print(json.dumps({"columns": list(frame.columns), "rows": frame.to_dict("records"),
                  "inputs": model.metadata.get_input_schema().input_names(),
                  "roost_from": sys.modules["roost"].__file__}))
"""


def test_pyfunc_loads_by_alias_with_no_roost_code(settings: Settings, champion, tmp_path) -> None:  # type: ignore[no-untyped-def]
    texts = ["what a wonderful day", "worst service ever, cancelled again"]
    # A caller that never imports roost itself: plain mlflow + pandas in a fresh interpreter.
    result = subprocess.run(
        [sys.executable, "-c", PYFUNC_CALLER, *texts],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
        env={**os.environ, "MLFLOW_TRACKING_URI": settings.tracking.uri},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["columns"][:2] == ["label", "confidence"]
    assert {"prob_negative", "prob_neutral", "prob_positive"} <= set(out["columns"])
    assert out["inputs"] == ["text"]
    # roost's code came from the model artifact's code/ directory, not the installed package.
    assert "/code/roost/" in out["roost_from"] and "/work/main/roost" not in out["roost_from"]
    direct = TextClassifier.load(registry.fetch_model(settings, "models:/sentiment@champion").path)
    labels, proba = direct.predict(texts)
    assert [row["label"] for row in out["rows"]] == labels
    for row, p in zip(out["rows"], proba, strict=True):
        assert row["confidence"] == pytest.approx(float(p.max()), abs=1e-6)
        assert sum(row[f"prob_{k}"] for k in ("negative", "neutral", "positive")) == pytest.approx(
            1, abs=1e-5
        )


def test_gate_tags_on_champion(settings: Settings, champion) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(settings.tracking.uri, "sentiment")
    tags = reg.get_version(champion.version).tags
    assert tags["roost.gate.decision"] == "passed"
    assert float(tags["roost.gate.candidate_score"]) == pytest.approx(
        champion.outcome.test.macro_f1, abs=1e-6
    )
    assert (
        tags["roost.gate.reason"].startswith("no champion yet")
        or "champion v" in tags["roost.gate.reason"]
    )


def test_worse_version_is_refused_and_keeps_candidate(settings: Settings, champion) -> None:  # type: ignore[no-untyped-def]
    from roost.train import run_training

    # A deliberately weak model: a few hundred rows, one epoch.
    weak_settings = settings.model_copy(
        update={
            "data": settings.data.model_copy(update={"max_rows": 600}),
            "train": settings.train.model_copy(update={"epochs": 1}),
        }
    )
    weak = run_training(weak_settings)
    result = promote(settings, run_id=weak.run_id)  # evaluated on the weak run's own test split
    reg = Registry(settings.tracking.uri, "sentiment")
    assert not result.decision.passed
    assert result.alias == "candidate"
    assert reg.require_alias("champion") == champion.version
    assert reg.require_alias("candidate") == result.version
    tags = reg.get_version(result.version).tags
    assert tags["roost.gate.decision"] == "refused"
    assert float(tags["roost.gate.champion_score"]) > float(tags["roost.gate.candidate_score"])
    assert tags["roost.gate.champion_version"] == champion.version
    assert "<" in tags["roost.gate.reason"]


def test_test_split_artifact_matches_run(settings: Settings, champion) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(settings.tracking.uri, "sentiment")
    frame = reg.test_split(champion.outcome.run_id)
    assert len(frame) == champion.outcome.counts["test"]
    assert TEST_SPLIT_ARTIFACT.endswith(".parquet")


def test_fetch_model_caches_by_version(settings: Settings, champion) -> None:  # type: ignore[no-untyped-def]
    first = registry.fetch_model(settings, "models:/sentiment@champion")
    again = registry.fetch_model(settings, f"models:/sentiment/{champion.version}")
    assert first.path == again.path and (first.path / "MLmodel").is_file()
    assert first.version == champion.version and first.alias == "champion"
