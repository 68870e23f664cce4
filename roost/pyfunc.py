"""The classifier as an MLflow pyfunc model.

``mlflow.pyfunc.load_model("models:/sentiment@champion").predict(pd.DataFrame({"text": [...]}))``
works with no roost code on the caller's side: the roost package travels in the model's
``code/`` directory and the weights in ``artifacts/classifier/``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc.model import PythonModel, PythonModelContext
from mlflow.types import ColSpec, Schema

from roost.classifier import TextClassifier

log = logging.getLogger(__name__)

ARTIFACT_KEY = "classifier"
TEXT_COLUMN = "text"
PACKAGE_DIR = Path(__file__).resolve().parent


def output_frame(labels: list[str], names: list[str], proba: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"label": names, "confidence": proba.max(axis=1).astype("float64")})
    for i, label in enumerate(labels):
        frame[f"prob_{label}"] = proba[:, i].astype("float64")
    return frame


def texts_from(model_input: Any) -> list[str]:
    """Accept a DataFrame (``text`` column, else the only column), Series, array or list."""
    if isinstance(model_input, pd.DataFrame):
        if TEXT_COLUMN in model_input.columns:
            column = model_input[TEXT_COLUMN]
        elif len(model_input.columns) == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(f"expected a {TEXT_COLUMN!r} column, got {list(model_input.columns)}")
        values: list[str] = column.astype(str).tolist()
        return values
    if isinstance(model_input, pd.Series | np.ndarray):
        return [str(x) for x in model_input.tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(x) for x in model_input]


class SentimentPyfunc(PythonModel):  # type: ignore[misc]
    """MLflow wrapper around :class:`roost.classifier.TextClassifier`."""

    classifier: TextClassifier

    def load_context(self, context: PythonModelContext) -> None:
        self.classifier = TextClassifier.load(Path(context.artifacts[ARTIFACT_KEY]))

    def predict(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        names, proba = self.classifier.predict(texts_from(model_input))
        return output_frame(self.classifier.labels, names, proba)


def signature(labels: list[str]) -> ModelSignature:
    outputs: list[Any] = [ColSpec("string", "label"), ColSpec("double", "confidence")]
    outputs += [ColSpec("double", f"prob_{label}") for label in labels]
    inputs: list[Any] = [ColSpec("string", TEXT_COLUMN)]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def pip_requirements() -> list[str]:
    import torch

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
    ]


def log_model(
    classifier: TextClassifier, example_texts: list[str], name: str = "model"
) -> ModelInfo:
    """Log ``classifier`` to the active run as a pyfunc model; returns MLflow's ModelInfo."""
    with tempfile.TemporaryDirectory(prefix="roost-model-") as tmp:
        saved = classifier.save(Path(tmp) / ARTIFACT_KEY)
        info: ModelInfo = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PACKAGE_DIR / "pyfunc_entry.py"),
            artifacts={ARTIFACT_KEY: str(saved)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature(classifier.labels),
            input_example=pd.DataFrame({TEXT_COLUMN: example_texts}),
            pip_requirements=pip_requirements(),
        )
    return info
