"""Task metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest

from lorakit.train.metrics import (
    accuracy,
    compute_metrics,
    confusion_matrix,
    f1_binary,
    f1_macro,
    higher_is_better,
    matthews,
    pearson,
    spearman,
)

# labels / predictions: TP=3 (idx 0,1,2), FN=1 (idx 3), FP=2 (idx 4,5), TN=2 (idx 6,7)
LABELS = [1, 1, 1, 1, 0, 0, 0, 0]
PREDS = [1, 1, 1, 0, 1, 1, 0, 0]


def test_accuracy_and_binary_f1_by_hand():
    assert accuracy(PREDS, LABELS) == pytest.approx(5 / 8)
    # F1 = 2TP / (2TP + FP + FN) = 6 / (6 + 2 + 1)
    assert f1_binary(PREDS, LABELS) == pytest.approx(6 / 9)
    assert confusion_matrix(PREDS, LABELS).tolist() == [[2, 2], [1, 3]]


def test_matthews_binary_by_hand():
    tp, tn, fp, fn = 3, 2, 2, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews(PREDS, LABELS) == pytest.approx(expected)
    assert matthews(LABELS, LABELS) == pytest.approx(1.0)
    assert matthews([1 - y for y in LABELS], LABELS) == pytest.approx(-1.0)
    # A constant predictor has an undefined MCC; GLUE (and sklearn) report 0.
    assert matthews([1] * 8, LABELS) == 0.0


def test_matthews_multiclass_by_hand():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    # C = [[1,1,0],[0,2,0],[1,0,1]]: c=4, s=6, p=(2,3,1), t=(2,2,2)
    c, s, p, t = 4, 6, (2, 3, 1), (2, 2, 2)
    pt = sum(a * b for a, b in zip(p, t, strict=True))
    expected = (c * s - pt) / math.sqrt((s * s - sum(x * x for x in p)) * (s * s - sum(x * x for x in t)))
    assert matthews(preds, labels) == pytest.approx(expected)


def test_f1_macro_by_hand():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    # class 0: TP1 FP1 FN1 -> 0.5; class 1: TP2 FP1 FN0 -> 0.8; class 2: TP1 FP0 FN1 -> 2/3
    assert f1_macro(preds, labels) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_pearson_and_spearman_by_hand():
    x = [1.0, 2.0, 3.0, 4.0]
    y = [1.0, 3.0, 2.0, 5.0]
    mx, my = 2.5, 2.75
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    assert pearson(x, y) == pytest.approx(cov / (sx * sy))
    # ranks of y: 1, 3, 2, 4 -> d = 0, -1, 1, 0; rho = 1 - 6 Σd² / (n(n²-1)) = 1 - 12/60
    assert spearman(x, y) == pytest.approx(0.8)
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0


def test_compute_metrics_and_errors():
    assert compute_metrics(["f1", "accuracy"], PREDS, LABELS) == {
        "f1": pytest.approx(6 / 9),
        "accuracy": 0.625,
    }
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["bleu"], PREDS, LABELS)
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])


@pytest.mark.parametrize(
    ("metric", "higher"),
    [("loss", False), ("train_loss", False), ("eval_loss", False), ("perplexity", False),
     ("accuracy", True), ("f1_macro", True), ("mcc", True), ("spearman", True), ("lossy_score", True)],
)  # fmt: skip
def test_one_rule_says_which_direction_is_better(metric, higher):
    assert higher_is_better(metric) is higher
