"""The combined SAD-LoRA loss ``SADLoss``: KD + task + scheduled alignment and coefficient terms."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .alignment import ALIGNMENT_LOSSES, alignment_loss, coefficient_loss
from .alignment_targets import AlignmentTargets, TargetGroup
from .common import _check_choice, _working_dtype
from .distillation import IGNORE_INDEX, KD_LOSSES, kd_loss, task_loss
from .schedule import SCHEDULES


def _next_token_positions(student, teacher, labels, mask):
    """Drop the last position and mask positions t whose label t+1 is ignored (-100)."""
    if student.dim() != 3:
        raise ValueError(
            f"causal_lm logits must be (batch, seq, vocab), got {tuple(student.shape)}."
        )
    keep = None if labels is None else labels[:, 1:] != IGNORE_INDEX
    if mask is not None:
        keep = mask[:, :-1] != 0 if keep is None else keep & (mask[:, :-1] != 0)
    return student[:, :-1], teacher[:, :-1], keep


class SADLoss(torch.nn.Module):
    """L = w_kd L_KD + w_task L_task + alpha_t L_align + beta_t L_coeff (DESIGN.md §1).

    Args:
        targets: the layers' spectral targets; may be None only when alpha = beta = 0.
        alpha, beta: alpha_align, beta_coeff (>= 0). A weight of 0 skips its term.
        align_kind: ``"projection"`` or ``"energy"`` (see ``alignment_loss``).
        schedule: ``"adaptive"``: p_t = clip(mean_l L_proj,l / (1 - r_l/d_out,l), 0, 1) (detached),
            alpha_t = alpha p_t, beta_t = beta (1 - p_t); ``"fixed"``: alpha_t = alpha,
            beta_t = beta. Either way beta_t = 0 while step < warmup_steps.
        kd_temperature, kd_kind: see ``kd_loss``. task_weight, kd_weight: w_task, w_kd.
        kd_top_k: KL to the teacher's top-k tokens only (``kd_loss``'s ``top_k``; kl only).
        scaling: the LoRA scaling s of the coefficient loss.
    """

    def __init__(
        self,
        targets: AlignmentTargets | None = None,
        *,
        alpha: float = 1.0,
        beta: float = 0.0,
        align_kind: str = "projection",
        schedule: str = "adaptive",
        warmup_steps: int = 0,
        kd_temperature: float = 4.0,
        kd_kind: str = "kl",
        task_weight: float = 1.0,
        kd_weight: float = 1.0,
        kd_top_k: int | None = None,
        scaling: float = 1.0,
    ) -> None:
        super().__init__()
        _check_choice(align_kind, ALIGNMENT_LOSSES, "align_kind")
        _check_choice(schedule, SCHEDULES, "schedule")
        _check_choice(kd_kind, KD_LOSSES, "kd_kind")
        weights = {"alpha": alpha, "beta": beta, "task_weight": task_weight,
                   "kd_weight": kd_weight, "warmup_steps": warmup_steps}
        for field, value in weights.items():
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{field} must be a finite number >= 0, got {value}.")
        if not kd_temperature > 0:
            raise ValueError(f"kd_temperature must be positive, got {kd_temperature}.")
        if kd_top_k is not None and (kd_kind != "kl" or kd_top_k < 1):
            raise ValueError(f"kd_top_k={kd_top_k} needs kd_kind='kl' and k >= 1 (got "
                             f"kd_kind={kd_kind!r}); set kd_top_k=None for the full loss.")
        if targets is None and (alpha > 0 or beta > 0):
            raise ValueError(
                f"alpha={alpha}, beta={beta} need spectral targets; pass an AlignmentTargets "
                f"or set alpha=beta=0 (plain KD / LoRA)."
            )
        if beta > 0 and not targets.has_sigma:
            raise ValueError(
                f"beta={beta} > 0: the coefficient loss needs each layer's input second moment "
                f"Sigma; build the targets keeping sigma, or set beta=0."
            )
        self.targets = targets
        self.alpha, self.beta = float(alpha), float(beta)
        self.align_kind, self.schedule = align_kind, schedule
        self.warmup_steps = int(warmup_steps)
        self.kd_temperature, self.kd_kind = float(kd_temperature), kd_kind
        self.task_weight, self.kd_weight = float(task_weight), float(kd_weight)
        self.kd_top_k = kd_top_k
        self.scaling = float(scaling)

    def forward(
        self,
        adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        *,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        problem_type: str,
        step: int,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """All terms of the loss as 0-dim tensors (host sync only via the coefficient term).

        Args:
            adapters: {layer name: (B (d_out, r), A (r, d_in))} for every target layer.
            student_logits, teacher_logits: see ``kd_loss``; mask (batch, seq) restricts the
                KD average. For ``causal_lm`` (unshifted logits and labels, as for
                ``task_loss``) KD is over the positions whose next-token label is not -100
                (and where mask is nonzero), i.e. exactly the tokens the task loss scores.
            labels, problem_type: see ``task_loss``.
            step: optimizer step (for the warmup).

        Returns keys ``total, kd, task, align, coeff, alpha_t, beta_t, alignment``; ``total`` is
        exactly ``kd_weight*kd + task_weight*task + alpha_t*align + beta_t*coeff`` of the returned
        tensors. ``alignment`` = mean over layers of 1 - projection loss (detached; NaN when
        there are no targets).
        """
        zero = student_logits.new_zeros((), dtype=_working_dtype(student_logits))
        kd = self._kd(student_logits, teacher_logits, labels, problem_type, mask) \
            if self.kd_weight else zero
        task = self._task(student_logits, labels, problem_type) if self.task_weight else zero
        align, coeff, alignment, alpha_t, beta_t = self._spectral_terms(adapters, step, zero)
        total = self.kd_weight * kd + self.task_weight * task + alpha_t * align + beta_t * coeff
        return {"total": total, "kd": kd, "task": task, "align": align, "coeff": coeff,
                "alpha_t": alpha_t, "beta_t": beta_t, "alignment": alignment}

    def _kd(self, student_logits, teacher_logits, labels, problem_type, mask) -> torch.Tensor:
        if teacher_logits is None:
            raise ValueError("kd_weight > 0 needs teacher_logits; pass them or set kd_weight=0.")
        kind = "mse" if problem_type == "regression" else self.kd_kind
        if problem_type == "causal_lm":
            student_logits, teacher_logits, mask = _next_token_positions(
                student_logits, teacher_logits, labels, mask)
        return kd_loss(student_logits, teacher_logits, temperature=self.kd_temperature,
                       kind=kind, mask=mask, top_k=self.kd_top_k if kind == "kl" else None)

    def _task(self, student_logits, labels, problem_type) -> torch.Tensor:
        if labels is None:
            raise ValueError("task_weight > 0 needs labels; pass them or set task_weight=0.")
        return task_loss(student_logits, labels, problem_type=problem_type)

    def _spectral_terms(self, adapters, step: int, zero: torch.Tensor):
        """(align, coeff, alignment, alpha_t, beta_t), layer means over all groups."""
        if self.targets is None:
            return zero, zero, torch.full_like(zero, float("nan")), zero, zero
        need_align = self.alpha > 0
        need_coeff = self.beta > 0 and step >= self.warmup_steps
        with torch.set_grad_enabled(torch.is_grad_enabled() and (need_align or need_coeff)):
            stacked = self.targets.stack(adapters, with_a=need_coeff)
        proj_sum = progress_sum = align_sum = coeff_sum = zero
        for group, (b, a) in zip(self.targets.groups, stacked):
            proj, align = self._alignment_terms(group, b, need_align)
            proj_sum = proj_sum + proj.sum()
            if group.random_misalignment > 0:  # r = d_out: always aligned, no progress term
                progress_sum = progress_sum + proj.sum() / group.random_misalignment
            if align is not None:
                align_sum = align_sum + align.sum()
            if need_coeff:
                coeff_sum = coeff_sum + coefficient_loss(
                    b, a, self.targets.sigma(group), self.targets.singular_values(group),
                    scaling=self.scaling).sum()
        count = len(self.targets)
        progress = (progress_sum / count).clamp(0.0, 1.0)
        alpha_t, beta_t = SCHEDULES[self.schedule](self.alpha, self.beta, progress)
        if step < self.warmup_steps:
            beta_t = torch.zeros_like(beta_t)
        return align_sum / count, coeff_sum / count, 1.0 - proj_sum / count, alpha_t, beta_t

    def _alignment_terms(self, group: TargetGroup, b: torch.Tensor, need_align: bool):
        """(detached projection loss (G,), trainable L_align (G,) or None)."""
        basis = self.targets.basis(group)
        if need_align and self.align_kind == "projection":
            align = alignment_loss(b, basis, kind="projection")
            return align.detach(), align
        with torch.no_grad():
            proj = alignment_loss(b, basis, kind="projection")
        if not need_align:
            return proj, None
        return proj, alignment_loss(b, basis, kind=self.align_kind,
                                    singular_values=self.targets.singular_values(group))
