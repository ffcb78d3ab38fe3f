"""Spectral analysis of one trained adapter layer against its targets (DESIGN.md §1). Pure torch.

For one adapted linear layer with pretrained weight W0 (d_out, d_in), LoRA factors
B (d_out, r), A (r, d_in), scaling s, the spectral teacher's update dW (d_out, d_in), the input
second moment Sigma (d_in, d_in) and the target U_r, sigma~:

- ``adapter_update_factors``: the effective update M = W_adapted - W0 written as M = Q C with Q
  an orthonormal basis of its column space (d_out, rho). For plain LoRA M = s B A and
  colspan(Q) = colspan(B); for PiSSA the base weight was replaced by W0 - s B0 A0, so
  M = s B A - s B0 A0 and Q spans colspan([B, B0]) (rho <= 2r).
- ``data_weighted_singular_values``: sv(M Sigma^{1/2}) = sqrt(eig(C Sigma C^T)), the units of
  the targets sigma~ (no matrix square root).
- ``effective_rank``: exp of the entropy of the normalised singular values (Roy & Vetterli).
- ``intruder_dimensions``: top-k left singular vectors of the adapted weight W0 + M whose largest
  |cosine| with every left singular vector of W0 is below a threshold (Shuttleworth et al.,
  "LoRA vs full fine-tuning: an illusion of equivalence", 2024), with
  ``random_direction_similarity``, the same largest |cosine| of random unit vectors: the value
  against which a threshold means something.
- ``analyse_layer``: all of it plus principal angles / alignment of colspan(B) with span(U_r)
  and the exact decomposition E||(dW - M) x||^2 = T_I + T_II + T_III (``error_decomposition``).
"""

from __future__ import annotations

import math

import torch

from .geometry import alignment_score, principal_angles
from .spectral import error_decomposition

__all__ = ["adapter_update_factors", "data_weighted_singular_values", "effective_rank",
           "intruder_dimensions", "random_direction_similarity", "analyse_layer"]

F64 = torch.float64


def adapter_update_factors(b: torch.Tensor, a: torch.Tensor, scaling: float = 1.0,
                           shift: torch.Tensor | None = None, rtol: float = 1e-6) -> tuple:
    """(Q (d_out, rho), C (rho, d_in)), float64, with Q^T Q = I and Q C = s B A + shift.

    ``shift`` (d_out, d_in): W_base_layer - W0, nonzero only when the adapter changed the base
    weight (PiSSA's residual, = -s B0 A0, low rank). rho is the numerical rank of the column
    space (singular values above ``rtol`` times the largest), so a B with dead columns still
    gives a full-column-rank Q, which the exact decomposition needs.
    """
    if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"LoRA factors must be B (d_out, r) and A (r, d_in); got "
                         f"{tuple(b.shape)} and {tuple(a.shape)}.")
    columns, rows = [b.to(F64)], [scaling * a.to(F64)]
    if shift is not None:
        if tuple(shift.shape) != (b.shape[0], a.shape[1]):
            raise ValueError(f"shift {tuple(shift.shape)} must be (d_out, d_in) = "
                             f"{(b.shape[0], a.shape[1])}.")
        u, s, vh = torch.linalg.svd(shift.to(F64), full_matrices=False)
        keep = s > rtol * s[0] if float(s[0]) > 0 else s > 0
        columns.append(u[:, keep])
        rows.append(s[keep, None] * vh[keep])
    stacked = torch.cat(columns, 1)
    u, s, _ = torch.linalg.svd(stacked, full_matrices=False)
    rank = int((s > rtol * s[0]).sum()) if float(s[0]) > 0 else 0
    if rank == 0:
        raise ValueError("the adapter's B is zero: its column space is empty (an untrained "
                         "gaussian-init adapter has B = 0). Nothing to analyse.")
    q = u[:, :rank]
    update = stacked @ torch.cat(rows, 0)
    return q, q.T @ update


