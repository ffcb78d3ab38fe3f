"""Instruction data for causal LMs: prompt/response pairs, tokenised with the prompt masked.

``instruct:files`` reads local CSV / JSON / parquet files with ``prompt`` and ``response``
columns (``task_options: {data_files: ..., prompt_field: ..., response_field: ...}``).
The labels of prompt and padding tokens are -100, so the task loss, the token-level KD and
the perplexity all cover response tokens only.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, DatasetDict

__all__ = ["load_instruction_task", "tokenize_instructions", "format_prompt", "INSTRUCTION_TASKS"]

# The fallback template for tokenizers without a chat template.
PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def _load_files(data_dir: Any = None, *, data_files: Any, prompt_field: str = "prompt",
                response_field: str = "response", validation_size: float = 0.1,
                seed: int = 0) -> DatasetDict:
    import datasets

    files = data_files if isinstance(data_files, dict) else {"train": data_files}
    first = str(next(iter(files.values())))
    extension = first.rsplit(".", 1)[-1].lower()
    loader = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json",
              "parquet": "parquet"}.get(extension)
    if loader is None:
        raise ValueError(f"instruction file {first!r}: use .csv, .json, .jsonl or .parquet.")
    data = datasets.load_dataset(loader, data_files=files)
    for split, ds in data.items():
        missing = [c for c in (prompt_field, response_field) if c not in ds.column_names]
        if missing:
            raise ValueError(f"instruction split {split!r} lacks column(s) {missing}; it has "
                             f"{ds.column_names}. Set task_options.prompt_field/response_field.")
    data = data.rename_columns({prompt_field: "prompt", response_field: "response"}) \
        if (prompt_field, response_field) != ("prompt", "response") else data
    if "validation" not in data:
        parts = data["train"].train_test_split(test_size=validation_size, seed=seed)
        data = DatasetDict({"train": parts["train"], "validation": parts["test"],
                            **{k: v for k, v in data.items() if k != "train"}})
    return data


INSTRUCTION_TASKS = {"instruct:files": _load_files}


def load_instruction_task(name: str, data_dir: Any = None, **options: Any) -> DatasetDict:
    """A DatasetDict with ``prompt`` and ``response`` columns."""
    if name not in INSTRUCTION_TASKS:
        raise ValueError(f"unknown instruction task {name!r}; valid: {sorted(INSTRUCTION_TASKS)}.")
    return INSTRUCTION_TASKS[name](data_dir, **options)


def format_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it: its chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    return PROMPT_TEMPLATE.format(prompt=prompt)


def tokenize_instructions(dataset: Dataset, tokenizer, max_length: int = 256) -> Dataset:
    """input_ids / attention_mask / labels (-100 on prompt tokens) / idx, unpadded."""
    eos = tokenizer.eos_token or ""

    def encode(row: dict, index: int) -> dict:
        prompt_ids = tokenizer(format_prompt(tokenizer, row["prompt"]),
                               add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(row["response"] + eos, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + response_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
                "idx": index}

    return dataset.map(encode, with_indices=True, remove_columns=dataset.column_names,
                       desc="tokenize instructions")
