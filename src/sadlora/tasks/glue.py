"""GLUE tasks from a folder of the official TSV files or from the hub (``nyu-mll/glue``)."""

from __future__ import annotations

import csv
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Value

from .columns import _make_dataset
from .specs import GLUE_TASKS, HIDDEN_LABEL, TaskSpec

logger = logging.getLogger(__name__)


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


def _load_glue(name: str, data_dir: Any = None, **kwargs: Any) -> DatasetDict:
    # Offline users give the official TSV folder; with a hub the canonical dataset is used.
    if data_dir is None:
        return load_glue_hub(name, **kwargs)
    if kwargs:
        raise ValueError(f"options {sorted(kwargs)} do not apply to GLUE TSV files ({name})")
    return load_glue_tsv(name, data_dir)
