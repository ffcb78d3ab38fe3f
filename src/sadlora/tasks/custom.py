"""Custom tasks from a user's local CSV / TSV / JSON / parquet files (:func:`load_custom_task`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from .columns import _check_columns, _make_dataset
from .specs import TaskSpec

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
