"""The pipelines behind ``sadlora prepare-teacher | extract | distill | evaluate``.

    prepare-teacher   full fine-tune of a model on a task: the KD teacher (any model) and the
                      spectral teacher (the student's architecture)
    extract           per-layer spectral targets of the spectral teacher's update
    distill           LoRA student trained with the method's loss (DESIGN.md §2)
    evaluate          task metrics of a saved student
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, Trainer, TrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .calibration import resolve_target_modules
from .losses import AlignmentTargets, SADLoss
from .methods import resolve_method
from .runs import (
    DataConfig,
    TrainConfig,
    check_finite_weights,
    evaluate_model,
    is_main_process,
    load_model,
    load_raw_splits,
    prepare_data,
    resolve_model_path,
    write_json,
)
from .student import (
    adapted_module_names,
    build_student,
    init_needs_targets,
    load_student,
    lora_factors,
    save_student,
)
from .targets import build_targets, check_fingerprint, load_targets, save_targets
from .teacher_cache import TeacherLogitsCache
from .trainer import DistillationTrainer, SpectralMonitorCallback, layer_report

__all__ = ["TeacherConfig", "ExtractConfig", "DistillConfig", "EvaluateConfig",
           "prepare_teacher", "extract", "distill", "evaluate"]

logger = logging.getLogger(__name__)


def _training_arguments(config: TrainConfig, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=config.output_dir, seed=config.seed, learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        weight_decay=config.weight_decay, warmup_steps=config.warmup_ratio,
        max_grad_norm=config.max_grad_norm, bf16=config.bf16,
        logging_steps=config.logging_steps, report_to=config.report_to,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500, disable_tqdm=not config.progress,
        eval_strategy="no", label_names=["labels"],
        # transformers refuses bf16 without an accelerator unless told the CPU is meant, and
        # only sets up DDP (gloo) for a multi-process CPU run (torchrun) when told so too.
        use_cpu=not torch.cuda.is_available() and (
            config.bf16 or int(os.environ.get("WORLD_SIZE", "1")) > 1),
    )
    values.update(overrides)
    return TrainingArguments(**values)


def _checkpoint(config: TrainConfig) -> str | None:
    """The newest *complete* checkpoint-N of output_dir when resuming, else None.

    The Trainer writes trainer_state.json last, so a run killed while saving leaves a folder
    without a readable one: it is skipped (with a warning) for the previous checkpoint.
    """
    if not config.resume or not Path(config.output_dir).is_dir():
        return None
    folders = sorted((p for p in Path(config.output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                      if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()),
                     key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True)
    for folder in folders:
        try:
            json.loads((folder / TRAINER_STATE_NAME).read_text())
        except (OSError, ValueError):
            logger.warning("skipping incomplete checkpoint %s (no readable %s)", folder,
                           TRAINER_STATE_NAME)
            continue
        logger.info("resuming from %s", folder)
        return str(folder)
    return None


def _evaluate_splits(model, data, config: TrainConfig) -> dict:
    return {split: evaluate_model(model, data, split, batch_size=config.eval_batch_size,
                                  bf16=config.bf16, progress=config.progress)
            for split in config.eval_splits}


# ---------------------------------------------------------------------------------------------
# prepare-teacher
# ---------------------------------------------------------------------------------------------


@dataclass
class TeacherConfig(TrainConfig):
    """Full fine-tune of ``model`` on the task (the model's own loss)."""

    model: str = "asset:mpnet"  # folder, hub name or asset:NAME
    learning_rate: float = 3e-5


def prepare_teacher(config: TeacherConfig) -> dict:
    """Fine-tune all weights; save model + tokenizer + metrics.json to output_dir."""
    set_seed(config.seed)
    started = time.time()
    raw = load_raw_splits(config)
    model, tokenizer = load_model(config.model, raw[0])
    data = prepare_data(config, tokenizer, raw)
    train = data.splits["train"].remove_columns("idx")
    trainer = Trainer(model=model, args=_training_arguments(config), train_dataset=train,
                      data_collator=data.collate)
    trainer.train(resume_from_checkpoint=_checkpoint(config))
    metrics = _evaluate_splits(model, data, config)
    result = {"model": config.model, "task": config.task, "metrics": metrics,
              "primary_metric": data.primary_metric,
              "seconds": round(time.time() - started, 1), "config": asdict(config)}
    if is_main_process():
        model.save_pretrained(config.output_dir)
        tokenizer.save_pretrained(config.output_dir)
        write_json(Path(config.output_dir) / "metrics.json", result)
    result["summary"] = {"task": config.task, "model": config.model, **metrics}
    return result


# ---------------------------------------------------------------------------------------------
# extract
# ---------------------------------------------------------------------------------------------


@dataclass
class ExtractConfig(DataConfig):
    """Spectral targets of (spectral_teacher - base_model), calibrated on the base model."""

    spectral_teacher: str = "runs/spectral_teacher"  # the student architecture, fine-tuned
    base_model: str = "asset:minilm"  # the pretrained weights W0 of the student
    target_modules: list = field(default_factory=lambda: ["query", "value"])
    output_dir: str = "runs/targets"
    max_rank: int = 64  # directions stored per layer (k)
    rank: int | None = 8  # fixed rank per layer, or None to use energy_threshold
    energy_threshold: float | None = None  # keep this fraction of tr K (Theorem 2)
    total_budget: int | None = None  # total rank over layers (greedy, Theorem 2)
    calibration_examples: int = 512  # training examples streamed through the base model
    calibration_batch_size: int = 32
    shrinkage: str | None = None  # None, ledoit_wolf or oas
    keep_sigma: bool = True  # needed by the coefficient loss and the exact decomposition
    keep_delta_w: bool = True  # needed by spectral_full init and the spectral analysis
    use_gram: bool = False  # accumulate K instead of Sigma (d_out^2 memory)
    data_weighted: bool = True  # False: Sigma = I, the plain SVD of dW (ablation)
    progress: bool = True


def extract(config: ExtractConfig) -> dict:
    """Build and save the targets; returns a per-layer summary."""
    started = time.time()
    spec, splits = load_raw_splits(config)
    base, tokenizer = load_model(config.base_model, spec)
    teacher, _ = load_model(config.spectral_teacher, spec)
    calibration_rows = _first(splits["train"], config.calibration_examples)
    data = prepare_data(config, tokenizer, (spec, {"train": calibration_rows}))
    rows = data.splits["train"].remove_columns([c for c in ("labels", "idx")
                                                if c in data.splits["train"].column_names])
    loader = torch.utils.data.DataLoader(rows, batch_size=config.calibration_batch_size,
                                         collate_fn=data.collate)
    targets = build_targets(
        teacher, base, loader, config.target_modules, max_rank=config.max_rank, rank=config.rank,
        energy_threshold=config.energy_threshold, total_budget=config.total_budget,
        keep_sigma=config.keep_sigma, keep_delta_w=config.keep_delta_w,
        shrinkage=config.shrinkage, use_gram=config.use_gram, progress=config.progress,
        data_weighted=config.data_weighted)
    if is_main_process():
        save_targets(targets, config.output_dir)
    layers = {name: {"rank": t.rank, "gap": t.gap,
                     "energy_top_rank": float(t.singular_values[: t.rank].square().sum()
                                              / t.total_energy)}
              for name, t in targets.layers.items()}
    result = {"output_dir": config.output_dir, "layers": layers,
              "seconds": round(time.time() - started, 1)}
    result["summary"] = {"layers": len(layers), "output_dir": config.output_dir,
                         "seconds": result["seconds"]}
    return result


def _first(dataset, count: int):
    return dataset.select(range(min(count, len(dataset))))


# ---------------------------------------------------------------------------------------------
# distill
# ---------------------------------------------------------------------------------------------


@dataclass
class DistillConfig(TrainConfig):
    """LoRA distillation of ``teacher`` into ``student_model`` with one method of DESIGN §2."""

    student_model: str = "asset:minilm"  # pretrained base of the student (W0)
    teacher: str | None = "runs/kd_teacher"  # KD teacher (logits); None only for method=lora
    # folder from `sadlora extract`: required by the spectral methods; given to the others,
    # only their angles to it are reported (so it is never loaded implicitly)
    targets: str | None = None
    method: str = "sad_lora_align"  # see sadlora.methods.METHODS (seed names accepted)
    init: str | None = None  # override the method's LoRA init (ablations): spectral, gaussian, ...
    lora_rank: int = 8  # r
    lora_alpha: float | None = None  # None: = r, so the LoRA scaling s = 1
    # true: each layer's LoRA rank is its target's rank (the r*(eps) of `sadlora extract
    # energy_threshold=...`); needs targets. The scaling stays s = lora_alpha / lora_rank (1 by
    # default) for every layer; lora_rank is otherwise unused.
    rank_from_targets: bool = False
    lora_dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["query", "value"])
    alpha_align: float = 1.0  # weight of L_align (methods that align)
    beta_coeff: float = 0.0  # weight of L_coeff (sad_lora, sad_lora_coeff need > 0)
    kd_temperature: float = 4.0
    # KL to the teacher's k most likely tokens only (renormalised): sparse KD for large vocabularies
    kd_top_k: int | None = None
    align_kind: str = "projection"  # projection (the seed's) or energy (basis-invariant)
    schedule: str = "adaptive"  # adaptive or fixed
    coeff_warmup_steps: int = 0  # beta_t = 0 for this many optimizer steps
    task_weight: float = 1.0  # hard-label task loss weight
    kd_weight: float = 1.0
    teacher_cache_dir: str | None = None  # default: $SADLORA_CACHE/teacher_logits
    teacher_bf16: bool = True  # bf16 autocast for the teacher's forward
    monitor_every: int = 50  # alignment.jsonl every N optimizer steps (0: off)


