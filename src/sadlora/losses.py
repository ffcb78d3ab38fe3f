"""SAD-LoRA training losses and their schedule (DESIGN.md §1 "Losses"). Pure torch.

Shapes, for one adapted linear layer (a leading batch of layers ``...`` is allowed everywhere):

- ``B``  (..., d_out, r)   PEFT's ``lora_B.weight``; ``A`` (..., r, d_in) PEFT's ``lora_A.weight``;
  the adapter is M = s B A with s the LoRA scaling.
- ``basis`` U_k (..., d_out, k), k >= r, orthonormal columns: the top-k left singular vectors of
  the data-weighted teacher update W~ = dW Sigma^{1/2}; ``singular_values`` sigma~ (..., k),
  descending.
- ``sigma`` Sigma (..., d_in, d_in), the uncentred input second moment.

Precision: every loss runs with autocast disabled, in float32 (bf16/fp16 inputs are upcast) or
in float64 when an input is float64. Nothing here calls ``.item()``/``.cpu()`` or branches on
tensor values, and Cholesky uses ``cholesky_ex`` (no error check on the host). One exception:
``torch.linalg.eigvalsh`` in ``coefficient_loss`` synchronises a CUDA device with the host
(torch documents this; there is no ``_ex`` variant), so the coefficient term, active only when
beta > 0 after warmup, costs one sync per shape group and step. The recommended
SAD-LoRA-Align (beta = 0) is sync-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

__all__ = [
    "IGNORE_INDEX",
    "KD_LOSSES",
    "TASK_LOSSES",
    "ALIGNMENT_LOSSES",
    "SCHEDULES",
    "kd_loss",
    "task_loss",
    "alignment_loss",
    "coefficient_loss",
    "TargetGroup",
    "AlignmentTargets",
    "SADLoss",
]

if TYPE_CHECKING:
    from .targets import LayerTarget, SpectralTargets

IGNORE_INDEX = -100  # label value that transformers' losses skip

# Relative jitter added to C = B^T B (times its mean eigenvalue). It must dominate the round-off
# of forming C, else Cholesky of a (near) rank-deficient C fails; it must stay small enough to
# bias tr(C^-1 X) only by about jitter * cond(C).
_RELATIVE_JITTER = {torch.float32: 1e-6, torch.float64: 1e-13}


# --------------------------------------------------------------------------------------------
# Precision helpers
# --------------------------------------------------------------------------------------------


def _working_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 are too coarse for Gram solves)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _upcast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    dtype = _working_dtype(*tensors)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _no_autocast(reference: torch.Tensor) -> torch.autocast:
    # Under autocast a matmul would silently run in bf16 again after our upcast.
    return torch.autocast(device_type=reference.device.type, enabled=False)


def _check_choice(value: str, table: Mapping[str, object], what: str) -> None:
    if value not in table:
        raise ValueError(f"unknown {what} {value!r}; choose one of {sorted(table)}.")


# --------------------------------------------------------------------------------------------
# Knowledge distillation and task losses
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Alignment and coefficient losses
# --------------------------------------------------------------------------------------------


def _gram_cholesky(b: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor L (..., r, r) of C + delta I, C = B^T B.

    delta = jitter * tr(C)/r + sqrt(tiny). The relative part keeps Cholesky finite for a
    rank-deficient B (duplicate or zero columns) while staying scale-invariant; the absolute
    floor only matters at B = 0 (C = 0), where it makes L = sqrt(floor) I, so the losses are
    finite there and their gradients are exactly 0. ``cholesky_ex`` does not check the
    factorisation on the host, which would synchronise.
    """
    gram = b.mT @ b
    r = gram.shape[-1]
    mean_eigenvalue = gram.diagonal(dim1=-2, dim2=-1).sum(-1) / r
    delta = _RELATIVE_JITTER[gram.dtype] * mean_eigenvalue + torch.finfo(gram.dtype).tiny ** 0.5
    eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
    chol, _ = torch.linalg.cholesky_ex(gram + delta[..., None, None] * eye)
    return chol


