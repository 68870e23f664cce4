"""The gate's rule in MLflow's terms agrees with roost's own rule, boundaries included."""

from __future__ import annotations

import itertools

import pytest

from roost import validation
from roost.evaluation import classification_report
from roost.registry import decide

pytestmark = pytest.mark.unit

SCORES = [0.0, 0.25, 0.7, 0.71, 0.7100000000000001, 0.72, 1.0]
IMPROVEMENTS = [0.0, 0.01, 0.05, -0.01, 0.1]


@pytest.mark.parametrize("metric", ["macro_f1", "accuracy"])
def test_mlflow_validation_agrees_with_decide_everywhere(metric: str) -> None:
    name = validation.MLFLOW_METRIC[metric]
    for candidate, champion, gain in itertools.product(SCORES, SCORES, IMPROVEMENTS):
        ours = decide(metric, candidate, champion, "1", gain)
        passed, message = validation.validate(metric, {name: candidate}, {name: champion}, gain)
        assert passed == ours.passed, (candidate, champion, gain, message, ours.reason)


def test_no_champion_passes_with_no_threshold() -> None:
    assert validation.thresholds("macro_f1", None, 0.0) == {}
    passed, message = validation.validate("macro_f1", {"macro_f1": 0.1}, None, 0.0)
    assert passed and "no baseline" in message
    assert decide("macro_f1", 0.1, None, None, 0.0).passed


def test_refusal_names_the_metric_and_both_values() -> None:
    passed, message = validation.validate("macro_f1", {"macro_f1": 0.70}, {"macro_f1": 0.72}, 0.0)
    assert not passed and "macro_f1" in message and "0.7" in message and "0.72" in message


def test_macro_f1_is_sklearns_and_what_mlflow_calls_f1_with_average_macro() -> None:
    from sklearn.metrics import f1_score

    truth = ["neg", "neg", "pos", "neu", "pos", "neu", "neg"]
    predicted = ["neg", "pos", "pos", "neu", "neu", "neu", "neu"]
    report = classification_report(truth, predicted, sorted(set(truth) | set(predicted)))
    assert report.macro_f1 == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert validation.EVALUATOR_CONFIG["average"] == "macro"


@pytest.mark.parametrize(
    ("truth", "predicted"),
    [
        (["neg", "neg", "pos", "neu", "pos", "neu"], ["neg", "pos", "pos", "neu", "neu", "neg"]),
        (["neg", "pos", "pos", "neg", "pos"], ["neg", "neg", "pos", "neg", "neg"]),  # binary
    ],
)
def test_mlflows_macro_f1_metric_is_the_gates(truth: list[str], predicted: list[str]) -> None:
    import pandas as pd

    value = validation._macro_f1(pd.Series(predicted), pd.Series(truth))
    report = classification_report(truth, predicted, sorted(set(truth) | set(predicted)))
    assert value.aggregate_results == {"macro_f1": pytest.approx(report.macro_f1)}
    assert validation.macro_f1_metric().name == "macro_f1"
