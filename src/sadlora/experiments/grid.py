"""The distillation grid: tasks x ranks x variants x seeds, resumable, with shared teachers.

For each task the grid fine-tunes the KD teacher and the spectral teacher once, extracts the
targets once per extraction setting, computes the teacher logits once (the cache of
``sadlora.teacher_cache``), then trains one student per (variant, rank, seed):

    <output_dir>/<task>/kd_teacher/            prepare-teacher (metrics.json marks it complete)
    <output_dir>/<task>/spectral_teacher/
    <output_dir>/<task>/targets/<setting>/     extract (done.json marks it complete)
    <output_dir>/<task>/runs/<variant>/r<rank>/s<seed>/   distill (metrics.json marks it complete)

A variant is a method plus config overrides (``{"method": "sad_lora", "beta_coeff": 0.1}``);
the method names alone are the default variants. ``extract:`` overrides inside a variant select
other targets (ablations of the calibration). A variant with ``rank_from_targets: true`` gives
each layer its target's rank (with ``extract: {energy_threshold: ..., rank: null}``, r*(eps)); its
folder keeps the grid's r<rank>, the report shows the mean and range of the layer ranks.
A complete step is skipped on a re-run; an incomplete one (no marker) is redone, resuming from
its last Trainer checkpoint when it saved one.
Model selection: none; every run reports its final weights on the reported splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..commands import (
    DistillConfig,
    ExtractConfig,
    TeacherConfig,
    distill,
    extract,
    prepare_teacher,
)
from ..config import from_dict
from ..methods import resolve_method
from ..runs import DataConfig, load_raw_splits, write_json
from .grid_forgetting import ForgettingProbe

__all__ = ["GridConfig", "run_grid", "variant_configs", "run_folder", "collect_results"]

logger = logging.getLogger(__name__)


@dataclass
class GridConfig:
    """A grid of distillation runs. Every field has the meaning of the command config it feeds
    (``TeacherConfig``, ``ExtractConfig``, ``DistillConfig``)."""

    output_dir: str = "outputs/grid"
    report_name: str = "results"  # <output_dir>/<report_name>.{json,md}: grids may share a folder
    tasks: list = field(default_factory=lambda: ["embedded:stsb"])
    ranks: list = field(default_factory=lambda: [8])
    methods: list = field(default_factory=lambda: ["kd_lora", "sad_lora_align"])
    # name -> overrides of DistillConfig (must include method unless the name is a method);
    # an "extract" key holds ExtractConfig overrides for this variant's targets.
    variants: dict = field(default_factory=dict)
    seeds: list = field(default_factory=lambda: [0])
    # models
    kd_teacher_model: str = "asset:mpnet"
    student_model: str = "asset:minilm"  # also the base of the spectral teacher
    target_modules: list = field(default_factory=lambda: ["query", "value"])
    # data (shared by every step)
    max_length: int = 128
    train_examples: int | None = None
    eval_examples: int | None = None
    eval_splits: list = field(default_factory=lambda: ["validation", "test"])
    data_seed: int = 0
    task_data_dir: dict = field(default_factory=dict)  # task -> GLUE TSV folder
    task_options: dict = field(default_factory=dict)  # task -> loader options (custom tasks)
    # teachers (full fine-tuning)
    teacher_epochs: float = 3.0
    kd_teacher_lr: float = 3e-5
    spectral_teacher_lr: float = 5e-5
    teacher_batch_size: int = 32
    # extraction
    calibration_examples: int = 512
    max_rank: int = 64
    # students
    student_epochs: float = 3.0
    student_lr: float = 5e-4
    batch_size: int = 32
    alpha_align: float = 1.0
    beta_coeff: float = 0.1  # used by methods with the coefficient loss only
    kd_temperature: float = 4.0
    lora_dropout: float = 0.05
    # runtime
    bf16: bool = True  # bf16 autocast for training and evaluation (2.5-3.5x on CPU)
    eval_batch_size: int = 64
    logging_steps: int = 20
    save_steps: int = 0  # > 0: Trainer checkpoints, so an interrupted run resumes
    monitor_every: int = 50
    progress: bool = True
    # forgetting of encoder students: STS-B test pairs whose embedding similarity is compared
    # with the pretrained base's (grid_forgetting; 0 turns it off)
    forgetting_pairs: int = 500


def task_slug(task: str) -> str:
    return task.replace(":", "_").replace("/", "_")


def variant_configs(config: GridConfig) -> dict[str, dict]:
    """Variant name -> DistillConfig overrides (with ``method``), methods first."""
    variants = {name: {"method": name} for name in config.methods}
    for name, overrides in config.variants.items():
        overrides = dict(overrides)
        overrides.setdefault("method", name)
        resolve_method(overrides["method"])  # an unknown method fails before any training
        variants[name] = overrides
    valid = {f.name for f in fields(DistillConfig)} | {"extract"}
    for name, overrides in variants.items():
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"variant {name!r} has unknown key(s) {unknown}; valid keys are "
                             f"the fields of DistillConfig {sorted(valid - {'extract'})} "
                             f"and 'extract'.")
    return variants


def _data(config: GridConfig, task: str) -> dict[str, Any]:
    return dict(task=task, data_dir=config.task_data_dir.get(task),
                task_options=dict(config.task_options.get(task, {})),
                max_length=config.max_length, train_examples=config.train_examples,
                eval_examples=config.eval_examples, eval_splits=list(config.eval_splits),
                data_seed=config.data_seed)


def _train(config: GridConfig) -> dict[str, Any]:
    return dict(bf16=config.bf16, eval_batch_size=config.eval_batch_size,
                logging_steps=config.logging_steps, save_steps=config.save_steps,
                resume=config.save_steps > 0, progress=config.progress)


def teacher_configs(config: GridConfig, task: str) -> dict[str, TeacherConfig]:
    root = Path(config.output_dir) / task_slug(task)
    common = dict(**_data(config, task), **_train(config), num_train_epochs=config.teacher_epochs,
                  batch_size=config.teacher_batch_size)
    return {
        "kd_teacher": TeacherConfig(model=config.kd_teacher_model, learning_rate=config.kd_teacher_lr,
                                    output_dir=str(root / "kd_teacher"), **common),
        "spectral_teacher": TeacherConfig(model=config.student_model,
                                          learning_rate=config.spectral_teacher_lr,
                                          output_dir=str(root / "spectral_teacher"), **common),
    }


def extract_config(config: GridConfig, task: str, overrides: dict | None = None) -> ExtractConfig:
    """Targets of one extraction setting; the folder name is a hash of the overrides."""
    root = Path(config.output_dir) / task_slug(task)
    overrides = dict(overrides or {})
    setting = ("default" if not overrides else
               hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10])
    base = ExtractConfig(**_data(config, task), spectral_teacher=str(root / "spectral_teacher"),
                         base_model=config.student_model, target_modules=list(config.target_modules),
                         output_dir=str(root / "targets" / setting), max_rank=config.max_rank,
                         rank=max(config.ranks), calibration_examples=config.calibration_examples,
                         progress=config.progress)
    return from_dict(ExtractConfig, {**asdict(base), **overrides}, where="extract overrides")


def run_folder(config: GridConfig, task: str, variant: str, rank: int, seed: int) -> Path:
    return Path(config.output_dir) / task_slug(task) / "runs" / variant / f"r{rank}" / f"s{seed}"


def distill_config(config: GridConfig, task: str, variant: str, overrides: dict, rank: int,
                   seed: int) -> DistillConfig:
    """The effective DistillConfig of one run (the grid's settings, then the variant's)."""
    root = Path(config.output_dir) / task_slug(task)
    overrides = {k: v for k, v in overrides.items() if k != "extract"}
    base = DistillConfig(
        **_data(config, task), **_train(config), output_dir=str(run_folder(config, task, variant,
                                                                            rank, seed)),
        seed=seed, learning_rate=config.student_lr, num_train_epochs=config.student_epochs,
        batch_size=config.batch_size, student_model=config.student_model,
        teacher=str(root / "kd_teacher"), targets=None, lora_rank=rank,
        lora_dropout=config.lora_dropout, target_modules=list(config.target_modules),
        alpha_align=config.alpha_align, kd_temperature=config.kd_temperature,
        teacher_cache_dir=str(Path(config.output_dir) / "teacher_logits"),
        teacher_bf16=config.bf16, monitor_every=config.monitor_every)
    method = resolve_method(overrides.get("method", variant))[1]
    if method.use_coeff:
        base = replace(base, beta_coeff=config.beta_coeff)
    return from_dict(DistillConfig, {**asdict(base), **overrides}, where=f"variant {variant!r}")


def _is_complete(folder: Path, marker: str) -> bool:
    return (folder / marker).is_file()


def _fresh(folder: Path, keep_checkpoints: bool) -> None:
    """Clear an incomplete step's folder (its checkpoints are kept when it can resume)."""
    if not folder.exists():
        return
    for child in folder.iterdir():
        if keep_checkpoints and child.name.startswith("checkpoint-"):
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()