def _whitened_energy(chol: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """tr(C^{-1} G G^T) = ||L^{-1} G||_F^2 for C = L L^T, G (..., r, m): a triangular solve."""
    return torch.linalg.solve_triangular(chol, g, upper=False).square().sum(dim=(-2, -1))


def _projection_alignment(b, basis, singular_values):
    # 1 - (1/r) tr(C^{-1} B^T U_r U_r^T B) = (1/r) sum_i sin^2 theta_i.
    r = b.shape[-1]
    return 1.0 - _whitened_energy(_gram_cholesky(b), b.mT @ basis[..., :r]) / r


def _energy_alignment(b, basis, singular_values):
    # 1 - tr(C^{-1} G G^T) / sum_{i<=r} sigma~_i^2 with G = B^T U_k diag(sigma~_k) = T_I / top-r.
    if singular_values is None:
        raise ValueError("alignment kind 'energy' needs singular_values (the target sigma~).")
    r = b.shape[-1]
    g = (b.mT @ basis) * singular_values[..., None, :]
    top = singular_values[..., :r].square().sum(-1)
    # A zero target (no update at all) has nothing to align to: the loss is then 1, not NaN.
    return 1.0 - _whitened_energy(_gram_cholesky(b), g) / top.clamp_min(torch.finfo(top.dtype).tiny)


ALIGNMENT_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "projection": _projection_alignment,
    "energy": _energy_alignment,
}


def _check_b(B: torch.Tensor, singular_values: torch.Tensor | None) -> None:  # noqa: N803
    if B.dim() < 2:
        raise ValueError(f"B must be (..., d_out, r), got shape {tuple(B.shape)}.")
    if singular_values is not None and singular_values.shape[-1] < B.shape[-1]:
        raise ValueError(
            f"singular_values {tuple(singular_values.shape)} has fewer than r={B.shape[-1]} "
            f"entries."
        )


