"""The distillation trainer: transformers' Trainer with the SAD-LoRA loss.

Only ``compute_loss`` and ``log`` are overridden, so everything the Trainer brings (DDP, FSDP,
DeepSpeed, mixed precision, gradient accumulation, checkpoints and resume, report_to) works
unchanged. Gradient clipping comes from ``TrainingArguments.max_grad_norm`` (1.0 by default:
eigen-solver gradients spike near tied singular values).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .geometry import principal_angles
from .losses import SADLoss
from .runs import write_text_atomic
from .student import lora_factors, lora_scaling
from .targets import SpectralTargets

__all__ = ["DistillationTrainer", "SpectralMonitorCallback", "LOGGED_TERMS"]

logger = logging.getLogger(__name__)

# The SADLoss terms averaged over the steps between two logs and added to the log history.
LOGGED_TERMS = ("kd", "task", "align", "coeff", "alpha_t", "beta_t", "alignment")


class DistillationTrainer(Trainer):
    """Trainer whose loss is ``SADLoss`` (L_KD + w L_task + alpha_t L_align + beta_t L_coeff).

    Args (besides the Trainer's own):
        sad_loss: the loss module (holds the spectral targets as buffers).
        problem_type: ``single_label_classification``, ``regression`` or ``causal_lm``.
        teacher_logits: (N, num_labels) cached teacher logits, row = example ``idx``; or
        teacher: a live teacher fed the student's own inputs (same tokenizer; used for
            causal LMs, where full-vocabulary logit tables would be too large to cache).
        teacher_autocast: dtype for the live teacher's forward (e.g. torch.bfloat16).

    Batches may carry an ``idx`` column (needed with ``teacher_logits``); set
    ``remove_unused_columns=False`` in the TrainingArguments so the Trainer keeps it.
    """

    # compute_loss returns a per-batch mean: the Trainer must divide by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, sad_loss: SADLoss, problem_type: str,
                 teacher_logits: torch.Tensor | None = None,
                 teacher: torch.nn.Module | None = None,
                 teacher_autocast: torch.dtype | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        sharding = sharded_parameters(self)
        if sharding and sad_loss.targets is not None:
            raise ValueError(
                f"{sharding} shards the LoRA factors across ranks, but the spectral losses "
                f"read whole B and A matrices: train with DDP (torchrun / accelerate launch "
                f"--multi_gpu) or DeepSpeed ZeRO-1/2, or use a method without targets "
                f"(kd_lora, lora).")
        self.sad_loss = sad_loss.to(self.args.device)
        self.problem_type = problem_type
        self.teacher_logits = teacher_logits
        self.teacher = teacher
        self.teacher_autocast = teacher_autocast
        if teacher is not None:
            teacher.to(self.args.device).eval().requires_grad_(False)
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0

    # -- teacher ------------------------------------------------------------------------------
    def _teacher_output(self, inputs: dict, index: torch.Tensor | None) -> torch.Tensor | None:
        if self.teacher_logits is not None:
            if index is None:
                raise ValueError("cached teacher logits need an 'idx' column in every batch; "
                                 "set remove_unused_columns=False.")
            return self.teacher_logits[index.cpu()].to(self.args.device, non_blocking=True)
        if self.teacher is None:
            return None
        device_type = self.args.device.type
        with torch.no_grad(), torch.autocast(device_type, dtype=self.teacher_autocast,
                                             enabled=self.teacher_autocast is not None):
            return self.teacher(**inputs).logits.float()

    # -- loss ---------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)  # prediction_step reads the labels from the caller's dict
        labels = inputs.pop("labels", None)
        index = inputs.pop("idx", None)
        outputs = model(**inputs)
        # Causal LMs pass unshifted logits and labels: SADLoss shifts them once, for the task
        # loss and for the token-level KD over response positions alike.
        # Under DDP ``model`` is the wrapper: read the factors from the PEFT model inside it
        # (the same parameters, so the gradients still go through the DDP reducer).
        terms = self.sad_loss(
            lora_factors(self.accelerator.unwrap_model(model)),
            student_logits=outputs.logits,
            teacher_logits=self._teacher_output(inputs, index),
            labels=labels,
            problem_type=self.problem_type,
            step=self.state.global_step,
        )
        if model.training:
            self._accumulate(terms)
        return (terms["total"], outputs) if return_outputs else terms["total"]

    def _accumulate(self, terms: dict[str, torch.Tensor]) -> None:
        # Summed on the device and read only when the Trainer logs: no host sync per step.
        for name in LOGGED_TERMS:
            value = terms[name].detach().float()
            self._term_sums[name] = self._term_sums.get(name, 0.0) + value
        self._term_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_count:
            for name, total in self._term_sums.items():
                logs[name] = round(float(total) / self._term_count, 6)
            self._term_sums, self._term_count = {}, 0
            _check_finite_terms(logs, self.state.global_step)
        super().log(logs, start_time)


def sharded_parameters(trainer) -> str | None:
    """The name of the trainer's parameter sharding (FSDP, DeepSpeed ZeRO-3), or None."""
    state = trainer.accelerator.state
    if getattr(state, "fsdp_plugin", None) is not None:
        return "FSDP"
    deepspeed = getattr(state, "deepspeed_plugin", None)
    if deepspeed is not None and deepspeed.zero_stage == 3:
        return "DeepSpeed ZeRO-3"
    return None


