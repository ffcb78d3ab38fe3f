"""Task specifications (:class:`TaskSpec`) and the registry of named tasks.

The registry holds the GLUE tasks and the embedded real-data tasks with their aliases;
:func:`get_task_spec` resolves a name, :func:`primary_metric` names a task's selection metric.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .metrics import METRICS

HIDDEN_LABEL = -1


@dataclass(frozen=True)
class TaskSpec:
    """What a model and a trainer need to know about a task.

    Attributes:
        name: registry name (``sst2``, ``embedded:stsb``, ``custom``, ...).
        text_fields: one or two text columns (a sentence or a sentence pair).
        num_labels: classes, or 1 for regression.
        metrics: names of :data:`METRICS` reported by :func:`compute_metrics`.
        primary_metric: the metric used for model selection and tables.
        label_field: the label column in the loaded DatasetDict (always ``label``).
        label_names: class names in label order (None for regression).
        splits: our split name -> the hub's split name (used by the hub loader).
        hub_path / hub_config: ``datasets.load_dataset`` arguments for users with a hub.
    """

    name: str
    text_fields: tuple[str, ...]
    num_labels: int
    metrics: tuple[str, ...]
    primary_metric: str
    label_field: str = "label"
    label_names: tuple[str, ...] | None = None
    splits: Mapping[str, str] = field(
        default_factory=lambda: {"train": "train", "validation": "validation", "test": "test"},
        hash=False,  # a dict is unhashable; specs stay usable as dict keys
    )
    hub_path: str | None = None
    hub_config: str | None = None

    def __post_init__(self) -> None:
        if len(self.text_fields) not in (1, 2):
            raise ValueError(f"task {self.name!r}: 1 or 2 text fields, got {self.text_fields}")
        if self.num_labels < 1:
            raise ValueError(f"task {self.name!r}: num_labels must be >= 1, got {self.num_labels}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or self.primary_metric not in self.metrics:
            raise ValueError(
                f"task {self.name!r}: metrics {self.metrics} / primary {self.primary_metric!r} "
                f"must come from {sorted(METRICS)} and the primary must be among the metrics"
            )

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def problem_type(self) -> str:
        """The ``problem_type`` of a transformers sequence-classification config."""
        return "regression" if self.is_regression else "single_label_classification"


def _glue(
    name: str,
    fields: tuple[str, ...],
    num_labels: int,
    metrics: tuple[str, ...],
    primary: str,
    label_names: tuple[str, ...] | None,
    **splits: str,
) -> TaskSpec:
    split_map = {"train": "train", "validation": "validation", "test": "test", **splits}
    return TaskSpec(
        name,
        fields,
        num_labels,
        metrics,
        primary,
        label_names=label_names,
        splits=split_map,
        hub_path="nyu-mll/glue",
        hub_config=name,
    )


_NLI2 = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        _glue("sst2", ("sentence",), 2, ("accuracy",), "accuracy", ("negative", "positive")),
        _glue(
            "cola",
            ("sentence",),
            2,
            ("matthews_correlation", "accuracy"),
            "matthews_correlation",
            ("unacceptable", "acceptable"),
        ),
        _glue(
            "mrpc",
            ("sentence1", "sentence2"),
            2,
            ("f1", "accuracy"),
            "f1",
            ("not_equivalent", "equivalent"),
        ),
        _glue("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearman"), "spearman", None),
        _glue("qnli", ("question", "sentence"), 2, ("accuracy",), "accuracy", _NLI2),
        _glue("rte", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy", _NLI2),
        _glue(
            "mnli",
            ("premise", "hypothesis"),
            3,
            ("accuracy",),
            "accuracy",
            ("entailment", "neutral", "contradiction"),
            validation="validation_matched",
            test="test_matched",
        ),
        _glue(
            "qqp",
            ("question1", "question2"),
            2,
            ("f1", "accuracy"),
            "f1",
            ("not_duplicate", "duplicate"),
        ),
    )
}

EMBEDDED_TASKS: dict[str, TaskSpec] = {
    "embedded:stsb": TaskSpec(
        "embedded:stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearman"), "spearman"
    ),
    "embedded:rotten_tomatoes": TaskSpec(
        "embedded:rotten_tomatoes",
        ("text",),
        2,
        ("accuracy", "f1"),
        "accuracy",
        label_names=("rotten", "fresh"),
    ),
}
ALIASES = {"rotten_tomatoes": "embedded:rotten_tomatoes"}
TASKS: dict[str, TaskSpec] = {**GLUE_TASKS, **EMBEDDED_TASKS}


def get_task_spec(task: str | TaskSpec) -> TaskSpec:
    """The registered spec of a task name (a spec is returned unchanged)."""
    if isinstance(task, TaskSpec):
        return task
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise ValueError(
            f"unknown task {task!r}; valid names: {sorted(TASKS) + sorted(ALIASES)} "
            "(or 'custom' with load_custom_task arguments)"
        )
    return TASKS[name]


def primary_metric(task: str | TaskSpec) -> str:
    """Name of the metric used for model selection and reporting."""
    return get_task_spec(task).primary_metric
