"""Knowledge-distillation and hard-label task losses: ``kd_loss`` and ``task_loss``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from .common import _check_choice, _no_autocast, _upcast

IGNORE_INDEX = -100  # label value that transformers' losses skip


def _kl_per_position(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """T^2 KL(softmax(z_T/T) || softmax(z_S/T)) per position, shape logits.shape[:-1]."""
    log_student = F.log_softmax(student / temperature, dim=-1)
    teacher_probs = F.softmax(teacher / temperature, dim=-1)
    # xlogy gives 0 log 0 = 0 where the teacher puts no mass (e.g. -inf logits on masked vocab).
    kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_student).sum(-1)
    return temperature**2 * kl


def _top_k_kl_per_position(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                           top_k: int) -> torch.Tensor:
    """T^2 KL(p_T^k || softmax(z_S/T)) per position, p_T^k = the teacher's softmax restricted to
    its top-k logits and renormalised; the student keeps its full-vocabulary softmax. Equals
    ``_kl_per_position`` when k covers the support; >= 0 (Gibbs), 0 iff the student puts all
    its mass on those k tokens in the teacher's proportions."""
    values, indices = teacher.topk(top_k, dim=-1)
    teacher_probs = F.softmax(values / temperature, dim=-1)
    log_student = F.log_softmax(student / temperature, dim=-1).gather(-1, indices)
    kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_student).sum(-1)
    return temperature**2 * kl


def _mse_per_position(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """Mean squared logit difference per position (the temperature does not apply)."""
    return (student - teacher).square().mean(-1)


KD_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "kl": _kl_per_position,
    "mse": _mse_per_position,
}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` (same shape) is nonzero; 0 if none."""
    if mask is None:
        return values.mean()
    if tuple(mask.shape) != tuple(values.shape):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the logits' leading shape "
            f"{tuple(values.shape)} (e.g. (batch, seq) for (batch, seq, vocab) logits)."
        )
    keep = mask != 0
    # where (not multiply) so that NaN/inf at padding positions cannot leak in.
    total = torch.where(keep, values, torch.zeros_like(values)).sum()
    return total / keep.sum().clamp_min(1).to(values.dtype)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 4.0,
    kind: str = "kl",
    mask: torch.Tensor | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """Distillation loss L_KD, a scalar.

    Args:
        student_logits, teacher_logits: (..., C), e.g. (batch, C) or (batch, seq, vocab).
        temperature: T > 0 of ``kind="kl"``.
        kind: ``"kl"``: T^2 KL(softmax(z_T/T) || softmax(z_S/T)); ``"mse"``: mean squared error
            on the logits. Logits with C = 1 (a regression head) always use MSE: a softmax over
            one class is constant, so KL would be identically 0.
        mask: optional (...) = logits.shape[:-1]; only positions where it is nonzero count
            (padding and ignored tokens of a language model never enter the average).
        top_k: ``kind="kl"`` only: match the teacher's k most likely tokens (renormalised) with
            the student's full softmax, the usual sparse KD of large vocabularies
            (``_top_k_kl_per_position``); None or k >= C is the full KL.

    The teacher is a fixed target: its logits are detached.
    """
    _check_choice(kind, KD_LOSSES, "kd kind")
    if top_k is not None and (kind != "kl" or top_k < 1):
        raise ValueError(f"kd top_k={top_k}: a positive number of teacher tokens, with "
                         f"kind='kl' (got kind={kind!r}); use top_k=None for the full loss.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape; KD needs the same label space / "
            f"vocabulary (slice the teacher's padded vocabulary to the student's)."
        )
    if not temperature > 0:
        raise ValueError(f"kd temperature must be positive, got {temperature}.")
    if student_logits.shape[-1] == 1:
        kind = "mse"
    with _no_autocast(student_logits):
        student, teacher = _upcast(student_logits, teacher_logits.detach())
        if kind == "kl" and top_k is not None and top_k < student.shape[-1]:
            return _masked_mean(_top_k_kl_per_position(student, teacher, temperature, top_k),
                                mask)
        return _masked_mean(KD_LOSSES[kind](student, teacher, temperature), mask)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over labels != -100; 0 (not NaN) when every label is ignored."""
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the logits' leading shape "
            f"{tuple(logits.shape[:-1])}."
        )
    flat_labels = labels.reshape(-1).long()
    summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_labels,
                             ignore_index=IGNORE_INDEX, reduction="sum")
    return summed / (flat_labels != IGNORE_INDEX).sum().clamp_min(1).to(summed.dtype)


def _causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Position t predicts token t+1: drop the last logit and the first label.
    if logits.dim() != 3:
        raise ValueError(
            f"causal_lm logits must be (batch, seq, vocab), got {tuple(logits.shape)}."
        )
    return _cross_entropy(logits[:, :-1, :], labels[:, 1:])


def _regression_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    target = labels.to(logits.dtype)
    if logits.shape[-1] == 1 and target.shape == logits.shape[:-1]:
        logits = logits.squeeze(-1)
    if logits.shape != target.shape:
        raise ValueError(
            f"regression logits {tuple(logits.shape)} do not match labels "
            f"{tuple(labels.shape)}; expected (batch, 1) or (batch, n) logits for (batch,) or "
            f"(batch, n) labels."
        )
    return F.mse_loss(logits, target)


def _multi_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


TASK_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "single_label_classification": _cross_entropy,
    "regression": _regression_loss,
    "causal_lm": _causal_lm_loss,
    "multi_label_classification": _multi_label_loss,
}


def task_loss(logits: torch.Tensor, labels: torch.Tensor, *, problem_type: str) -> torch.Tensor:
    """Hard-label task loss, a scalar, with transformers' conventions.

    problem_type:
        ``single_label_classification``: cross entropy, logits (batch, C), labels (batch,);
            labels equal to -100 are ignored.
        ``regression``: MSE, logits (batch, 1) and labels (batch,) (or matching shapes).
        ``causal_lm``: next-token cross entropy. Pass the UNSHIFTED logits (batch, seq, vocab)
            and labels (batch, seq), as to a transformers model; the shift is done here.
            Labels -100 (padding, prompt tokens) are ignored; the mean is over the rest.
        ``multi_label_classification``: BCE with logits, labels (batch, C) in {0, 1}.
    """
    _check_choice(problem_type, TASK_LOSSES, "problem_type")
    with _no_autocast(logits):
        (work,) = _upcast(logits)
        return TASK_LOSSES[problem_type](work, labels)
