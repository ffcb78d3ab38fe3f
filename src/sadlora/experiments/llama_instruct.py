"""Instruction following with a causal LM: KD teacher -> smaller LoRA student (DESIGN.md §1-2).

The setting of the seed's "LLaMA instruction-following experiment", with the one causal LM that
ships in a package (ASSETS.md), SmolLM2-135M-Instruct; with a hub the same config runs Llama-3.x
(set ``base_model`` / ``kd_teacher`` to hub names).

1. Data: ``instruct:templated`` (Rotten Tomatoes sentiment and STS-B similarity as
   instructions with closed-form answers), prompt tokens masked from every loss.
2. Student base: a copy of ``base_model`` with layers dropped (``drop_layers``; default every
   other layer), then LoRA on q/k/v/o/gate/up/down.
3. KD teacher: ``kd_teacher`` (default the full SmolLM2), optionally fine-tuned on the task
   first (``finetune_kd_teacher``). Token-level KD over response tokens only.
4. Spectral teacher: the *student architecture* fully fine-tuned on the task; its update
   dW = W_T - W0 of the student's own layers defines the targets (never a difference of
   weights of two different-size models).
5. Each method of ``methods`` distils with ``sadlora.commands.distill``.
6. Metrics of every model (student base, teachers, students): held-out response perplexity,
   exact match of greedy answers, and forgetting: perplexity on held-out generic text (STS-B
   test sentences, used by no training step) before vs after adaptation.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..commands import (
    DistillConfig,
    ExtractConfig,
    TeacherConfig,
    distill,
    extract,
    prepare_teacher,
)
from ..forgetting import causal_lm_perplexity, lm_forgetting, stsb_sentences
from ..instruct import exact_match, load_instruction_task
from ..methods import resolve_method
from ..runs import DataConfig, evaluate_model, load_model, prepare_data
from ..student import load_student
from .common import BaseConfig, setup_logging, write_json
from .llama_instruct_report import write_report

__all__ = ["LlamaInstructConfig", "run_llama_instruct", "drop_layers", "kept_layer_indices"]

log = logging.getLogger(__name__)

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LlamaInstructConfig(BaseConfig):
    """Configuration of the instruction experiment (``configs/exp_llama_instruction.yaml``)."""

    output_dir: str = "outputs/llama_instruct"
    base_model: str = "asset:smollm2"  # the student is this with layers dropped
    kd_teacher: str = "asset:smollm2"  # logits teacher (same tokenizer / vocabulary)
    # "all", "every_other", "drop_every:N" (every N-th layer but the last) or a list of indices
    keep_layers: str | list = "drop_every:5"
    finetune_kd_teacher: bool = True  # fine-tune kd_teacher on the task before distilling
    tasks: list = field(default_factory=lambda: ["rotten_tomatoes", "stsb"])
    train_per_task: int = 200  # training instructions per task
    eval_per_task: int = 50  # held-out instructions per task (perplexity, exact match)
    max_words: int = 40  # words kept of each review / sentence inside the prompt
    max_length: int = 160  # tokens per example (prompt + response)
    forgetting_texts: int = 200  # STS-B test sentences of the generic-text perplexity
    methods: list = field(default_factory=lambda: ["lora", "kd_lora", "sad_lora_align"])
    lora_rank: int = 8
    target_modules: list = field(default_factory=lambda: list(ALL_PROJECTIONS))
    learning_rate: float = 3e-4  # LoRA students
    teacher_learning_rate: float = 5e-5  # full fine-tunes (both teachers)
    num_train_epochs: float = 1.0
    teacher_epochs: float = 1.0
    batch_size: int = 8
    alpha_align: float = 1.0
    beta_coeff: float = 0.0  # > 0 only for sad_lora / sad_lora_coeff
    kd_temperature: float = 2.0
    kd_top_k: int | None = None  # KL to the teacher's k most likely tokens only (None: full)
    calibration_examples: int = 128  # instructions streamed for Sigma
    max_rank: int = 32  # target directions stored per layer
    max_new_tokens: int = 6  # greedy tokens generated per answer
    bf16: bool = True  # bf16 autocast of every forward (2.5-3.5x faster on this CPU)
    progress: bool = False


# ---------------------------------------------------------------------------------------------
# The student checkpoint: the base with layers dropped
# ---------------------------------------------------------------------------------------------


def kept_layer_indices(num_layers: int, keep: str | list) -> list[int]:
    """Indices of the decoder layers kept.

    ``"all"``; ``"every_other"`` (0, 2, 4, ...); ``"drop_every:N"``: drop every N-th layer
    (N-1, 2N-1, ...) but never the last one, spreading the removed layers over the depth
    (removing consecutive layers, or the last, breaks a small model far more; see
    docs/llama_instruct_results.md); or an explicit list of indices.
    """
    if keep == "every_other":
        return list(range(0, num_layers, 2))
    if keep == "all":
        return list(range(num_layers))
    if isinstance(keep, str) and keep.startswith("drop_every:"):
        step = keep.split(":", 1)[1]
        if not step.isdigit() or int(step) < 2:
            raise ValueError(f"keep_layers={keep!r}: N of 'drop_every:N' must be an integer "
                             f">= 2, e.g. 'drop_every:5'.")
        return [i for i in range(num_layers)
                if (i + 1) % int(step) != 0 or i == num_layers - 1]
    if isinstance(keep, str) or not keep:
        raise ValueError(f"keep_layers={keep!r}: use 'all', 'every_other', 'drop_every:N' or "
                         f"a list of indices.")
    indices = sorted({int(i) for i in keep})
    if indices[0] < 0 or indices[-1] >= num_layers:
        raise ValueError(f"keep_layers {indices} outside [0, {num_layers - 1}].")
    return indices


def drop_layers(source: str, output_dir: str | Path, keep: str | list = "every_other") -> Path:
    """Save a copy of causal LM ``source`` keeping only the decoder layers ``keep``.

    Works for Llama-style models (``model.model.layers``): the kept layers keep their trained
    weights, embeddings / final norm / LM head are copied, ``num_hidden_layers`` (and
    ``layer_types`` when present) follow. Writes model + tokenizer to ``output_dir``.
    """
    model, tokenizer = load_model(source, None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: drop_layers supports "
                         f"Llama-style decoder models.")
    indices = kept_layer_indices(len(layers), keep)
    model.model.layers = torch.nn.ModuleList([layers[i] for i in indices])
    for new_index, layer in enumerate(model.model.layers):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(indices)
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in indices]
    output = Path(output_dir)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    log.info("student base: kept layers %s of %d -> %s", indices, len(layers), output)
    return output


# ---------------------------------------------------------------------------------------------
# Evaluation of one model
# ---------------------------------------------------------------------------------------------


def _evaluate(model, tokenizer, config: LlamaInstructConfig, rows, texts) -> dict:
    """Response perplexity, exact match and generic-text perplexity of one loaded model."""
    data = prepare_data(_data_config(config), tokenizer, (None, {"validation": rows}))
    response = evaluate_model(model, data, "validation", batch_size=config.batch_size,
                              bf16=config.bf16)
    match = exact_match(model, tokenizer, rows, max_new_tokens=config.max_new_tokens,
                        batch_size=config.batch_size, bf16=config.bf16)
    generic = causal_lm_perplexity(model, tokenizer, texts, batch_size=config.batch_size,
                                   bf16=config.bf16)
    return {"response_perplexity": response["response_perplexity"],
            "exact_match": match["exact_match"], "exact_match_by_task": match["by_task"],
            "examples": match["examples"], "generic": generic}


def _data_config(config: LlamaInstructConfig) -> DataConfig:
    return DataConfig(task="instruct:templated", max_length=config.max_length,
                      data_seed=config.seed, task_options=_task_options(config))


def _task_options(config: LlamaInstructConfig) -> dict:
    return {"tasks": list(config.tasks), "train_per_task": config.train_per_task,
            "eval_per_task": config.eval_per_task, "max_words": config.max_words,
            "seed": config.seed}


def _evaluate_folder(folder: str, config, rows, texts, adapter: Path | None = None) -> dict:
    model, tokenizer = load_model(folder, None)
    if adapter is not None:
        model = load_student(model, adapter).merge_and_unload()
    return _evaluate(model, tokenizer, config, rows, texts)


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def _train_common(config: LlamaInstructConfig, output_dir: Path) -> dict:
    return dict(task="instruct:templated", task_options=_task_options(config),
                max_length=config.max_length, data_seed=config.seed, seed=config.seed,
                batch_size=config.batch_size, eval_batch_size=config.batch_size,
                bf16=config.bf16, progress=config.progress, output_dir=str(output_dir),
                logging_steps=5)


def _done(folder: Path, marker: str) -> bool:
    """A stage whose output folder holds its last-written file is not run again (resume)."""
    if (folder / marker).exists():
        log.info("resume: %s exists, stage skipped", folder / marker)
        return True
    return False


def _check_resumable(config: LlamaInstructConfig, root: Path) -> None:
    """Refuse to mix stages of two different configurations in one output_dir. The list of
    methods may change: each student has its own folder (a resumed call adds methods)."""
    free = ("log_level", "progress", "methods")
    settings = {k: v for k, v in asdict(config).items() if k not in free}
    path = root / "experiment_config.json"
    if path.exists():
        saved = {k: v for k, v in json.loads(path.read_text()).items() if k not in free}
        changed = sorted(k for k in settings.keys() | saved.keys()
                         if settings.get(k) != saved.get(k))
        if changed:
            raise ValueError(f"output_dir {str(root)!r} holds a run of another configuration "
                             f"(differs in {changed}); use a new output_dir or delete it.")
    else:
        write_json(settings, path)


def _teachers(config: LlamaInstructConfig, root: Path, student_base: Path, timer) -> dict:
    kd_teacher = str(root / "kd_teacher") if config.finetune_kd_teacher else config.kd_teacher
    if config.finetune_kd_teacher and not _done(root / "kd_teacher", "metrics.json"):
        with timer("kd_teacher"):
            prepare_teacher(TeacherConfig(
                model=config.kd_teacher, learning_rate=config.teacher_learning_rate,
                num_train_epochs=config.teacher_epochs,
                **_train_common(config, root / "kd_teacher")))
    if not _done(root / "spectral_teacher", "metrics.json"):
        with timer("spectral_teacher"):
            prepare_teacher(TeacherConfig(
                model=str(student_base), learning_rate=config.teacher_learning_rate,
                num_train_epochs=config.teacher_epochs,
                **_train_common(config, root / "spectral_teacher")))
    if not _done(root / "targets", "targets.json"):  # save_targets writes it last
        with timer("extract"):
            extract(ExtractConfig(
                spectral_teacher=str(root / "spectral_teacher"), base_model=str(student_base),
                target_modules=list(config.target_modules), output_dir=str(root / "targets"),
                max_rank=config.max_rank, rank=config.lora_rank,
                calibration_examples=config.calibration_examples, calibration_batch_size=8,
                progress=config.progress, **_data_config(config).__dict__))
    return {"kd_teacher": kd_teacher, "spectral_teacher": str(root / "spectral_teacher"),
            "targets": str(root / "targets")}


def _distill(config, root: Path, student_base: Path, teachers: dict, method: str) -> dict:
    return distill(DistillConfig(
        student_model=str(student_base), teacher=teachers["kd_teacher"],
        targets=teachers["targets"], method=method, lora_rank=config.lora_rank,
        target_modules=list(config.target_modules), alpha_align=config.alpha_align,
        beta_coeff=config.beta_coeff, kd_temperature=config.kd_temperature,
        kd_top_k=config.kd_top_k, learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs, teacher_bf16=config.bf16, monitor_every=0,
        **_train_common(config, root / "students" / method)))


class _Timer:
    """``with timer(name):`` records the stage's wall seconds into ``seconds``, kept in ``path``
    so that a resumed run still reports the stages an earlier call ran."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = (json.loads(path.read_text()) if path.exists()
                                          else {})

    @contextmanager
    def __call__(self, name: str):
        started = time.time()
        log.info("stage %s ...", name)
        yield
        self.seconds[name] = round(time.time() - started, 1)
        log.info("stage %s: %.1f s", name, self.seconds[name])
        write_json(self.seconds, self.path)