# Settings that do not change a step's result: a folder made with other values is reused.
_IGNORED = {"progress", "resume", "save_steps", "logging_steps", "eval_batch_size",
            "monitor_every"}


def _same_config(stored: dict, wanted: dict, defaults: dict) -> list[str]:
    """Names of the result-changing settings on which two configs differ (a setting missing
    from ``stored``, written before the setting existed, had its default value)."""
    keys = (set(stored) | set(wanted)) - _IGNORED

    def text(config: dict, key: str) -> str:
        return json.dumps(config.get(key, defaults.get(key)), default=str)

    return sorted(k for k in keys if text(stored, k) != text(wanted, k))


def _step(label: str, folder: Path, marker: str, work, resumable: bool, config) -> dict:
    """Run ``work`` unless ``folder`` holds a complete step made with the same config."""
    wanted = json.loads(json.dumps(asdict(config), default=str))
    if _is_complete(folder, marker):
        stored = json.loads((folder / marker).read_text()).get("config", {})
        defaults = json.loads(json.dumps(asdict(type(config)()), default=str))
        differing = _same_config(stored, wanted, defaults)
        if differing:
            raise ValueError(
                f"{folder} holds a complete {label} made with other settings "
                f"({', '.join(f'{k}: {stored.get(k)!r} -> {wanted.get(k)!r}' for k in differing)}"
                f"); use another output_dir, or delete that folder to redo it.")
        logger.info("%s: complete, skipped (%s)", label, folder)
        return json.loads((folder / marker).read_text())
    _fresh(folder, keep_checkpoints=resumable)
    logger.info("%s: running -> %s", label, folder)
    return work()


