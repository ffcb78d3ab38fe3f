"""Tokenising a task's splits for training and evaluation (:func:`tokenize_task`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import DatasetDict

from .columns import _check_columns
from .specs import TaskSpec, get_task_spec


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