def run_llama_instruct(config: LlamaInstructConfig) -> dict:
    """Run the whole experiment; writes results.json and results.md to ``output_dir``."""
    setup_logging(config.log_level)
    started, root = time.time(), Path(config.output_dir)
    for method in config.methods:
        resolve_method(method)  # a ValueError naming the valid methods, before any training
    rows = load_instruction_task("instruct:templated", **_task_options(config))["validation"]
    texts = stsb_sentences("test", config.forgetting_texts)
    root.mkdir(parents=True, exist_ok=True)
    _check_resumable(config, root)
    timer = _Timer(root / "stage_seconds.json")
    with timer("student_base"):  # 1 s, deterministic: rebuilt on resume too
        student_base = drop_layers(config.base_model, root / "student_base", config.keep_layers)
    teachers = _teachers(config, root, student_base, timer)
    models: dict[str, dict] = {}
    with timer("evaluate_references"):
        models["student_base (no adaptation)"] = _evaluate_folder(
            str(student_base), config, rows, texts)
        if config.finetune_kd_teacher:  # the pretrained reference of the forgetting column
            models["kd_teacher before fine-tuning"] = _evaluate_folder(
                config.kd_teacher, config, rows, texts)
        models["kd_teacher"] = _evaluate_folder(teachers["kd_teacher"], config, rows, texts)
        models["spectral_teacher (full FT)"] = _evaluate_folder(
            teachers["spectral_teacher"], config, rows, texts)
    runs = {}
    for method in config.methods:
        metrics = root / "students" / method / "metrics.json"
        if _done(metrics.parent, metrics.name):
            runs[method] = json.loads(metrics.read_text())
        else:
            with timer(f"distill_{method}"):
                runs[method] = _distill(config, root, student_base, teachers, method)
        with timer(f"evaluate_{method}"):
            models[method] = _evaluate_folder(str(student_base), config, rows, texts,
                                              adapter=root / "students" / method)
        models[method]["mean_alignment"] = runs[method]["mean_alignment"]
    before = models["student_base (no adaptation)"]["generic"]
    for entry in models.values():
        entry["forgetting"] = lm_forgetting(before, entry["generic"])
    results = {"config": asdict(config), "models": models, "stage_seconds": timer.seconds,
               "wall_time_s": round(time.time() - started, 1), "paths": teachers,
               "generic_text": {"source": "STS-B test sentences", "count": len(texts)},
               "validation_rows": len(rows)}
    write_json(results, root / "results.json")
    write_report(results, root / "results.md")
    return results