def data_weighted_singular_values(q: torch.Tensor, c: torch.Tensor,
                                  sigma: torch.Tensor) -> torch.Tensor:
    """sv(Q C Sigma^{1/2}) descending, (rho,) float64: sqrt of the eigenvalues of C Sigma C^T
    (Q has orthonormal columns, so it does not change singular values)."""
    gram = c.to(F64) @ sigma.to(F64) @ c.to(F64).T
    values = torch.linalg.eigvalsh(0.5 * (gram + gram.T)).flip(0)
    return values.clamp_min(0.0).sqrt()


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(-sum p_i log p_i), p_i = s_i / sum s (Roy & Vetterli 2007): 1 for one nonzero value,
    n for n equal values, 0 for all zeros."""
    values = singular_values.to(F64).clamp_min(0.0)
    total = float(values.sum())
    if total == 0.0:
        return 0.0
    p = values / total
    return math.exp(float(-(torch.xlogy(p, p)).sum()))


def _left_singular_vectors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, _ = torch.linalg.svd(weight.to(F64), full_matrices=False)
    return u, s


def intruder_dimensions(w0: torch.Tensor, w_adapted: torch.Tensor, *, top_k: int = 10,
                        threshold: float = 0.5, w0_basis: torch.Tensor | None = None) -> dict:
    """Intruder dimensions of ``w_adapted`` (d_out, d_in) relative to ``w0`` (same shape).

    For each of the top-k left singular vectors u_i of w_adapted: similarity_i =
    max_j |<u_i, v_j>| over ALL left singular vectors v_j of w0 (min(d_out, d_in) of them);
    u_i is an intruder when similarity_i < threshold. Returns {"count", "similarities" (k,),
    "top_k", "threshold"}. ``w0_basis`` (d_out, m) reuses an SVD of w0 already computed.
    """
    if w0.shape != w_adapted.shape:
        raise ValueError(f"w0 {tuple(w0.shape)} and w_adapted {tuple(w_adapted.shape)} differ.")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"intruder threshold is a |cosine| in (0, 1], got {threshold}.")
    basis = _left_singular_vectors(w0)[0] if w0_basis is None else w0_basis.to(F64)
    top, _ = _left_singular_vectors(w_adapted)
    k = min(top_k, top.shape[1])
    similarity = (basis.T @ top[:, :k]).abs().amax(0)
    return {"count": int((similarity < threshold).sum()), "similarities": similarity.tolist(),
            "top_k": k, "threshold": threshold}


def random_direction_similarity(basis: torch.Tensor, *, samples: int = 1000,
                                threshold: float = 0.5,
                                generator: torch.Generator | None = None) -> dict:
    """What a random direction scores in ``intruder_dimensions``: max_j |<g, v_j>| for unit
    vectors g uniform on the sphere of R^d_out against the columns v_j of ``basis`` (d_out, m).

    Returns {"mean", "p95", "intruder_fraction"} (fraction of random directions that would be
    counted as intruders at ``threshold``). About sqrt(2 ln m / d_out) for large d_out.
    """
    g = torch.randn(basis.shape[0], samples, generator=generator, dtype=F64)
    g = g / g.norm(dim=0, keepdim=True)
    similarity = (basis.to(F64).T @ g).abs().amax(0)
    return {"mean": float(similarity.mean()), "p95": float(similarity.quantile(0.95)),
            "intruder_fraction": float((similarity < threshold).to(F64).mean())}


def analyse_layer(*, w0: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scaling: float,
                  delta_w: torch.Tensor, sigma: torch.Tensor, target_basis: torch.Tensor,
                  target_values: torch.Tensor, shift: torch.Tensor | None = None,
                  intruder_top_k: int = 10, intruder_threshold: float = 0.5) -> dict:
    """Every per-layer number of the spectral analysis (float64 inside; plain floats out).

    Args: w0, delta_w (d_out, d_in); b (d_out, r); a (r, d_in); sigma (d_in, d_in);
    target_basis U_k (d_out, k >= r); target_values sigma~ (k,); shift see
    ``adapter_update_factors``.

    Keys: alignment ((1/r) sum cos^2 theta_i, colspan(B) vs span(U_r)), random_alignment
    (r / d_out, its expectation for a random subspace), angles_deg, adapter_values and
    target_values (data-weighted, top r), effective_rank (of the data-weighted adapter values),
    intruders (see ``intruder_dimensions``), decomposition (T_I, T_II, T_III, total, tr K,
    their ratios to tr K, the identity residual |total - sum| / tr K, and rho).
    """
    r, d_out = b.shape[1], b.shape[0]
    if target_basis.shape[1] < r:
        raise ValueError(f"the target stores {target_basis.shape[1]} directions, the adapter "
                         f"has rank {r}: re-extract the targets with max_rank >= {r}.")
    basis_r = target_basis[:, :r].to(F64)
    angles = principal_angles(b.to(F64), basis_r)
    q, c = adapter_update_factors(b, a, scaling, shift)
    adapter_values = data_weighted_singular_values(q, c, sigma)
    terms = error_decomposition(delta_w, sigma, q, c, scaling=1.0)
    energy = float(terms["total_energy"])
    parts = {"T_I": float(terms["misalignment"]), "T_II": float(terms["coefficient"]),
             "T_III": float(terms["rank_residual"]), "total": float(terms["total"])}
    decomposition = {**parts, "trace_K": energy, "rank_used": q.shape[1],
                     **{f"{k}_relative": v / energy for k, v in parts.items()},
                     "identity_residual": abs(parts["total"] - parts["T_I"] - parts["T_II"]
                                              - parts["T_III"]) / energy}
    w_adapted = w0.to(F64) + q @ c
    return {
        "rank": r, "d_out": d_out,
        "alignment": float(alignment_score(b.to(F64), basis_r)),
        "random_alignment": r / d_out,
        "angles_deg": torch.rad2deg(angles).tolist(),
        "adapter_values": adapter_values[:r].tolist(),
        "target_values": target_values[:r].to(F64).tolist(),
        "effective_rank": effective_rank(adapter_values),
        "intruders": intruder_dimensions(w0, w_adapted, top_k=intruder_top_k,
                                         threshold=intruder_threshold),
        "decomposition": decomposition,
    }
