"""Spectral mathematics of SAD-LoRA (DESIGN.md §1). Pure torch, no model code.

Notation, for one linear layer ``y = W x``:

- ``delta_w``  dW = W_T - W0, shape (d_out, d_in): the spectral teacher's task update.
- ``sigma``    Sigma = E[x x^T], (d_in, d_in): the *uncentred* second moment of the layer
               input over non-padding tokens.
- ``K``        dW Sigma dW^T, (d_out, d_out), PSD. Its eigenvectors are the left singular
               vectors of the data-weighted update W~ = dW Sigma^{1/2}; its eigenvalues are the
               squared data-weighted singular values sigma~_i^2. No matrix square root needed.
- adapter      M = s B A, B (d_out, r), A (r, d_in), s the LoRA scaling.

Everything is computed in float64 internally and returned in the caller's floating dtype.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .geometry import principal_angles

__all__ = [
    "SecondMoment",
    "DataWeightedSubspace",
    "data_weighted_subspace",
    "data_weighted_gram",
    "sigma_factor",
    "spectral_gap",
    "select_ranks",
    "error_decomposition",
    "optimal_adapter",
    "brute_force_rank_allocation",
]


# --------------------------------------------------------------------------------------------
# Streaming second moment
# --------------------------------------------------------------------------------------------


class SecondMoment:
    """Streaming uncentred second moment Sigma = (1/n) sum_t x_t x_t^T of d-dimensional vectors.

    Accumulates ``S = sum_t x_t x_t^T`` (d, d), the count ``n`` and ``sum_t ||x_t||^4`` (the one
    extra statistic Ledoit-Wolf shrinkage needs) into preallocated buffers; activations are never
    stored. With the default float64 buffers, a float32 (or bf16) input's per-batch product is
    formed in float32 (a preallocated scratch buffer) and then added in float64; float64 inputs
    stay float64 throughout. Masked positions (padding) contribute nothing. The accumulation
    never synchronises with the host, so it can run inside forward hooks on an accelerator.

    Shrinkage conventions follow scikit-learn with ``assume_centered=True``: the empirical
    matrix is the uncentred second moment, the target is mu I with mu = tr(Sigma) / d.
    """

    def __init__(
        self,
        dim: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        if dim <= 0:
            raise ValueError(f"SecondMoment dimension must be positive, got dim={dim}.")
        self.dim = dim
        self.sum = torch.zeros(dim, dim, dtype=dtype, device=device)
        self._count = torch.zeros((), dtype=dtype, device=device)
        self._fourth = torch.zeros((), dtype=dtype, device=device)
        self._scratch: torch.Tensor | None = None  # float32 product buffer, made on first use

    # -- accumulation ------------------------------------------------------------------------
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add vectors ``x`` of shape (N, d) or (batch, seq, d).

        ``mask`` has the leading shape of ``x`` ((N,) or (batch, seq)); nonzero marks a real
        token, zero a padding position that is ignored.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"SecondMoment(dim={self.dim}) got vectors of size {x.shape[-1]} "
                f"(input shape {tuple(x.shape)})."
            )
        work = self._product_dtype(x)
        flat = x.reshape(-1, self.dim).to(work)
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} does not match the leading shape "
                    f"{tuple(x.shape[:-1])} of the input."
                )
            weight = (mask.reshape(-1) != 0).to(flat.dtype)
            # Multiplying instead of boolean indexing keeps shapes static: no host sync.
            flat = flat * weight[:, None]
            self._count += weight.sum()
        else:
            self._count += flat.shape[0]
        if work == self.sum.dtype:
            self.sum.addmm_(flat.T, flat)
        else:  # one batch's product in float32, the running sum over batches in float64
            if self._scratch is None:
                self._scratch = torch.empty_like(self.sum, dtype=work)
            torch.mm(flat.T, flat, out=self._scratch)
            self.sum += self._scratch
        self._fourth += flat.square().sum(-1).square().sum().to(self._fourth.dtype)

    def _product_dtype(self, x: torch.Tensor) -> torch.dtype:
        # Per-batch products run in the input's own precision (at least float32, at most the
        # accumulator's): a float32 model's activations are exact in float32, a float32 GEMM is
        # ~3x faster than a float64 one on CPU, and its relative round-off (~1e-6 over one
        # batch) is far below the sampling error of Sigma. float64 inputs keep float64 products.
        if x.dtype == torch.float64 or self.sum.dtype != torch.float64:
            return self.sum.dtype
        return torch.float32

    def merge(self, other: SecondMoment) -> SecondMoment:
        """Add the statistics of ``other`` (same dim) into this accumulator; returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge SecondMoment(dim={other.dim}) into dim={self.dim}.")
        self.sum += other.sum.to(self.sum)
        self._count += other._count.to(self._count)
        self._fourth += other._fourth.to(self._fourth)
        return self

    def all_reduce(self) -> SecondMoment:
        """Sum the statistics over all processes of the default torch.distributed group."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for tensor in (self.sum, self._count, self._fourth):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return self

    # -- results ------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Number of (non-masked) vectors accumulated."""
        return int(round(float(self._count)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sum": self.sum, "count": self._count, "fourth": self._fourth}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.sum.copy_(state["sum"])
        self._count.copy_(state["count"])
        self._fourth.copy_(state["fourth"])

    def mean(self, shrinkage: str | None = None) -> torch.Tensor:
        """Sigma = S / n, shape (d, d), optionally shrunk toward mu I.

        shrinkage: None, ``"ledoit_wolf"`` or ``"oas"`` (equal to scikit-learn's ``LedoitWolf``
        / ``OAS`` with ``assume_centered=True`` on the same vectors).
        """
        n = float(self._count)
        if n <= 0:
            raise ValueError(
                "SecondMoment has no vectors: the calibration set is empty or every position "
                "was masked as padding. Pass a non-empty dataloader with an attention mask "
                "that marks real tokens."
            )
        empirical = self.sum / n
        if shrinkage is None:
            return empirical
        if shrinkage not in _SHRINKAGE:
            raise ValueError(
                f"unknown shrinkage {shrinkage!r}; choose None, {sorted(_SHRINKAGE)}."
            )
        intensity = _SHRINKAGE[shrinkage](self, empirical, n)
        mu = torch.diagonal(empirical).sum() / self.dim
        eye = torch.eye(self.dim, dtype=empirical.dtype, device=empirical.device)
        return (1.0 - intensity) * empirical + intensity * mu * eye

    def shrinkage_intensity(self, shrinkage: str) -> float:
        """The shrinkage coefficient in [0, 1] that ``mean(shrinkage)`` uses."""
        n = float(self._count)
        return float(_SHRINKAGE[shrinkage](self, self.sum / n, n))


def _ledoit_wolf_intensity(stats: SecondMoment, empirical: torch.Tensor, n: float) -> torch.Tensor:
    # Ledoit & Wolf (2004), in scikit-learn's form: beta = (sum_t ||x_t||^4 / n - ||S||_F^2)
    # / (d n), delta = ||S - mu I||_F^2 / d, intensity = min(beta, delta) / delta.
    d = stats.dim
    mu = torch.diagonal(empirical).sum() / d
    frob2 = empirical.square().sum()
    beta = (stats._fourth / n - frob2) / (d * n)
    delta = (frob2 - 2.0 * mu * torch.diagonal(empirical).sum() + d * mu**2) / d
    beta = torch.minimum(beta, delta)
    return torch.where(delta > 0, beta / delta.clamp_min(torch.finfo(delta.dtype).tiny),
                       torch.zeros_like(delta))


def _oas_intensity(stats: SecondMoment, empirical: torch.Tensor, n: float) -> torch.Tensor:
    # Chen et al. (2010) oracle approximating shrinkage, in scikit-learn's form.
    d = stats.dim
    alpha = empirical.square().mean()
    mu = torch.diagonal(empirical).sum() / d
    numerator = alpha + mu**2
    denominator = (n + 1.0) * (alpha - mu**2 / d)
    if float(denominator) == 0.0:
        return torch.ones((), dtype=empirical.dtype, device=empirical.device)
    return torch.clamp(numerator / denominator, max=1.0)


_SHRINKAGE = {"ledoit_wolf": _ledoit_wolf_intensity, "oas": _oas_intensity}


# --------------------------------------------------------------------------------------------
# Data-weighted subspace
# --------------------------------------------------------------------------------------------


@dataclass
class DataWeightedSubspace:
    """Top-k spectral description of W~ = dW Sigma^{1/2}.

    basis: (d_out, k) left singular vectors U_k (orthonormal, deterministic signs).
    singular_values: (k,) sigma~_1 >= ... >= sigma~_k >= 0.
    total_energy: () tr(K) = ||W~||_F^2 = sum over the WHOLE spectrum of sigma~_i^2.
    """

    basis: torch.Tensor
    singular_values: torch.Tensor
    total_energy: torch.Tensor

    def tail(self, r: int) -> torch.Tensor:
        """sum_{i>r} sigma~_i^2 = tr(K) - sum_{i<=r} sigma~_i^2 (needs r <= k)."""
        return self.total_energy - self.singular_values[:r].square().sum()


def data_weighted_gram(delta_w: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
    """K = dW Sigma dW^T in float64, shape (d_out, d_out); Sigma = I when ``sigma`` is None."""
    dw = delta_w.to(torch.float64)
    if sigma is None:
        return dw @ dw.T
    _check_sigma(sigma, dw.shape[1])
    return dw @ sigma.to(torch.float64) @ dw.T


def sigma_factor(sigma: torch.Tensor) -> torch.Tensor:
    """F (d_in, d_in) in float64 with F^T F = Sigma: F = diag(sqrt(lambda)) Q^T from
    Sigma = Q diag(lambda) Q^T (negative round-off eigenvalues clipped to 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma.to(torch.float64))
    return eigenvalues.clamp_min(0.0).sqrt()[:, None] * eigenvectors.T


def _check_sigma(sigma: torch.Tensor, d_in: int) -> None:
    if sigma.shape != (d_in, d_in):
        raise ValueError(
            f"sigma must be the (d_in, d_in) = ({d_in}, {d_in}) input second moment of the "
            f"layer, got shape {tuple(sigma.shape)}."
        )


def _fix_signs(basis: torch.Tensor) -> torch.Tensor:
    # Singular vectors are defined up to sign: make each column's largest-|.| entry positive.
    index = basis.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(basis, 0, index))
    return basis * torch.where(signs == 0, torch.ones_like(signs), signs)


def data_weighted_subspace(
    delta_w: torch.Tensor | None,
    sigma: torch.Tensor | None = None,
    k: int | None = None,
    *,
    gram: torch.Tensor | None = None,
    inputs: torch.Tensor | None = None,
    factor: torch.Tensor | None = None,
) -> DataWeightedSubspace:
    """Top-k left singular vectors and values of W~ = dW Sigma^{1/2}, and tr(K).

    Equivalent routes (DESIGN.md §1), agreeing to float64 round-off:

    - ``sigma`` (d_in, d_in): K = dW Sigma dW^T, then ``eigh(K)``. ``sigma=None`` means I.
    - ``gram`` (d_out, d_out): an already accumulated K = (1/n) sum_t (dW x_t)(dW x_t)^T;
      ``delta_w`` may then be None. Memory d_out^2 instead of d_in^2.
    - ``factor`` F (m, d_in) with Sigma = F^T F: SVD of Z = dW F^T (d_out, m).
    - ``inputs`` X (n, d_in), the calibration vectors themselves, with Sigma = X^T X / n: the
      factor route with F = X / sqrt(n), the seed's "implicit SVD", cheap when n < d_in.

    With ``sigma`` (or I) and d_out > d_in (e.g. an MLP up-projection), K is (d_out, d_out) but
    has rank <= d_in, and ``eigh`` of it is slow (the slow case of LAPACK's divide and conquer
    when K is exactly rank-deficient): the factor route is taken instead, with
    F = ``sigma_factor(sigma)`` (F = I for Sigma = I), 3-20x faster (bench/wide_layers.py).
    Layers sharing one Sigma can pass ``factor`` to compute F once.

    Args:
        k: number of leading directions kept (default: all d_out).
    """
    if sum(x is not None for x in (sigma, gram, inputs, factor)) > 1:
        raise ValueError("give at most one of sigma, gram, inputs and factor.")
    reference = gram if gram is not None else delta_w
    if reference is None:
        raise ValueError("data_weighted_subspace needs delta_w (or gram=K).")
    out_dtype = reference.dtype if reference.is_floating_point() else torch.float32
    d_out = reference.shape[0]
    k = d_out if k is None else k
    if not 1 <= k <= d_out:
        raise ValueError(f"k must be in [1, d_out={d_out}], got k={k}.")

    for name, given in (("inputs", inputs), ("factor", factor)):
        if given is not None and (given.dim() != 2 or given.shape[1] != delta_w.shape[1]):
            raise ValueError(
                f"{name} must be (n, d_in={delta_w.shape[1]}), got {tuple(given.shape)}."
            )
    if inputs is not None:
        factor = inputs.to(torch.float64) / inputs.shape[0] ** 0.5
    if sigma is not None:
        _check_sigma(sigma, delta_w.shape[1])
    wide = gram is None and factor is None and d_out > delta_w.shape[1]
    if wide and sigma is not None:
        factor = sigma_factor(sigma)
    if factor is not None or wide:
        z = delta_w.to(torch.float64)  # Sigma = I (wide, no sigma): Z = dW itself
        if factor is not None:
            z = z @ factor.to(torch.float64).T
        u, s, _ = torch.linalg.svd(z, full_matrices=k > min(z.shape))
        values = torch.zeros(d_out, dtype=torch.float64, device=z.device)
        values[: s.shape[0]] = s
        basis, total = u[:, :k], z.square().sum()
    else:
        kernel = gram.to(torch.float64) if gram is not None else data_weighted_gram(delta_w, sigma)
        kernel = 0.5 * (kernel + kernel.T)  # exact symmetry for eigh
        eigenvalues, eigenvectors = torch.linalg.eigh(kernel)  # ascending
        values = eigenvalues.flip(0).clamp_min(0.0).sqrt()
        basis, total = eigenvectors.flip(1)[:, :k], torch.diagonal(kernel).sum()
    return DataWeightedSubspace(
        basis=_fix_signs(basis).to(out_dtype),
        singular_values=values[:k].to(out_dtype),
        total_energy=total.to(out_dtype),
    )


def spectral_gap(singular_values: torch.Tensor, r: int) -> torch.Tensor:
    """sigma~_r / sigma~_{r+1} (1-based); inf when sigma~_{r+1} = 0 or r is the last index."""
    if not 1 <= r <= singular_values.shape[-1]:
        raise ValueError(f"rank r={r} outside [1, {singular_values.shape[-1]}].")
    if r == singular_values.shape[-1] or float(singular_values[r]) == 0.0:
        return torch.full((), float("inf"), dtype=singular_values.dtype)
    return singular_values[r - 1] / singular_values[r]


# --------------------------------------------------------------------------------------------
# Rank selection (Theorem 2)
# --------------------------------------------------------------------------------------------


def _as_mapping(values: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> dict:
    if isinstance(values, Mapping):
        return dict(values)
    return {str(i): v for i, v in enumerate(values)}


def select_ranks(
    singular_values_by_layer: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    energy_threshold: float = 0.9,
    min_rank: int = 1,
    max_rank: int | None = None,
    total_budget: int | None = None,
    total_energy_by_layer: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | None = None,
) -> dict[str, int]:
    """Per-layer ranks from the data-weighted spectrum (Theorem 2).

    Without a budget: r*(eps) = min { r : tail(r) <= eps tr(K) } with eps = 1 - energy_threshold,
    i.e. the smallest rank keeping ``energy_threshold`` of the data-weighted energy, clipped to
    [min_rank, max_rank]. tail(r) = tr(K) - sum_{i<=r} sigma~_i^2 uses tr(K) over the whole
    spectrum when ``total_energy_by_layer`` is given (strongly recommended: the stored
    singular values are usually only the top r_max); otherwise the sum of the given squares.

    With ``total_budget``: ranks r_l in [min_rank, max_rank] summing to the budget that minimise
    sum_l tail_l(r_l), found greedily (each step gives one rank to the layer with the largest
    next sigma~^2), which is exact because each tail is convex in r.

    Returns {layer name: rank} (names "0", "1", ... for a sequence input).
    """
    spectra = {name: v.detach().to(torch.float64).flatten() for name, v in
               _as_mapping(singular_values_by_layer).items()}
    if not spectra:
        raise ValueError("select_ranks needs at least one layer's singular values.")
    if not 0.0 < energy_threshold <= 1.0:
        raise ValueError(
            f"energy_threshold is the fraction of data-weighted energy to keep, in (0, 1]; "
            f"got {energy_threshold}."
        )
    totals = (
        {n: float(t) for n, t in _as_mapping(total_energy_by_layer).items()}
        if total_energy_by_layer is not None
        else {n: float(v.square().sum()) for n, v in spectra.items()}
    )
    if set(totals) != set(spectra):
        raise ValueError("total_energy_by_layer must have the same layers as the spectra.")
    caps = {n: v.shape[0] if max_rank is None else min(max_rank, v.shape[0])
            for n, v in spectra.items()}
    if min_rank < 0 or any(min_rank > cap for cap in caps.values()):
        raise ValueError(
            f"min_rank={min_rank} exceeds the available spectrum of a layer "
            f"(smallest cap {min(caps.values())})."
        )
    if total_budget is None:
        return {n: _threshold_rank(v, totals[n], energy_threshold, min_rank, caps[n])
                for n, v in spectra.items()}
    return _greedy_allocation(spectra, total_budget, min_rank, caps)


def _threshold_rank(values: torch.Tensor, total: float, keep: float, low: int, high: int) -> int:
    if total <= 0.0:
        return low  # a zero update: nothing to keep
    kept = torch.cumsum(values.square(), 0)
    # A relative slack of 1e-12 so that e.g. keep = 1.0 is met despite round-off.
    reached = torch.nonzero(kept >= keep * total * (1 - 1e-12))
    rank = int(reached[0]) + 1 if reached.numel() else values.shape[0]
    return max(low, min(high, rank))


def _greedy_allocation(spectra: dict, budget: int, low: int, caps: dict) -> dict[str, int]:
    if not len(spectra) * low <= budget <= sum(caps.values()):
        raise ValueError(
            f"total_budget={budget} is infeasible: it must lie in "
            f"[{len(spectra) * low}, {sum(caps.values())}] for {len(spectra)} layers with "
            f"min_rank={low} and the given max ranks."
        )
    ranks = dict.fromkeys(spectra, low)
    for _ in range(budget - len(spectra) * low):
        open_layers = [n for n in spectra if ranks[n] < caps[n]]
        best = max(open_layers, key=lambda n: float(spectra[n][ranks[n]]))
        ranks[best] += 1
    return ranks


def brute_force_rank_allocation(
    singular_values_by_layer: Sequence[torch.Tensor], total_budget: int, min_rank: int,
    max_rank: int,
) -> tuple[int, ...]:
    """Exhaustive minimiser of the summed tails (an oracle for tests; exponential cost)."""
    best, best_tail = None, float("inf")
    values = [v.to(torch.float64) for v in singular_values_by_layer]
    ranges = [range(min_rank, min(max_rank, v.shape[0]) + 1) for v in values]
    for ranks in itertools.product(*ranges):
        if sum(ranks) != total_budget:
            continue
        tail = sum(float(v[r:].square().sum()) for v, r in zip(values, ranks))
        if tail < best_tail - 1e-12:
            best, best_tail = ranks, tail
    return best


# --------------------------------------------------------------------------------------------
# Exact error decomposition (Theorem 1) and the data-weighted Eckart-Young optimum
# --------------------------------------------------------------------------------------------


def error_decomposition(
    delta_w: torch.Tensor,
    sigma: torch.Tensor | None,
    B: torch.Tensor,  # noqa: N803 - the paper's names
    A: torch.Tensor,  # noqa: N803
    scaling: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Exact decomposition of E||(dW - s B A) x||^2 (Theorem 1, exact form, DESIGN.md §1).

    Args:
        delta_w: (d_out, d_in); sigma: (d_in, d_in) or None for I;
        B: (d_out, r) of full column rank; A: (r, d_in); scaling: s.

    Returns float64 scalars:
        total          tr((dW - M) Sigma (dW - M)^T), computed directly, M = s B A
        misalignment   T_I   = sum_{i<=r} sigma~_i^2 - tr(P K),           P = B (B^T B)^-1 B^T
        coefficient    T_II  = tr(P K) - 2 tr(dW Sigma M^T) + tr(M Sigma M^T)
        rank_residual  T_III = sum_{i>r} sigma~_i^2
        alignment_loss L_align = (1/r) sum_i sin^2 theta_i, angles between colspan(B), span(U_r)
        lower_bound    (sigma~_r^2 - sigma~_{r+1}^2) r L_align   <= T_I
        upper_bound    sigma~_1^2 r L_align                       >= T_I
    """
    dw = delta_w.to(torch.float64)
    d_out, d_in = dw.shape
    if B.dim() != 2 or A.dim() != 2 or B.shape[0] != d_out or A.shape[1] != d_in or \
            B.shape[1] != A.shape[0]:
        raise ValueError(
            f"adapter shapes B {tuple(B.shape)} and A {tuple(A.shape)} do not fit "
            f"delta_w {tuple(dw.shape)}: need B (d_out, r) and A (r, d_in)."
        )
    sig = torch.eye(d_in, dtype=torch.float64) if sigma is None else sigma.to(torch.float64)
    _check_sigma(sig, d_in)
    b, a = B.to(torch.float64), A.to(torch.float64)
    r = b.shape[1]
    m = scaling * b @ a
    kernel = dw @ sig @ dw.T
    eigenvalues = torch.linalg.eigvalsh(0.5 * (kernel + kernel.T)).flip(0).clamp_min(0.0)
    total_energy = torch.trace(kernel)
    top_r = eigenvalues[:r].sum()
    # tr(P K) = tr((B^T B)^{-1} B^T K B) via a Cholesky solve: no explicit inverse.
    chol = torch.linalg.cholesky(b.T @ b)
    projected = torch.trace(torch.cholesky_solve(b.T @ kernel @ b, chol))
    cross = torch.trace(dw @ sig @ m.T)
    adapter_energy = torch.trace(m @ sig @ m.T)
    error = dw - m
    total = torch.trace(error @ sig @ error.T)

    subspace = data_weighted_subspace(dw, sig, k=r)
    angles = principal_angles(b, subspace.basis)
    alignment = torch.sin(angles).square().mean()
    next_eigenvalue = eigenvalues[r] if r < d_out else eigenvalues.new_zeros(())
    return {
        "total": total,
        "misalignment": top_r - projected,
        "coefficient": projected - 2.0 * cross + adapter_energy,
        "rank_residual": total_energy - top_r,
        "alignment_loss": alignment,
        "lower_bound": (eigenvalues[r - 1] - next_eigenvalue) * r * alignment,
        "upper_bound": eigenvalues[0] * r * alignment,
        "total_energy": total_energy,
    }


def optimal_adapter(
    delta_w: torch.Tensor, sigma: torch.Tensor | None, r: int, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-weighted Eckart-Young optimum of rank r: B = U_r, A = U_r^T dW / s.

    s B A = U_r U_r^T dW minimises E||(dW - M) x||^2 over rank-r M; its error is exactly
    tail(r) = sum_{i>r} sigma~_i^2. Returns (B (d_out, r), A (r, d_in)) in delta_w's dtype.
    """
    basis = data_weighted_subspace(delta_w, sigma, k=r).basis
    return basis, (basis.T.to(delta_w.dtype) @ delta_w) / scaling
