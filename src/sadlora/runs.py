"""Shared pieces of the command pipelines: run configs, model and data loading, evaluation.

Model names: a folder, a hub name (for users with a hub), or ``asset:NAME`` for a packaged
real model (``asset:minilm``, ``asset:mpnet``, ``asset:smollm2``; see ``sadlora.assets``).
Tasks: any name of ``sadlora.tasks.task_names()`` (classification / regression), or
``instruct:...`` for causal-LM instruction data (``sadlora.instruct``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
)

from .tasks import TaskSpec, compute_metrics, load_task, tokenize_task

__all__ = ["DataConfig", "TrainConfig", "resolve_model_path", "load_model", "PreparedData",
           "prepare_data", "evaluate_model", "write_json", "write_text_atomic",
           "check_finite_weights", "is_main_process"]

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Which task and how much of it."""

    task: str = "embedded:stsb"  # task name (see sadlora.tasks.task_names()) or instruct:...
    data_dir: str | None = None  # GLUE TSV folder (offline GLUE), or replacement data folder
    task_options: dict = field(default_factory=dict)  # extra loader arguments (custom tasks)
    max_length: int = 128  # tokens per example (truncation); batches pad dynamically
    train_examples: int | None = None  # first N training examples (after a seeded shuffle)
    eval_examples: int | None = None  # first N evaluation examples of each reported split
    eval_splits: list = field(default_factory=lambda: ["validation"])  # splits to report
    data_seed: int = 0  # shuffle / split seed of the data (independent of the model seed)


@dataclass
class TrainConfig(DataConfig):
    """Optimisation settings shared by teacher fine-tuning and distillation."""

    output_dir: str = "runs/run"  # where everything of this run is written
    seed: int = 0  # model seed (head init, dropout, data order)
    learning_rate: float = 5e-4
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    batch_size: int = 32  # per device
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0  # SVD/eigh gradients spike near tied singular values
    bf16: bool = False  # bf16 autocast (also on CPU, where it is 2.5-3.5x faster)
    logging_steps: int = 10
    save_steps: int = 0  # 0: no intermediate checkpoints
    resume: bool = False  # resume from the last checkpoint in output_dir
    report_to: str = "none"  # "tensorboard", "wandb", ...
    progress: bool = True


def resolve_model_path(name: str) -> str:
    """A folder for ``asset:NAME``; other names are returned unchanged."""
    if name.startswith("asset:"):
        from .assets import asset_path

        return str(asset_path(name.removeprefix("asset:")))
    return name


def is_causal_lm(path: str) -> bool:
    config = AutoConfig.from_pretrained(path)
    return any(a.endswith("ForCausalLM") for a in (config.architectures or []))


def load_model(name: str, spec: TaskSpec | None, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a classification/regression ``spec``, or a causal LM (spec None).

    A classification head missing from the checkpoint is created (seeded by the caller).
    """
    path = resolve_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if spec is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=spec.num_labels, problem_type=spec.problem_type, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@dataclass
class PreparedData:
    """A task tokenised for one tokenizer, with its collator."""

    spec: TaskSpec | None  # None for causal-LM instruction data
    splits: dict  # split name -> tokenised datasets.Dataset (columns incl. labels and idx)
    collate: Any

    @property
    def primary_metric(self) -> str:
        """The metric tables report (response perplexity for causal-LM data)."""
        return "response_perplexity" if self.spec is None else self.spec.primary_metric

    @property
    def problem_type(self) -> str:
        return "causal_lm" if self.spec is None else self.spec.problem_type


def _raw_task(config: DataConfig):
    if config.task.startswith("instruct:"):
        from .instruct import load_instruction_task

        return None, load_instruction_task(config.task, config.data_dir, **config.task_options)
    options = dict(config.task_options)
    if config.task in ("embedded:rotten_tomatoes", "rotten_tomatoes"):
        options.setdefault("seed", config.data_seed)
    return load_task(config.task, data_dir=config.data_dir, **options)


def _limit(dataset, count: int | None, seed: int | None):
    if count is None or count >= len(dataset):
        return dataset
    if seed is not None:
        dataset = dataset.shuffle(seed=seed)
    return dataset.select(range(count))


def load_raw_splits(config: DataConfig):
    """(spec, {split: raw dataset}) with the train / eval limits applied, before tokenising."""
    spec, data = _raw_task(config)
    missing = [s for s in ["train", *config.eval_splits] if s not in data]
    if missing:
        raise ValueError(f"task {config.task!r} has no split(s) {missing}; it has {list(data)}.")
    splits = {"train": _limit(data["train"], config.train_examples, config.data_seed)}
    for split in config.eval_splits:
        splits[split] = _limit(data[split], config.eval_examples, None)
    return spec, splits


def prepare_data(config: DataConfig, tokenizer, raw=None) -> PreparedData:
    """Tokenise the task for ``tokenizer`` (no padding: batches pad to their longest)."""
    spec, splits = raw if raw is not None else load_raw_splits(config)
    if spec is None:
        from .instruct import tokenize_instructions

        tokenised = {name: tokenize_instructions(ds, tokenizer, config.max_length)
                     for name, ds in splits.items()}
        collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    else:
        from datasets import DatasetDict

        tokenised = dict(tokenize_task(DatasetDict(splits), tokenizer, spec, config.max_length))
        collate = DataCollatorWithPadding(tokenizer)
    return PreparedData(spec, tokenised, collate)


@torch.no_grad()
def evaluate_model(model, data: PreparedData, split: str, *, batch_size: int = 64,
                   bf16: bool = False, progress: bool = False) -> dict[str, float]:
    """Task metrics of ``model`` on one tokenised split (perplexity of response tokens for
    causal LMs, else the task's metrics)."""
    from tqdm.auto import tqdm

    dataset = data.splits[split]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs, golds, nll, tokens = [], [], 0.0, 0
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"evaluate {split}",
                      disable=not progress):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = data.collate(rows)
        batch.pop("idx", None)
        labels = batch.pop("labels").to(device)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(**batch).logits.float()
        if data.spec is None:
            shifted, targets = logits[:, :-1], labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                ignore_index=-100, reduction="sum")
            nll += float(losses)
            tokens += int((targets != -100).sum())
        else:
            outputs.append(logits.cpu())
            golds.append(labels.cpu())
    model.train(was_training)
    if data.spec is None:
        return {"response_nll": nll / max(tokens, 1),
                "response_perplexity": math.exp(nll / max(tokens, 1)), "tokens": tokens}
    return compute_metrics(data.spec, torch.cat(outputs).numpy(), torch.cat(golds).numpy())


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary name, then rename it over ``path``: readers see the old
    file or the new one, never half of one; a failed write leaves no temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write JSON atomically (temporary name, then rename): never half-written."""
    return write_text_atomic(path, json.dumps(payload, indent=2, default=str))


def check_finite_weights(model: torch.nn.Module, role: str) -> None:
    """Raise ValueError naming the first parameter of ``model`` holding NaN or Inf."""
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter.detach()).all():
            raise ValueError(f"the {role} has NaN or Inf values in parameter {name!r}: the "
                             f"checkpoint is damaged or diverged; use a healthy checkpoint.")
