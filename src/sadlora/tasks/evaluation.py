"""Scoring model outputs: :func:`compute_metrics` and the Trainer callable :func:`metrics_fn`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .metrics import METRICS
from .specs import HIDDEN_LABEL, TaskSpec, get_task_spec


def _as_predictions(spec: TaskSpec, predictions: Any) -> np.ndarray:
    """Logits (N, C) -> class ids; regression outputs (N,) or (N, 1) -> floats."""
    pred = np.asarray(predictions)
    if spec.is_regression:
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        if pred.ndim != 1:
            raise ValueError(
                f"task {spec.name!r} is regression: expected (N,) or (N, 1) "
                f"predictions, got shape {pred.shape}"
            )
        return pred.astype(np.float64)
    if pred.ndim == 2:
        return pred.argmax(axis=1)
    if pred.ndim == 1 and np.issubdtype(pred.dtype, np.integer):
        return pred
    raise ValueError(
        f"task {spec.name!r}: expected logits (N, {spec.num_labels}) or class ids "
        f"(N,), got an array of shape {pred.shape} and dtype {pred.dtype}"
    )


def compute_metrics(task: str | TaskSpec, predictions: Any, labels: Any) -> dict[str, float]:
    """Every metric of ``task`` for model outputs against gold labels.

    Args:
        task: a task name or spec.
        predictions: logits (N, C) or class ids (N,) for classification; (N,) or (N, 1)
            outputs for regression.
        labels: gold labels (N,).
    """
    spec = get_task_spec(task)
    pred = _as_predictions(spec, predictions)
    gold = np.asarray(labels)
    gold = gold.astype(np.float64) if spec.is_regression else gold.astype(np.int64)
    if pred.shape[0] != gold.shape[0]:
        raise ValueError(f"{pred.shape[0]} predictions but {gold.shape[0]} labels")
    if gold.shape[0] == 0:
        raise ValueError(f"task {spec.name!r}: no examples to evaluate (empty split)")
    if not spec.is_regression and np.any(gold == HIDDEN_LABEL):
        raise ValueError(
            f"task {spec.name!r}: labels contain {HIDDEN_LABEL} (hidden labels, "
            "e.g. a GLUE test split); evaluate on a labelled split"
        )
    return {name: METRICS[name](pred, gold) for name in spec.metrics}


def metrics_fn(task: str | TaskSpec) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` callable for ``transformers.Trainer`` (takes an EvalPrediction)."""
    spec = get_task_spec(task)

    def fn(eval_pred: Any) -> dict[str, float]:
        preds, labels = eval_pred[0], eval_pred[1]
        if isinstance(preds, tuple):  # models that return extra outputs put logits first
            preds = preds[0]
        return compute_metrics(spec, preds, labels)

    return fn