def alignment_loss(
    B: torch.Tensor,  # noqa: N803 - the paper's names
    basis: torch.Tensor,
    *,
    kind: str = "projection",
    singular_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Subspace alignment loss L_align of colspan(B) to the target, shape (...) (one per layer).

    Args:
        B: (..., d_out, r) LoRA up-projection.
        basis: (..., d_out, k), k >= r, orthonormal target directions U_k.
        kind: ``"projection"``: 1 - (1/r) tr(C^{-1} B^T U_r U_r^T B), C = B^T B, U_r the first
            r columns; equals (1/r) sum_i sin^2 theta_i over the principal angles between
            colspan(B) and span(U_r). ``"energy"``: 1 - tr(C^{-1} G G^T) / sum_{i<=r} sigma~_i^2,
            G = B^T U_k diag(sigma~_k) (all k stored directions); equals T_I / sum_{i<=r}
            sigma~_i^2 of Theorem 1 when k covers the spectrum; in [0, 1] by Ky Fan.
        singular_values: (..., k) sigma~, needed by ``"energy"``.

    Invariant to B -> B R (R invertible). Only r x r Gram matrices, a Cholesky factorisation and
    a triangular solve are used (no QR, no inverse). Finite for rank-deficient B; 1 with zero
    gradient at B = 0 (see ``_gram_cholesky``). Round-off can put it ~1e-7 (float32) outside
    [0, 1]; it is not clamped, so gradients stay intact.
    """
    _check_choice(kind, ALIGNMENT_LOSSES, "alignment kind")
    _check_b(B, singular_values)
    if basis.dim() < 2 or B.shape[-2] != basis.shape[-2] or basis.shape[-1] < B.shape[-1]:
        raise ValueError(
            f"B {tuple(B.shape)} does not fit the target basis {tuple(basis.shape)}: need "
            f"(..., d_out, k) with the same d_out and k >= r (extract targets with r_max >= "
            f"the LoRA rank)."
        )
    with _no_autocast(B):
        b, u, values = _upcast(B, basis, singular_values)
        return ALIGNMENT_LOSSES[kind](b, u, values)


def coefficient_loss(
    B: torch.Tensor,  # noqa: N803 - the paper's names
    A: torch.Tensor,  # noqa: N803
    sigma: torch.Tensor | None,
    singular_values: torch.Tensor,
    *,
    scaling: float = 1.0,
) -> torch.Tensor:
    """Coefficient loss L_coeff in data-weighted units, shape (...) (one per layer).

    Args:
        B: (..., d_out, r); A: (..., r, d_in); sigma: (..., d_in, d_in) input second moment
            (None means Sigma = I, i.e. weight-space units; only for analysis and tests).
        singular_values: (..., k), k >= r, targets sigma~ (the first r are used).
        scaling: the LoRA scaling s.

    L = sum_{i<=r} (sigma^_i - sigma~_i)^2 / sum_{i<=r} sigma~_i^2, sigma^_i = sv(s B A Sigma^{1/2})
    descending. With C = B^T B = L L^T, the sigma^_i^2 are the eigenvalues of the r x r PSD
    matrix N = s^2 L^T (A Sigma A^T) L (same non-zero spectrum as s^2 B A Sigma A^T B^T).

    Gradients at A = 0: sigma^ is like |a| there (a kink; 0 is a valid subgradient). Two things
    would make autograd return inf/NaN instead, and are avoided:
    - tied eigenvalues (at A = 0 all are 0): only ``eigvalsh`` is differentiated, whose backward
      V diag(g) V^T has no 1/(lambda_i - lambda_j) terms (those come from eigenvectors);
    - d sqrt(lambda)/d lambda = inf at lambda = 0: sigma^ is taken as lambda / sqrt(lambda + eps),
      eps = machine epsilon * mean target sigma~^2. It is 0 at lambda = 0, equals
      sqrt(lambda) - eps / (2 sqrt(lambda)) for lambda >> eps (a negligible bias), and its
      derivative is bounded by 1/sqrt(eps); as lambda is quadratic in A, the gradient at A = 0
      is exactly 0.
    A layer whose target singular values are all 0 is normalised by 1 instead of 0.
    """
    _check_b(B, singular_values)
    if A.dim() < 2 or A.shape[-2] != B.shape[-1]:
        raise ValueError(f"A must be (..., r={B.shape[-1]}, d_in), got {tuple(A.shape)}.")
    if sigma is not None and tuple(sigma.shape[-2:]) != (A.shape[-1], A.shape[-1]):
        raise ValueError(
            f"sigma must be (..., d_in, d_in) with d_in={A.shape[-1]}, got {tuple(sigma.shape)}."
        )
    with _no_autocast(B):
        b, a, sig, values = _upcast(B, A, sigma, singular_values)
        r = b.shape[-1]
        target = values[..., :r]
        moment = a @ a.mT if sig is None else a @ sig @ a.mT  # (..., r, r) = A Sigma A^T
        chol = _gram_cholesky(b)
        n = scaling**2 * (chol.mT @ moment @ chol)
        # eigvalsh reads one triangle; symmetrising makes its gradient match the function.
        eigenvalues = torch.linalg.eigvalsh(0.5 * (n + n.mT)).flip(-1).clamp_min(0.0)
        energy = target.square().sum(-1)
        energy = torch.where(energy > 0, energy, torch.ones_like(energy))
        eps = torch.finfo(energy.dtype).eps * energy / r
        adapter_values = eigenvalues * torch.rsqrt(eigenvalues + eps[..., None])
        return (adapter_values - target).square().sum(-1) / energy


# --------------------------------------------------------------------------------------------
# Per-layer targets as buffers, grouped for batching
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetGroup:
    """Layers whose alignment terms are computed as one batch: equal (d_out, k, r, d_in).

    ``d_in`` is the size of the stored Sigma, or None when the group keeps no Sigma (layers
    with and without Sigma are never mixed, so a group has Sigma for all layers or none).
    """

    index: int
    names: tuple[str, ...]
    d_out: int
    k: int
    rank: int
    d_in: int | None

    @property
    def random_misalignment(self) -> float:
        """Expected projection loss of a uniformly random r-dim subspace: 1 - r/d_out."""
        return 1.0 - self.rank / self.d_out


def _layer_ranks(layers: Mapping[str, LayerTarget], rank: int | Mapping[str, int]) -> dict[str, int]:
    if isinstance(rank, Mapping):
        unknown = [name for name in rank if name not in layers]
        if unknown:
            raise ValueError(f"rank given for layer(s) {unknown} that have no target.")
        missing = [name for name in layers if name not in rank]
        if missing:
            raise ValueError(f"no rank given for layer(s) {missing}; give one rank per layer.")
        return {name: int(rank[name]) for name in layers}
    return dict.fromkeys(layers, int(rank))


def _group_key(name: str, target: LayerTarget, rank: int) -> tuple[int, int, int, int]:
    basis = target.basis
    if basis.dim() != 2 or tuple(target.singular_values.shape) != (basis.shape[1],):
        raise ValueError(
            f"target of layer {name!r}: basis must be (d_out, k) and singular_values (k,); "
            f"got {tuple(basis.shape)} and {tuple(target.singular_values.shape)}."
        )
    if not 1 <= rank <= basis.shape[1]:
        raise ValueError(
            f"layer {name!r}: LoRA rank r={rank} exceeds the k={basis.shape[1]} target "
            f"directions stored (or is < 1); re-extract the targets with r_max >= {rank} or "
            f"lower the rank."
        )
    sigma = target.sigma
    if sigma is not None and (sigma.dim() != 2 or sigma.shape[0] != sigma.shape[1]):
        raise ValueError(f"target of layer {name!r}: sigma must be square, got {tuple(sigma.shape)}.")
    return basis.shape[0], basis.shape[1], rank, 0 if sigma is None else sigma.shape[0]


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    # A group of one layer is a view, not a copy.
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


class AlignmentTargets(torch.nn.Module):
    """Spectral targets of all adapted layers as buffers, stacked per shape group.

    Built from {layer name: LayerTarget} (``sadlora.targets``; a ``SpectralTargets`` is accepted
    too) and the LoRA rank r (an int, or {layer name: rank}). Layer names are the keys the
    caller will use in ``stack``'s adapter dict (the trainer's choice, e.g. PEFT module names).

    Buffers of group i (moved by ``.to()``, saved in ``state_dict``, never trained):
        ``group_{i}_basis`` (G, d_out, k), ``group_{i}_singular_values`` (G, k),
        ``group_{i}_total_energy`` (G,), ``group_{i}_sigma`` (G, d_in, d_in) if kept.
    Note that ``.to(torch.bfloat16)`` on an enclosing model would round them too; the losses
    upcast to float32 but cannot restore the lost digits.
    """

    def __init__(
        self,
        targets: Mapping[str, LayerTarget] | SpectralTargets,
        rank: int | Mapping[str, int],
    ) -> None:
        super().__init__()
        layers = dict(getattr(targets, "layers", targets))
        if not layers:
            raise ValueError("AlignmentTargets needs at least one layer target.")
        ranks = _layer_ranks(layers, rank)
        buckets: dict[tuple[int, int, int, int], list[str]] = {}
        for name, target in layers.items():
            buckets.setdefault(_group_key(name, target, ranks[name]), []).append(name)
        groups = []
        for index, ((d_out, k, r, d_in), names) in enumerate(buckets.items()):
            group = TargetGroup(index, tuple(names), d_out, k, r, d_in or None)
            self._register_group(group, [layers[name] for name in names])
            groups.append(group)
        self.groups: tuple[TargetGroup, ...] = tuple(groups)
        self.layer_names: tuple[str, ...] = tuple(n for g in groups for n in g.names)
        self._name_set = frozenset(self.layer_names)

    def _register_group(self, group: TargetGroup, targets: list[LayerTarget]) -> None:
        dtype = _working_dtype(*(t.basis for t in targets))

        def stacked(values) -> torch.Tensor:
            return torch.stack([torch.as_tensor(v).detach().to(dtype) for v in values])

        prefix = f"group_{group.index}_"
        self.register_buffer(prefix + "basis", stacked(t.basis for t in targets))
        self.register_buffer(prefix + "singular_values",
                             stacked(t.singular_values for t in targets))
        self.register_buffer(prefix + "total_energy", stacked(t.total_energy for t in targets))
        if group.d_in is not None:
            self.register_buffer(prefix + "sigma", stacked(t.sigma for t in targets))

    def __len__(self) -> int:
        return len(self.layer_names)

    def basis(self, group: TargetGroup) -> torch.Tensor:
        """(G, d_out, k) stacked U_k of the group's layers."""
        return getattr(self, f"group_{group.index}_basis")

    def singular_values(self, group: TargetGroup) -> torch.Tensor:
        """(G, k) stacked sigma~ of the group's layers."""
        return getattr(self, f"group_{group.index}_singular_values")

    def sigma(self, group: TargetGroup) -> torch.Tensor | None:
        """(G, d_in, d_in) stacked Sigma, or None when the group keeps none."""
        return getattr(self, f"group_{group.index}_sigma", None)

    @property
    def has_sigma(self) -> bool:
        """True when every layer keeps its Sigma (the coefficient loss needs it)."""
        return all(group.d_in is not None for group in self.groups)

    def stack(
        self, adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, with_a: bool = True
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Stack {layer name: (B (d_out, r), A (r, d_in))} into per-group (B, A) batches.

        Returns one (B (G, d_out, r), A (G, r, d_in)) per group, in ``self.groups`` order and
        each group's name order. A is None when ``with_a`` is False or the group keeps no
        Sigma (A's d_in is then not known to agree within the group).
        """
        unknown = [name for name in adapters if name not in self._name_set]
        if unknown:
            raise ValueError(
                f"adapter layer(s) {unknown} have no spectral target; extract targets for "
                f"them or stop adapting them. Known layers: {list(self.layer_names)[:8]}..."
            )
        missing = [name for name in self.layer_names if name not in adapters]
        if missing:
            raise ValueError(f"no adapter (B, A) given for target layer(s) {missing}.")
        result = []
        for group in self.groups:
            bs = [self._checked(name, adapters[name][0], (group.d_out, group.rank), "B")
                  for name in group.names]
            a = None
            if with_a and group.d_in is not None:
                a = _stack([self._checked(name, adapters[name][1], (group.rank, group.d_in), "A")
                            for name in group.names])
            result.append((_stack(bs), a))
        return result

    def _checked(self, name: str, tensor: torch.Tensor, shape: tuple, what: str) -> torch.Tensor:
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"layer {name!r}: {what} has shape {tuple(tensor.shape)}, its target expects "
                f"{shape} (is the LoRA rank the one the targets were built for?)."
            )
        if tensor.device != self.basis(self.groups[0]).device:
            raise ValueError(
                f"layer {name!r}: adapter on {tensor.device} but targets on "
                f"{self.basis(self.groups[0]).device}; move the loss module: sad_loss.to(device)."
            )
        return tensor

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{len(g.names)}x(d_out={g.d_out}, k={g.k}, r={g.rank})"
                           for g in self.groups)
        return f"layers={len(self)}, groups=[{shapes}]"


# --------------------------------------------------------------------------------------------
# The combined loss and its schedule
# --------------------------------------------------------------------------------------------


def _adaptive_schedule(alpha: float, beta: float, progress: torch.Tensor):
    # Align while colspan(B) is off target, shift weight to coefficients as it aligns.
    return alpha * progress, beta * (1.0 - progress)


def _fixed_schedule(alpha: float, beta: float, progress: torch.Tensor):
    return torch.full_like(progress, alpha), torch.full_like(progress, beta)


SCHEDULES: dict[str, Callable[[float, float, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "adaptive": _adaptive_schedule,
    "fixed": _fixed_schedule,
}


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
