"""Task metrics: accuracy, F1, Matthews correlation, Pearson and Spearman correlation.

Definitions (as used by GLUE, Wang et al. 2019):

- accuracy = mean(ŷ = y).
- F1 (binary, positive class 1) = 2·TP / (2·TP + FP + FN); ``f1_macro`` averages the per-class F1.
- Matthews correlation (Matthews 1975; multi-class form of Gorodkin 2004) from the confusion matrix C:
  MCC = (c·s − Σ_k p_k t_k) / sqrt((s² − Σ_k p_k²)(s² − Σ_k t_k²)), with c = trace(C), s = ΣC,
  p_k = predicted count of class k, t_k = true count; defined as 0 when a denominator factor is 0.
- Pearson r and Spearman ρ: :func:`scipy.stats.pearsonr` / :func:`scipy.stats.spearmanr`
  (0 when an input is constant, where they are undefined).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

__all__ = [
    "LOWER_IS_BETTER",
    "METRICS",
    "accuracy",
    "compute_metrics",
    "f1_binary",
    "f1_macro",
    "higher_is_better",
    "matthews",
    "pearson",
    "spearman",
]


#: metrics for which lower is better; so is any name ending in ``_<one of these>`` (``eval_loss``)
LOWER_IS_BETTER = ("loss", "perplexity")


def higher_is_better(metric: str) -> bool:
    """Whether a larger ``metric`` is better: False for losses and perplexities (``train_loss`` too), True
    for accuracy, F1, MCC and correlations. Used by the trainer (best checkpoint), sweeps and curves."""
    return not any(metric == name or metric.endswith(f"_{name}") for name in LOWER_IS_BETTER)


def _as_int(values: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _check(preds: np.ndarray, labels: np.ndarray) -> None:
    if preds.shape != labels.shape:
        raise ValueError(f"metrics: predictions and labels differ in length ({preds.size} vs {labels.size})")
    if preds.size == 0:
        raise ValueError("metrics: no examples to score")


def confusion_matrix(
    preds: Sequence[int], labels: Sequence[int], num_classes: int | None = None
) -> np.ndarray:
    """``C[i, j]`` = number of examples with true class ``i`` predicted as ``j``."""
    p, y = _as_int(preds), _as_int(labels)
    _check(p, y)
    k = int(num_classes or max(p.max(), y.max()) + 1)
    return np.bincount(y * k + p, minlength=k * k).reshape(k, k)


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    p, y = _as_int(preds), _as_int(labels)
    _check(p, y)
    return float(np.mean(p == y))


def _f1_from_counts(tp: float, fp: float, fn: float) -> float:
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 0.0


def f1_binary(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class: 2·TP / (2·TP + FP + FN)."""
    p, y = _as_int(preds), _as_int(labels)
    _check(p, y)
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    return _f1_from_counts(tp, fp, fn)


def f1_macro(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    C = confusion_matrix(preds, labels).astype(np.float64)
    present = (C.sum(0) + C.sum(1)) > 0
    tp = np.diag(C)
    per_class = [
        _f1_from_counts(tp[k], C[:, k].sum() - tp[k], C[k, :].sum() - tp[k]) for k in np.flatnonzero(present)
    ]
    return float(np.mean(per_class))


def matthews(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient (multi-class R_K statistic; binary MCC for two classes)."""
    C = confusion_matrix(preds, labels).astype(np.float64)
    s, c = C.sum(), np.trace(C)
    p, t = C.sum(axis=0), C.sum(axis=1)
    denominator = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - p @ t) / denominator) if denominator else 0.0


def _floats(preds: Sequence[float], labels: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(preds, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    _check(p, y)
    return p, y


def pearson(preds: Sequence[float], labels: Sequence[float]) -> float:
    p, y = _floats(preds, labels)
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(stats.pearsonr(p, y)[0])


def spearman(preds: Sequence[float], labels: Sequence[float]) -> float:
    p, y = _floats(preds, labels)
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(stats.spearmanr(p, y)[0])


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "f1_macro": f1_macro,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(names: Sequence[str], preds: Sequence, labels: Sequence) -> dict[str, float]:
    """``{name: metric(preds, labels)}`` for each name in ``names`` (keys of :data:`METRICS`)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown metric(s) {unknown}; expected names from {sorted(METRICS)}")
    return {name: METRICS[name](preds, labels) for name in names}
