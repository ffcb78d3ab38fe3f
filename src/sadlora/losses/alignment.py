"""Spectral losses of an adapter against its layer's target: alignment and coefficients.

``alignment_loss`` (projection / energy alignment of colspan(B) to the target directions) and
``coefficient_loss`` (the adapter's data-weighted singular values against the target's), with
their r x r Gram helpers (jittered Cholesky of C = B^T B, whitened energy).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .common import _check_choice, _no_autocast, _upcast

# Relative jitter added to C = B^T B (times its mean eigenvalue). It must dominate the round-off
# of forming C, else Cholesky of a (near) rank-deficient C fails; it must stay small enough to
# bias tr(C^-1 X) only by about jitter * cond(C).
_RELATIVE_JITTER = {torch.float32: 1e-6, torch.float64: 1e-13}


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
