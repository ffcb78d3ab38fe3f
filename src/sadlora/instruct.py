"""Instruction data for causal LMs: prompt/response pairs, tokenised with the prompt masked.

``instruct:files`` reads local CSV / JSON / parquet files with ``prompt`` and ``response``
columns (``task_options: {data_files: ..., prompt_field: ..., response_field: ...}``).
``instruct:templated`` builds instructions from the packaged labelled data (no hub needed):
Rotten Tomatoes sentiment -> ``answer: positive|negative`` and STS-B similarity ->
``answer: 0..5`` (the gold score rounded), see ``sadlora.instruct_templates``.
The labels of prompt and padding tokens are -100, so the task loss, the token-level KD and
the perplexity all cover response tokens only.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, DatasetDict

__all__ = ["load_instruction_task", "tokenize_instructions", "format_prompt", "INSTRUCTION_TASKS",
           "greedy_answers", "exact_match"]

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


def _load_templated(data_dir: Any = None, **options: Any) -> DatasetDict:
    from .instruct_templates import templated_instructions

    if data_dir is not None:
        raise ValueError("instruct:templated reads the packaged STS-B / Rotten Tomatoes data; "
                         f"data_dir={data_dir!r} is not used (remove it).")
    return templated_instructions(**options)


INSTRUCTION_TASKS = {"instruct:files": _load_files, "instruct:templated": _load_templated}


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


def greedy_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 8,
                   batch_size: int = 16, bf16: bool = False) -> list[str]:
    """Greedy continuations of ``prompts`` (formatted with ``format_prompt``), decoded without
    special tokens. Batches are left-padded, so every prompt ends where generation starts."""
    import torch

    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token = eos_token.")
    device, was_training = next(model.parameters()).device, model.training
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    model.eval()
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [format_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                 enabled=bf16):
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def exact_match(model, tokenizer, rows: Dataset | list[dict], **kwargs: Any) -> dict:
    """Fraction of rows whose greedy answer equals the response (after ``normalise_answer``).

    Returns ``{"exact_match", "count", "by_task": {task: exact match}, "examples": first 5
    (prompt tail, gold, generated)}``; ``by_task`` needs a ``task`` column.
    """
    from .instruct_templates import normalise_answer

    rows = list(rows)
    if not rows:
        raise ValueError("exact_match needs at least one row with prompt and response.")
    generated = greedy_answers(model, tokenizer, [r["prompt"] for r in rows], **kwargs)
    hits = [normalise_answer(g) == normalise_answer(r["response"])
            for g, r in zip(generated, rows)]
    by_task: dict[str, list[bool]] = {}
    for hit, row in zip(hits, rows):
        by_task.setdefault(row.get("task", "all"), []).append(hit)
    return {"exact_match": sum(hits) / len(hits), "count": len(hits),
            "by_task": {t: sum(h) / len(h) for t, h in sorted(by_task.items())},
            "examples": [{"prompt_tail": r["prompt"][-60:], "gold": r["response"],
                          "generated": g} for g, r in list(zip(generated, rows))[:5]]}
