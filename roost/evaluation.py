"""Classification metrics (scikit-learn's) and the confusion-matrix plot.

Every number comes from ``sklearn.metrics``, the same functions MLflow's default
classifier evaluator calls; this module only shapes them for roost's tags, metrics and
reports. The gate's MLflow evaluation lives in :mod:`roost.registry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Report:
    labels: list[str]
    accuracy: float
    macro_f1: float
    precision: dict[str, float]
    recall: dict[str, float]
    f1: dict[str, float]
    support: dict[str, int]
    confusion: list[list[int]]  # rows: true label, columns: predicted label
    n: int

    def metric(self, name: str) -> float:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1}[name]

    def flat(self, prefix: str = "test_") -> dict[str, float]:
        """MLflow-ready metrics: accuracy, macro-F1, per-class precision/recall/F1."""
        out = {f"{prefix}accuracy": self.accuracy, f"{prefix}macro_f1": self.macro_f1}
        for label in self.labels:
            out[f"{prefix}precision_{label}"] = self.precision[label]
            out[f"{prefix}recall_{label}"] = self.recall[label]
            out[f"{prefix}f1_{label}"] = self.f1[label]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "n": self.n,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class": {
                label: {
                    "precision": self.precision[label],
                    "recall": self.recall[label],
                    "f1": self.f1[label],
                    "support": self.support[label],
                }
                for label in self.labels
            },
            "confusion_matrix": self.confusion,
        }


def classification_report(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]
) -> Report:
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    labels = list(labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return Report(
        labels=labels,
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        precision={lab: float(v) for lab, v in zip(labels, precision, strict=True)},
        recall={lab: float(v) for lab, v in zip(labels, recall, strict=True)},
        f1={lab: float(v) for lab, v in zip(labels, f1, strict=True)},
        support={lab: int(v) for lab, v in zip(labels, support, strict=True)},
        confusion=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        n=len(y_true),
    )


def confusion_figure(report: Report, title: str = "Confusion matrix (test split)") -> Any:
    """A matplotlib Figure of the confusion matrix, counts and row-normalised shading."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(report.confusion)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5, 4.2), dpi=120)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(report.labels)), report.labels)
    ax.set_yticks(range(len(report.labels)), report.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {report.accuracy:.3f} · macro-F1 {report.macro_f1:.3f}")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(
                j,
                i,
                f"{counts[i, j]}\n{rates[i, j]:.0%}",
                ha="center",
                va="center",
                color="white" if rates[i, j] > 0.5 else "black",
                fontsize=8,
            )
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
