"""One synthetic linear layer: spectra, input covariances, dW, and training adapters on it.

``make_problem`` builds dW = U diag(s) V^T Sigma^{-1/2} with Haar-random orthonormal U, V, so
that the data-weighted singular values sv(dW Sigma^{1/2}) are exactly the chosen spectrum s
(normalised to tr K = 1) for any positive definite Sigma. ``train_adapters`` trains rank-r
students B A on it by distillation (+ alignment). Float64 throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..losses import alignment_loss
from ..spectral import DataWeightedSubspace, data_weighted_subspace, error_decomposition

if TYPE_CHECKING:  # only for annotations: synthetic.py imports this module
    from .synthetic import SyntheticConfig

__all__ = ["SPECTRA", "COVARIANCES", "METHODS", "OPTIMIZERS", "Problem", "make_problem",
           "gap_spectrum", "random_orthonormal", "psd_power", "random_adapter",
           "decomposition_row", "initial_adapter", "train_adapters"]

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# Spectra, input covariances and the layer
# --------------------------------------------------------------------------------------------


def _sharp(k: int, cfg: SyntheticConfig) -> torch.Tensor:
    return cfg.sharp_decay ** torch.arange(k, dtype=F64)


def _gradual(k: int, cfg: SyntheticConfig) -> torch.Tensor:
    return torch.arange(1, k + 1, dtype=F64) ** (-cfg.power_exponent)


def _flat(k: int, cfg: SyntheticConfig) -> torch.Tensor:
    return torch.ones(k, dtype=F64)


# name -> unnormalised data-weighted singular values (k,), descending
SPECTRA: dict[str, Callable[[int, SyntheticConfig], torch.Tensor]] = {
    "sharp": _sharp, "gradual": _gradual, "flat": _flat}


def gap_spectrum(k: int, rank: int, gap: float, support: int) -> torch.Tensor:
    """sigma~ = 1 for i <= rank, 1/gap for rank < i <= support, 0 beyond: gamma_rank = gap."""
    values = torch.zeros(k, dtype=F64)
    values[:support] = 1.0 / gap
    values[:rank] = 1.0
    return values


def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-distributed (rows, cols) matrix with orthonormal columns (QR with sign fix)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _exponential_eigenvalues(d: int, cfg: SyntheticConfig) -> torch.Tensor:
    return cfg.condition_number ** (-torch.linspace(0.0, 1.0, d, dtype=F64))


def _identity_cov(d: int, cfg: SyntheticConfig, g: torch.Generator) -> torch.Tensor:
    return torch.eye(d, dtype=F64)


def _exponential_cov(d: int, cfg: SyntheticConfig, g: torch.Generator) -> torch.Tensor:
    return torch.diag(_exponential_eigenvalues(d, cfg))


def _rotated_cov(d: int, cfg: SyntheticConfig, g: torch.Generator) -> torch.Tensor:
    q = random_orthonormal(d, d, g)
    return q @ torch.diag(_exponential_eigenvalues(d, cfg)) @ q.T


# name -> population second moment Sigma (d_in, d_in)
COVARIANCES: dict[str, Callable[[int, SyntheticConfig, torch.Generator], torch.Tensor]] = {
    "identity": _identity_cov, "exponential": _exponential_cov, "rotated": _rotated_cov}


def psd_power(matrix: torch.Tensor, power: float) -> torch.Tensor:
    """matrix^power for a symmetric positive definite matrix, through eigh."""
    eigenvalues, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * eigenvalues.clamp_min(0.0) ** power) @ vectors.T


@dataclass
class Problem:
    """One layer: dW (d_out, d_in), Sigma (d_in, d_in), Sigma^{1/2} and dW's data-weighted SVD."""

    delta_w: torch.Tensor
    sigma: torch.Tensor
    root: torch.Tensor
    subspace: DataWeightedSubspace

    @property
    def energy(self) -> float:
        return float(self.subspace.total_energy)

    def tail(self, rank: int) -> float:
        """Smallest error of any rank-r adapter (data-weighted Eckart-Young)."""
        return float(self.subspace.tail(rank)) if rank > 0 else self.energy

    def error(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """E||(dW - B A) x||^2 = tr((dW - BA) Sigma (dW - BA)^T); batched over B, A (..., )."""
        residual = self.delta_w - b @ a
        return ((residual @ self.sigma) * residual).sum((-1, -2))


def make_problem(values: torch.Tensor, sigma: torch.Tensor, d_out: int,
                 generator: torch.Generator) -> Problem:
    """dW = U diag(s) V^T Sigma^{-1/2}, s = values / ||values|| so that tr K = 1 exactly."""
    s = values / values.norm()
    u = random_orthonormal(d_out, s.shape[0], generator)
    v = random_orthonormal(sigma.shape[0], s.shape[0], generator)
    delta_w = (u * s) @ v.T @ psd_power(sigma, -0.5)
    return Problem(delta_w, sigma, psd_power(sigma, 0.5), data_weighted_subspace(delta_w, sigma))


def random_adapter(problem: Problem, rank: int, g: torch.Generator):
    """Gaussian (B, A) rescaled so that ||B A Sigma^{1/2}||_F^2 = tr K (scale 1 ~ dW's size)."""
    b = torch.randn(problem.delta_w.shape[0], rank, generator=g, dtype=F64)
    a = torch.randn(rank, problem.delta_w.shape[1], generator=g, dtype=F64)
    size = float(((b @ a @ problem.sigma) * (b @ a)).sum())
    factor = (problem.energy / size) ** 0.25
    return b * factor, a * factor


def decomposition_row(problem: Problem, b, a, scaling: float = 1.0) -> dict:
    """error_decomposition as floats, relative to tr K, with the identity and bound checks."""
    parts = {k: float(v) for k, v in error_decomposition(
        problem.delta_w, problem.sigma, b, a, scaling=scaling).items()}
    terms = parts["misalignment"] + parts["coefficient"] + parts["rank_residual"]
    tol = 1e-12 * parts["total_energy"]  # round-off slack for bounds that are tight (flat case)
    return {
        "T_I": parts["misalignment"] / problem.energy,
        "T_II": parts["coefficient"] / problem.energy,
        "T_III": parts["rank_residual"] / problem.energy,
        "total": parts["total"] / problem.energy,
        "identity_residual": abs(parts["total"] - terms) / parts["total"],
        "bounds_hold": parts["lower_bound"] - tol <= parts["misalignment"]
        <= parts["upper_bound"] + tol,
        "lower_bound": parts["lower_bound"] / problem.energy,
        "upper_bound": parts["upper_bound"] / problem.energy,
        "alignment_loss": parts["alignment_loss"],
    }


# --------------------------------------------------------------------------------------------
# Training a rank-r student
# --------------------------------------------------------------------------------------------

# method name -> alignment loss kind (None: distillation alone)
METHODS: dict[str, str | None] = {"kd": None, "sad_projection": "projection",
                                  "sad_energy": "energy"}


def initial_adapter(problem: Problem, rank: int, cfg: SyntheticConfig, g: torch.Generator):
    """Small random B and A (std init_std). B = 0 would make (B^T B)^{-1} in L_align undefined."""
    b = cfg.init_std * torch.randn(problem.delta_w.shape[0], rank, generator=g, dtype=F64)
    a = cfg.init_std * torch.randn(rank, problem.delta_w.shape[1], generator=g, dtype=F64)
    return b, a


def _minibatch_error(problem: Problem, b, a, cfg: SyntheticConfig, g: torch.Generator):
    # Distillation loss: MSE between teacher (dW x) and student (B A x) on fresh x ~ N(0, Sigma),
    # one minibatch shared by all students of the stack. b (M, d_out, r), a (M, r, d_in) -> (M,)
    x = torch.randn(cfg.batch_size, cfg.d_in, generator=g, dtype=F64) @ problem.root
    residual = x @ problem.delta_w.T - (x @ a.transpose(-1, -2)) @ b.transpose(-1, -2)
    return residual.square().sum(-1).mean(-1)


def _exact_error(problem: Problem, b, a, cfg: SyntheticConfig, g: torch.Generator | None):
    return problem.error(b, a)


# optimiser name -> builder(params, lr)
OPTIMIZERS: dict[str, Callable] = {
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
}


def _alignment_terms(problem: Problem, b: torch.Tensor, kinds: list[str | None], k: int):
    """Sum over the stack of L_align of each student, of the kind its method asks for."""
    basis, values = problem.subspace.basis[:, :k], problem.subspace.singular_values[:k]
    total = b.new_zeros(())
    for kind in dict.fromkeys(k for k in kinds if k is not None):  # first-seen order
        rows = [i for i, other in enumerate(kinds) if other == kind]
        total = total + alignment_loss(b[rows], basis, kind=kind, singular_values=values).sum()
    return total


def train_adapters(problem: Problem, init: tuple[torch.Tensor, torch.Tensor], methods: list[str],
                   cfg: SyntheticConfig, *, optimizer: str, lr: float, steps: int,
                   data_seed: torch.Generator | None = None) -> list[dict]:
    """Train one student per method from the SAME init on the SAME data; one dict per method.

    init: (B0 (d_out, r), A0 (r, d_in)). data_seed: the stream of fresh minibatches; None
    trains on the exact expected error instead (no sampling noise).

    Loss: error / tr K (+ alpha L_align). The students are stacked (M, d_out, r) and trained
    together; the optimisers act elementwise and each loss term touches one student only, so
    this equals M separate runs while sampling each minibatch once. The curve is the exact
    excess (error - tail(r)) / tr K every ``eval_every`` steps.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}.")
    kinds = [METHODS[m] for m in methods]
    b0, a0 = init
    rank = b0.shape[1]
    b = b0.expand(len(methods), -1, -1).clone().requires_grad_()
    a = a0.expand(len(methods), -1, -1).clone().requires_grad_()
    opt = OPTIMIZERS[optimizer]([b, a], lr)
    loss_fn = _exact_error if data_seed is None else _minibatch_error
    k = min(problem.delta_w.shape[0], max(rank, cfg.target_k))
    optimum, evaluated, excess = problem.tail(rank), [], []
    for step in range(steps + 1):
        if step % cfg.eval_every == 0 or step == steps:
            with torch.no_grad():
                evaluated.append(step)
                excess.append(((problem.error(b, a) - optimum) / problem.energy).tolist())
        if step == steps:
            break
        loss = loss_fn(problem, b, a, cfg, data_seed).sum() / problem.energy
        loss = loss + cfg.alpha * _alignment_terms(problem, b, kinds, k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    runs = []
    for m, method in enumerate(methods):
        curve = [e[m] for e in excess]
        reached = next((s for s, e in zip(evaluated, curve) if e <= cfg.delta), None)
        runs.append({"method": method, "B": b[m].detach(), "A": a[m].detach(), "steps": evaluated,
                     "excess": curve, "steps_to_delta": reached})
    return runs