def _loss_weights(config: DistillConfig) -> tuple[float, float, float]:
    name, method = resolve_method(config.method)
    if method.use_coeff and config.beta_coeff <= 0:
        raise ValueError(f"method {name!r} uses the coefficient loss: set beta_coeff > 0 "
                         f"(got {config.beta_coeff}), or use sad_lora_align.")
    alpha = config.alpha_align if method.use_align else 0.0
    beta = config.beta_coeff if method.use_coeff else 0.0
    kd_weight = config.kd_weight if method.kd else 0.0
    return alpha, beta, kd_weight


def _cache_dir(config: DistillConfig) -> Path:
    if config.teacher_cache_dir:
        return Path(config.teacher_cache_dir)
    root = os.environ.get("SADLORA_CACHE", str(Path.home() / ".cache" / "sadlora"))
    return Path(root) / "teacher_logits"


def _check_teacher_fits(config: DistillConfig, spec, student) -> None:
    """A KD teacher must score the task's labels (classification) or the student's vocabulary
    (causal LM, where it reads the student's token ids): reject a mismatch before any work."""
    teacher_config = AutoConfig.from_pretrained(resolve_model_path(config.teacher))
    heads = [a for a in teacher_config.architectures or [] if a.endswith("ForSequenceClassification")]
    if spec is not None and heads and teacher_config.num_labels != spec.num_labels:
        raise ValueError(
            f"the KD teacher {config.teacher!r} has {teacher_config.num_labels} labels but task "
            f"{config.task!r} has {spec.num_labels}: fine-tune the teacher on this task "
            f"(sadlora prepare-teacher).")
    teacher_vocab = getattr(teacher_config, "vocab_size", None)
    if spec is None and teacher_vocab != student.config.vocab_size:
        raise ValueError(
            f"the KD teacher {config.teacher!r} has a vocabulary of {teacher_vocab} tokens, the "
            f"student {config.student_model!r} {student.config.vocab_size}: token-level KD needs "
            f"one tokenizer; use a teacher of the student's model family.")


