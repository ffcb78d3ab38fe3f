"""The column layout every task loader returns: string text columns and a typed ``label``.

Builds such a split (:func:`_make_dataset`) and checks that a split has the columns a task
needs (:func:`_check_columns`).
"""

from __future__ import annotations

from collections.abc import Sequence

from datasets import Dataset, Features, Value


def _make_dataset(columns: dict[str, list], regression: bool) -> Dataset:
    """A Dataset of string columns and a typed ``label`` (built typed, so no cast pass)."""
    features = {
        name: Value("string") if name != "label" else Value("float32" if regression else "int64")
        for name in columns
    }
    return Dataset.from_dict(columns, features=Features(features))


def _check_columns(ds: Dataset, needed: Sequence[str], split: str) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"column(s) {missing} not found in split {split!r}; existing columns: "
            f"{ds.column_names}. Pass text_fields= / label_field= with these names"
        )
