"""Drift and live-quality statistics of one window of traffic against a reference (pure).

Every function takes plain numbers and returns ``None`` where the window holds nothing to
measure (an empty window is never a pass: the caller reports "insufficient data").

- predicted-label drift: Jensen-Shannon *distance*, base 2 (0..1), the square root of the
  divergence :func:`roost.rollout.analysis.js_divergence` computes for canary checks. Its
  usual threshold, 0.1, is Evidently's and NannyML's default, so the numbers compare.
- confidence shift: mean confidence of the window less the reference's (signed).
- text length: population stability index over the reference's length deciles,
  ``sum((a - e) * ln(a / e))`` with empty bins floored at ``PSI_FLOOR``; 0.1 is a small
  shift, 0.2 (the default threshold) a significant one.
- unseen-token rate: the share of word tokens not in the model's vocabulary.
- live accuracy and macro-F1 from feedback labels (macro over the classes seen in either
  the labels or the predictions, as scikit-learn's ``f1_score(average="macro")``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from roost.rollout.analysis import js_divergence

PSI_FLOOR = 1e-4


def js_distance(reference: Mapping[str, float], window: Mapping[str, float]) -> float | None:
    """JS distance (base 2) of two label count (or share) distributions; None if one is empty."""
    divergence = js_divergence(reference, window)
    return None if divergence is None else math.sqrt(divergence)


def confidence_shift(reference_mean: float, confidences: Sequence[float]) -> float | None:
    if not confidences:
        return None
    return sum(confidences) / len(confidences) - reference_mean


def quantile_edges(values: Sequence[float], bins: int = 10) -> list[float]:
    """Inner bin edges at the reference's quantiles (deduplicated: ties make fewer bins)."""
    if not values:
        return []
    ordered = sorted(values)
    edges = []
    for i in range(1, bins):
        position = i * (len(ordered) - 1) / bins
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        edges.append(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
    return sorted(set(edges))


def bin_shares(values: Sequence[float], edges: Sequence[float]) -> list[float]:
    """Share of ``values`` in each of the ``len(edges) + 1`` bins (right-closed: x <= edge)."""
    counts = [0] * (len(edges) + 1)
    for value in values:
        counts[_bin(value, edges)] += 1
    total = len(values)
    return [c / total for c in counts] if total else [0.0] * len(counts)


def _bin(value: float, edges: Sequence[float]) -> int:
    lo, hi = 0, len(edges)
    while lo < hi:  # the first edge >= value
        mid = (lo + hi) // 2
        if edges[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of two share vectors over the same bins."""
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, PSI_FLOOR), max(a, PSI_FLOOR)
        total += (a - e) * math.log(a / e)
    return total


def length_psi(
    edges: Sequence[float], reference_shares: Sequence[float], lengths: Sequence[float]
) -> float | None:
    if not lengths:
        return None
    return psi(reference_shares, bin_shares(lengths, edges))


def unseen_rate(vocabulary: set[str], token_lists: Iterable[Sequence[str]]) -> float | None:
    total = unseen = 0
    for tokens in token_lists:
        total += len(tokens)
        unseen += sum(1 for t in tokens if t not in vocabulary)
    return None if total == 0 else unseen / total


def accuracy(truth: Sequence[str], predicted: Sequence[str]) -> float | None:
    if not truth:
        return None
    return sum(t == p for t, p in zip(truth, predicted, strict=True)) / len(truth)


def macro_f1(truth: Sequence[str], predicted: Sequence[str]) -> float | None:
    if not truth:
        return None
    labels = sorted(set(truth) | set(predicted))
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for t, p in zip(truth, predicted, strict=True):
        if t == p:
            tp[t] += 1
        else:
            fp[p] += 1
            fn[t] += 1
    scores = []
    for label in labels:
        denominator = 2 * tp[label] + fp[label] + fn[label]
        scores.append(2 * tp[label] / denominator if denominator else 0.0)
    return sum(scores) / len(scores)
