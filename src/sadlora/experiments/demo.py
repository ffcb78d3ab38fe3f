"""``sadlora demo``: the main job, end to end on real packaged models and data.

On the embedded STS-B (real GLUE sentence pairs with gold scores for dev and test): fine-tune the
MPNet KD teacher and the MiniLM spectral teacher, extract the spectral targets, distil
MiniLM + LoRA (r = 8) with ``kd_lora`` and ``sad_lora_align``, evaluate on dev and test, print
the table and write JSON, Markdown and PNG figures. Every step is cached in ``output_dir``: a
second run reuses the teachers, targets and teacher logits and skips complete runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .grid import GridConfig, run_grid

__all__ = ["DemoConfig", "run_demo", "demo_grid_config"]

# Sizes: (train examples, teacher epochs, student epochs). The wall times are measured on the
# 2-core CPU machine of ASSETS.md with bf16 autocast (README "Quickstart").
SIZES = {
    "quick": {"train_examples": 1500, "eval_examples": None, "teacher_epochs": 2.0,
              "student_epochs": 3.0, "max_length": 64, "calibration_examples": 256},
    "default": {"train_examples": None, "eval_examples": None, "teacher_epochs": 3.0,
                "student_epochs": 3.0, "max_length": 128, "calibration_examples": 512},
}


@dataclass
class DemoConfig:
    """The main job. ``quick=true`` is the small size (README: under 15 minutes on 2 cores)."""

    quick: bool = False
    output_dir: str | None = None  # default outputs/demo or outputs/demo_quick
    task: str = "embedded:stsb"
    methods: list = field(default_factory=lambda: ["kd_lora", "sad_lora_align"])
    lora_rank: int = 8
    seeds: list = field(default_factory=lambda: [0])
    kd_teacher_model: str = "asset:mpnet"
    student_model: str = "asset:minilm"
    student_lr: float = 1e-3
    spectral_teacher_lr: float = 3e-4
    kd_teacher_lr: float = 5e-5
    alpha_align: float = 1.0
    beta_coeff: float = 0.1  # for sad_lora / sad_lora_coeff when requested
    bf16: bool = True
    progress: bool = True


def demo_grid_config(config: DemoConfig) -> GridConfig:
    size = SIZES["quick" if config.quick else "default"]
    output_dir = config.output_dir or ("outputs/demo_quick" if config.quick else "outputs/demo")
    return GridConfig(
        output_dir=output_dir, tasks=[config.task], ranks=[config.lora_rank],
        methods=list(config.methods), seeds=list(config.seeds),
        kd_teacher_model=config.kd_teacher_model, student_model=config.student_model,
        student_lr=config.student_lr, spectral_teacher_lr=config.spectral_teacher_lr,
        kd_teacher_lr=config.kd_teacher_lr, alpha_align=config.alpha_align,
        beta_coeff=config.beta_coeff, bf16=config.bf16, progress=config.progress,
        eval_splits=["validation", "test"], **size)


def run_demo(config: DemoConfig) -> dict:
    report = run_grid(demo_grid_config(config))
    print("\n" + report["markdown"])
    print("figures: " + ", ".join(report["figures"]))
    return report