def _teacher_signal(config: DistillConfig, raw, problem_type: str, student) -> dict:
    """{"teacher_logits": (N, C) cached table} or {"teacher": live model} for KD methods."""
    if config.teacher is None:
        raise ValueError(f"method {config.method!r} distils logits: set teacher=<folder>.")
    spec = raw[0]
    _check_teacher_fits(config, spec, student)
    teacher, tokenizer = load_model(config.teacher, spec)
    check_finite_weights(teacher, f"KD teacher {config.teacher!r}")
    if problem_type == "causal_lm":  # full-vocabulary tables are too large to cache
        return {"teacher": teacher,
                "teacher_autocast": torch.bfloat16 if config.teacher_bf16 else None}
    data = prepare_data(config, tokenizer, raw)
    settings = {"task": config.task, "max_length": config.max_length,
                "train_examples": config.train_examples, "data_seed": config.data_seed,
                "bf16": config.teacher_bf16}
    table = TeacherLogitsCache(_cache_dir(config)).get_or_compute(
        teacher, data.splits["train"], data.collate, settings=settings,
        autocast_dtype=torch.bfloat16 if config.teacher_bf16 else None,
        batch_size=config.eval_batch_size, progress=config.progress)
    return {"teacher_logits": table}


def distill(config: DistillConfig) -> dict:
    """Train the student; write the PEFT adapter, targets, sad_config.json and metrics.json."""
    started = time.time()
    set_seed(config.seed)
    name, method = resolve_method(config.method)
    alpha, beta, kd_weight = _loss_weights(config)
    if config.rank_from_targets and config.targets is None:
        raise ValueError("rank_from_targets=true takes each layer's LoRA rank from the spectral "
                         "targets: set targets=<folder from `sadlora extract`, e.g. with "
                         "energy_threshold=0.9 rank=null>, or set rank_from_targets=false to "
                         "give every layer lora_rank.")
    raw = load_raw_splits(config)
    base, tokenizer = load_model(config.student_model, raw[0])
    check_finite_weights(base, f"student_model {config.student_model!r}")
    data = prepare_data(config, tokenizer, raw)
    init = config.init or method.init
    trains_on_targets = method.needs_targets or init_needs_targets(init)
    if trains_on_targets and config.targets is None:
        raise ValueError(f"method {name!r} needs spectral targets: set targets=<folder "
                         f"from `sadlora extract`>.")
    # Methods that do not train on the targets still report their angles to them when given.
    targets = load_targets(config.targets) if config.targets is not None else None
    if targets is not None and not isinstance(config.target_modules, str):
        # names and shapes must fit the student
        check_fingerprint(targets, base, resolve_target_modules(base, config.target_modules))
    student = build_student(base, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                            lora_dropout=config.lora_dropout,
                            target_modules=config.target_modules, init=init,
                            targets=targets if trains_on_targets else None,
                            layer_ranks=targets.ranks if config.rank_from_targets else None)
    adapted = adapted_module_names(student)
    # The LoRA rank of every adapted layer, read from the student (one value unless
    # rank_from_targets).
    ranks = {n: b.shape[1] for n, (b, _) in lora_factors(student).items()}
    teacher_signal = _teacher_signal(config, raw, data.problem_type, base) if kd_weight else {}
    alignment_targets = None
    if trains_on_targets:
        layers = {n: targets.layers[n] for n in adapted}
        alignment_targets = AlignmentTargets(layers, {n: ranks[n] for n in adapted})
    sad_loss = SADLoss(alignment_targets, alpha=alpha, beta=beta, align_kind=config.align_kind,
                       schedule=config.schedule, warmup_steps=config.coeff_warmup_steps,
                       kd_temperature=config.kd_temperature, task_weight=config.task_weight,
                       kd_weight=kd_weight, kd_kind=method.kd or "kl", kd_top_k=config.kd_top_k,
                       scaling=(config.lora_alpha or config.lora_rank) / config.lora_rank)
    output = Path(config.output_dir)
    callbacks = []
    if targets is not None and config.monitor_every:
        callbacks.append(SpectralMonitorCallback(targets, output / "alignment.jsonl",
                                                 config.monitor_every))
    trainer = DistillationTrainer(
        model=student, args=_training_arguments(config, remove_unused_columns=False),
        train_dataset=data.splits["train"], data_collator=data.collate, callbacks=callbacks,
        sad_loss=sad_loss, problem_type=data.problem_type, **teacher_signal)
    trainer.train(resume_from_checkpoint=_checkpoint(config))
    metrics = _evaluate_splits(student, data, config)
    report = layer_report(student, targets) if targets is not None else {}
    result = {
        "method": name, "task": config.task, "lora_rank": config.lora_rank, "layer_ranks": ranks,
        "seed": config.seed, "metrics": metrics, "primary_metric": data.primary_metric,
        "seconds": round(time.time() - started, 1),
        "mean_alignment": (sum(r["alignment"] for r in report.values()) / len(report)
                           if report else None),
        "layers": report, "log_history": trainer.state.log_history, "config": asdict(config),
    }
    if is_main_process():
        save_student(student, output)
        if trains_on_targets:
            save_targets(targets, output / "targets")
        write_json(output / "sad_config.json", asdict(config))
        write_json(output / "metrics.json", result)
    result["summary"] = {"method": name, "task": config.task, **metrics,
                         "mean_alignment": result["mean_alignment"],
                         "seconds": result["seconds"]}
    return result


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


@dataclass
class EvaluateConfig(DataConfig):
    """Task metrics of a saved student (PEFT adapter folder) on its base model."""

    student_model: str = "asset:minilm"
    adapter: str = "runs/student"  # folder written by `sadlora distill`
    merge: bool = False  # evaluate the merged plain model (zero inference overhead)
    eval_batch_size: int = 64
    bf16: bool = False
    output: str | None = None  # write the metrics JSON here


def evaluate(config: EvaluateConfig) -> dict:
    spec, splits = load_raw_splits(config)
    base, tokenizer = load_model(config.student_model, spec)
    model = load_student(base, config.adapter)
    if config.merge:
        model = model.merge_and_unload()
    data = prepare_data(config, tokenizer, (spec, splits))
    metrics = {split: evaluate_model(model, data, split, batch_size=config.eval_batch_size,
                                     bf16=config.bf16) for split in config.eval_splits}
    result = {"adapter": config.adapter, "task": config.task, "merged": config.merge,
              "metrics": metrics}
    if config.output and is_main_process():
        write_json(config.output, result)
    result["summary"] = metrics
    return result
