"""Metric functions ``(predictions, gold) -> float`` and the :data:`METRICS` table.

Metrics are in [0, 1] (or [-1, 1] for correlations); correlations of a constant prediction
and an MCC with an empty row or column of the confusion matrix are reported as 0.0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np

logger = logging.getLogger(__name__)


def _accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(pred == gold))


def _f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """Binary F1 of class 1 (as GLUE reports for MRPC / QQP); 0.0 when class 1 never occurs."""
    tp = float(np.sum((pred == 1) & (gold == 1)))
    fp = float(np.sum((pred == 1) & (gold != 1)))
    fn = float(np.sum((pred != 1) & (gold == 1)))
    return 0.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation (multiclass form from the confusion matrix; binary for CoLA)."""
    classes, inverse = np.unique(np.concatenate([gold, pred]), return_inverse=True)
    k, n = len(classes), len(gold)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (inverse[:n], inverse[n:]), 1.0)
    true_sum, pred_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    total, correct = confusion.sum(), np.trace(confusion)
    cov_tp = correct * total - true_sum @ pred_sum
    cov_pp = total**2 - pred_sum @ pred_sum
    cov_tt = total**2 - true_sum @ true_sum
    # A constant prediction (or constant gold) makes MCC undefined; report "no correlation".
    return 0.0 if cov_pp * cov_tt == 0 else float(cov_tp / math.sqrt(cov_pp * cov_tt))


def _correlation(kind: str) -> Callable[[np.ndarray, np.ndarray], float]:
    def corr(pred: np.ndarray, gold: np.ndarray) -> float:
        from scipy import stats

        if np.ptp(pred) == 0 or np.ptp(gold) == 0:
            logger.warning("%s correlation of a constant vector is undefined; reporting 0.0", kind)
            return 0.0
        # spearmanr ranks ties by their average rank, as the STS-B evaluation does.
        fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
        return float(fn(pred.astype(np.float64), gold.astype(np.float64))[0])

    corr.__name__ = kind
    return corr


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "matthews_correlation": _matthews,
    "pearson": _correlation("pearson"),
    "spearman": _correlation("spearman"),
}