def prepare_task(config: GridConfig, task: str, variants: dict[str, dict]) -> dict[str, str]:
    """Teachers and every extraction setting the variants need; returns setting -> folder."""
    for name, teacher in teacher_configs(config, task).items():
        _step(f"{task} {name}", Path(teacher.output_dir), "metrics.json",
              lambda teacher=teacher: prepare_teacher(teacher), config.save_steps > 0, teacher)
    folders = {}
    needs_targets = [o for o in variants.values() if resolve_method(o["method"])[1].needs_targets
                     or o.get("init")]
    if needs_targets:  # the default targets, for the angles of methods that do not train on them
        needs_targets.insert(0, {})
    for overrides in needs_targets:
        extract_overrides = overrides.get("extract") or {}
        setting = extract_config(config, task, extract_overrides)
        key = json.dumps(extract_overrides, sort_keys=True)
        if key in folders:
            continue
        folders[key] = setting.output_dir

        def work(setting=setting):
            result = extract(setting)
            result["config"] = asdict(setting)
            write_json(Path(setting.output_dir) / "done.json", result)
            return result

        _step(f"{task} targets", Path(setting.output_dir), "done.json", work, False, setting)
    return folders


def run_grid(config: GridConfig) -> dict:
    """Run every step that is not complete, then aggregate; returns the aggregate."""
    from .grid_report import write_report

    started = time.time()
    variants = variant_configs(config)
    for task in config.tasks:
        targets = prepare_task(config, task, variants)
        probe = _forgetting_probe(config, task)
        for name, overrides in variants.items():
            method = resolve_method(overrides["method"])[1]
            for rank in config.ranks:
                for seed in config.seeds:
                    run = distill_config(config, task, name, overrides, rank, seed)
                    # Every run gets targets: to train on, or to report its angles against.
                    key = json.dumps(overrides.get("extract") or {}, sort_keys=True)
                    if targets:
                        run = replace(run, targets=targets.get(key, targets.get("{}")))
                    if method.kd is None:
                        run = replace(run, teacher=None)
                    _step(f"{task} {name} r={rank} seed={seed}", Path(run.output_dir),
                          "metrics.json", lambda run=run: distill(run), config.save_steps > 0,
                          run)
                    if probe is not None:  # also measures runs finished before it existed
                        probe.measure(Path(run.output_dir))
    report = write_report(config, collect_results(config))
    report["seconds"] = round(time.time() - started, 1)
    report["summary"] = {"output_dir": config.output_dir, "runs": len(report["runs"]),
                         "table": report["markdown_path"], "seconds": report["seconds"]}
    return report


def _forgetting_probe(config: GridConfig, task: str):
    """A ForgettingProbe for the task's encoder students, or None (off, or a causal LM)."""
    if config.forgetting_pairs <= 0:
        return None
    spec = load_raw_splits(DataConfig(**_data(config, task)))[0]
    return None if spec is None else ForgettingProbe(config.student_model, spec,
                                                     config.forgetting_pairs)


def collect_results(config: GridConfig) -> dict:
    """Every complete step of the grid read back from disk (teachers and runs)."""
    teachers, runs = [], []
    for task in config.tasks:
        for name, teacher in teacher_configs(config, task).items():
            path = Path(teacher.output_dir) / "metrics.json"
            if path.is_file():
                data = json.loads(path.read_text())
                teachers.append({"task": task, "role": name, "model": data["model"],
                                 "metrics": data["metrics"], "seconds": data["seconds"],
                                 "primary_metric": data["primary_metric"]})
        for name in variant_configs(config):
            for rank in config.ranks:
                for seed in config.seeds:
                    path = run_folder(config, task, name, rank, seed) / "metrics.json"
                    if path.is_file():
                        data = json.loads(path.read_text())
                        runs.append({"task": task, "variant": name, "method": data["method"],
                                     "rank": rank, "seed": seed, "metrics": data["metrics"],
                                     "primary_metric": data["primary_metric"],
                                     "mean_alignment": data["mean_alignment"],
                                     # absent from runs written before it was recorded
                                     "layer_ranks": data.get("layer_ranks"),
                                     "layers": data["layers"], "seconds": data["seconds"],
                                     "forgetting": _read_json(path.parent / "forgetting.json")})
    return {"teachers": teachers, "runs": runs}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