def _check_finite_terms(logs: dict[str, float], step: int) -> None:
    """Stop a run whose loss went NaN/Inf instead of training on garbage (checked when the
    terms are logged, where the host reads them anyway: no extra sync per step)."""
    bad = {name: logs[name] for name in ("loss", "kd", "task", "align", "coeff")
           if name in logs and not math.isfinite(logs[name])}
    if bad:
        raise ValueError(
            f"non-finite training loss at optimizer step {step}: {bad}. A NaN/Inf in the "
            f"student's or the teacher's weights or logits, or a diverging run: check the "
            f"models, lower learning_rate, or train without bf16.")


class SpectralMonitorCallback(TrainerCallback):
    """Every ``every`` optimizer steps, append one JSON line per step to ``path`` with, for
    each adapted layer: alignment score (1/r) sum cos^2 theta_i, the principal angles (degrees)
    between colspan(B) and the target span(U_r), and the adapter's singular values
    (data-weighted units sv(s B A Sigma^{1/2}) when the target keeps Sigma, else sv(s B A)).
    """

    def __init__(self, targets: SpectralTargets, path: str | Path, every: int = 50) -> None:
        self.targets = targets
        self.path = Path(path)
        self.every = every

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run (or a rerun in the same folder) rewrites the steps after its start:
        # drop those records so the file holds each step once, from the run that kept it.
        if not state.is_world_process_zero or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= state.global_step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every or not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": state.global_step, "layers": layer_report(model, self.targets)}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


@torch.no_grad()
def layer_report(model, targets: SpectralTargets) -> dict[str, dict]:
    """Per-layer LoRA rank r_l, alignment, principal angles (r_l of them, to span(U_{r_l})) and
    adapter singular values of a LoRA model; the ranks may differ across layers."""
    scaling = lora_scaling(model)
    report = {}
    for name, (b, a) in lora_factors(model).items():
        target = targets.layers.get(name)
        if target is None:
            continue
        b, a = b.detach().float(), a.detach().float()
        rank = b.shape[1]
        angles = principal_angles(b, target.basis[:, :rank].to(b))
        update = scaling * b @ a
        if target.sigma is not None:
            update = update @ _psd_sqrt(target.sigma).to(update)
        report[name] = {
            "rank": rank,  # this layer's LoRA rank (per-layer with rank_from_targets)
            "alignment": float(torch.cos(angles).square().mean()),
            "angles_deg": torch.rad2deg(angles).tolist(),
            "adapter_singular_values": torch.linalg.svdvals(update)[:rank].tolist(),
            "target_singular_values": target.singular_values[:rank].tolist(),
        }
    return report


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix.double())
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T
