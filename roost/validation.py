"""The promotion gate in MLflow's terms: ``mlflow.models.evaluate`` + model validation.

roost's rule is *candidate >= champion + min_improvement* on the gate metric
(:func:`roost.registry.decide`). Here the same comparison is expressed with MLflow's
``MetricThreshold`` and checked by ``mlflow.validate_evaluation_results`` on the results
of ``mlflow.models.evaluate`` (default classifier evaluator, static predictions: the
pyfunc's answers on the held-out test split). The evaluation is an MLflow run of its own
(``gate-<model>-v<version>``, the champion's baseline a nested run), so an MLflow user
sees the gate's metrics, confusion matrix and per-class numbers the way MLflow shows any
evaluation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from roost.errors import RoostError

log = logging.getLogger(__name__)

# roost's gate metric -> the metric name in MLflow's evaluation result. The default
# evaluator's ``f1_score`` is macro-F1 only with three or more classes (binary data gets the
# positive class's F1), so macro-F1 is an extra metric of its own, from scikit-learn.
MLFLOW_METRIC = {"macro_f1": "macro_f1", "accuracy": "accuracy_score"}
# Explainability (SHAP) needs numeric labels and a model; the gate has text labels and
# static predictions, so it is off rather than a warning on every promote.
EVALUATOR_CONFIG: dict[str, Any] = {"average": "macro", "log_model_explainability": False}
TARGET, PREDICTION = "label", "prediction"


def _macro_f1(predictions: Any, targets: Any, metrics: Any = None) -> Any:
    from mlflow.metrics.base import MetricValue
    from sklearn.metrics import f1_score

    value = f1_score(targets, predictions, average="macro", zero_division=0)
    return MetricValue(aggregate_results={"macro_f1": float(value)})


def macro_f1_metric() -> Any:
    """``macro_f1`` as an MLflow ``EvaluationMetric`` (greater is better)."""
    from mlflow import models

    make_metric: Any = models.make_metric  # untyped in MLflow
    return make_metric(eval_fn=_macro_f1, greater_is_better=True, name="macro_f1")


def thresholds(metric: str, champion_score: float | None, min_improvement: float) -> dict[str, Any]:
    """``candidate >= champion + min_improvement`` as MLflow ``MetricThreshold`` s.

    MLflow's ``min_absolute_change`` must be positive, so the rule takes the form that
    means the same: a positive improvement is ``min_absolute_change``; zero is
    ``min_relative_change=0.0`` (candidate >= baseline); a negative allowance (or a
    champion scoring 0, where the relative form changes meaning) is a plain ``threshold``
    at champion + min_improvement. No champion: nothing to compare, no threshold.
    """
    from mlflow import models

    MetricThreshold: Any = models.MetricThreshold  # untyped in MLflow
    if champion_score is None:
        return {}
    name = MLFLOW_METRIC[metric]
    if min_improvement > 0:
        rule = MetricThreshold(min_absolute_change=min_improvement, greater_is_better=True)
    elif min_improvement == 0 and champion_score > 0:
        rule = MetricThreshold(min_relative_change=0.0, greater_is_better=True)
    else:
        rule = MetricThreshold(threshold=champion_score + min_improvement, greater_is_better=True)
    return {name: rule}


def validate(
    metric: str,
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    min_improvement: float,
) -> tuple[bool, str]:
    """MLflow's verdict on two metric dicts (as ``EvaluationResult.metrics``)."""
    import mlflow
    from mlflow import models
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    EvaluationResult: Any = models.EvaluationResult  # untyped in MLflow

    name = MLFLOW_METRIC[metric]
    champion_score = None if champion is None else champion[name]
    rules = thresholds(metric, champion_score, min_improvement)
    baseline = None if champion is None else EvaluationResult(champion, {})
    try:
        mlflow.validate_evaluation_results(
            validation_thresholds=rules,
            candidate_result=EvaluationResult(candidate, {}),
            baseline_result=baseline,
        )
    except ModelValidationFailedException as exc:
        return False, str(exc.message)
    return True, f"{name} passed the validation" if rules else "no baseline: nothing to compare"


@dataclass(frozen=True)
class Evaluation:
    run_id: str
    experiment_id: str
    passed: bool
    message: str
    candidate: dict[str, float]
    champion: dict[str, float] | None

    def score(self, metric: str, side: str = "candidate") -> float | None:
        values = self.candidate if side == "candidate" else self.champion
        return None if values is None else float(values[MLFLOW_METRIC[metric]])


def evaluate(
    experiment: str,
    model: str,
    version: str,
    champion_version: str | None,
    truth: list[str],
    candidate: list[str],
    champion: list[str] | None,
    metric: str,
    min_improvement: float,
) -> Evaluation:
    """Evaluate both versions' test-split predictions in MLflow and validate the gate rule."""
    import mlflow
    import pandas as pd

    def run_eval(predicted: list[str]) -> dict[str, float]:
        frame = pd.DataFrame({TARGET: truth, PREDICTION: predicted})
        evaluate_fn: Any = mlflow.models.evaluate  # untyped in MLflow
        result = evaluate_fn(
            data=frame,
            targets=TARGET,
            predictions=PREDICTION,
            model_type="classifier",
            evaluators="default",
            evaluator_config=EVALUATOR_CONFIG,
            extra_metrics=[macro_f1_metric()],
        )
        return {k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)}

    tags = {"roost.kind": "gate", "roost.model": model, "roost.version": version}
    exp = mlflow.set_experiment(experiment)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(
        experiment_id=exp.experiment_id,
        run_name=f"gate-{model}-v{version}",
        tags={**tags, "roost.champion": champion_version or "none"},
        nested=nested,
    ) as run:
        scores = run_eval(candidate)
        baseline: dict[str, float] | None = None
        if champion is not None and champion_version is not None:
            with mlflow.start_run(
                run_name=f"baseline-{model}-v{champion_version}",
                tags={
                    "roost.kind": "gate-baseline",
                    "roost.model": model,
                    "roost.version": champion_version,
                },
                nested=True,
            ):
                baseline = run_eval(champion)
        passed, message = validate(metric, scores, baseline, min_improvement)
        mlflow.set_tags(
            {
                "roost.gate.decision": "passed" if passed else "refused",
                "roost.gate.validation": message[:4900],
            }
        )
    if MLFLOW_METRIC[metric] not in scores:
        raise RoostError(f"MLflow's evaluation did not compute {MLFLOW_METRIC[metric]}")
    return Evaluation(run.info.run_id, exp.experiment_id, passed, message, scores, baseline)
