"""Grassmannian geometry: principal angles between column spaces and distances built on them.

Pure torch, batched over leading dimensions. A subspace is given by any matrix whose columns
span it, shape ``(..., d, r)``; the columns need not be orthonormal (they must be linearly
independent).

References: Björck & Golub (1973), Knyazev & Argentati (2002) for the sine-based formula
that keeps small angles accurate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "orthonormal_basis",
    "principal_angles",
    "alignment_score",
    "subspace_distance",
    "SUBSPACE_DISTANCES",
]


def orthonormal_basis(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis ``Q`` (..., d, r) of the column space of ``matrix`` (..., d, r).

    Reduced QR; the columns of ``matrix`` must be linearly independent.
    """
    q, _ = torch.linalg.qr(matrix, mode="reduced")
    return q


def _check_pair(first: torch.Tensor, second: torch.Tensor) -> None:
    for matrix in (first, second):
        if matrix.dim() < 2:
            raise ValueError(
                f"a subspace is given as a (..., d, r) matrix of column vectors; got shape "
                f"{tuple(matrix.shape)}. Add a trailing dimension for one vector: x[:, None]."
            )
    if first.shape[-2] != second.shape[-2]:
        raise ValueError(
            f"both subspaces must live in the same ambient space: got d={first.shape[-2]} "
            f"and d={second.shape[-2]} (shapes {tuple(first.shape)} and {tuple(second.shape)})."
        )


def principal_angles(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Principal angles between colspan(first) and colspan(second), ascending, in radians.

    Args:
        first: (..., d, r1) spanning vectors.
        second: (..., d, r2) spanning vectors (batch dimensions broadcast).

    Returns:
        (..., min(r1, r2)) angles theta_1 <= ... <= theta_k in [0, pi/2].

    cos(theta_i) are the singular values of Q1^T Q2. arccos alone loses all accuracy for
    theta below ~1e-8 (cos = 1 - theta^2/2 rounds to 1), so angles with cos^2 >= 1/2 are taken
    from the sines instead: the singular values of (I - Q1 Q1^T) Q2 (Knyazev & Argentati).
    """
    _check_pair(first, second)
    if first.shape[-1] < second.shape[-1]:
        first, second = second, first  # the sines below need r1 >= r2
    q1, q2 = orthonormal_basis(first), orthonormal_basis(second)
    cross = q1.transpose(-1, -2) @ q2
    cosines = torch.linalg.svdvals(cross)  # descending -> ascending angles
    residual = q2 - q1 @ cross
    sines = torch.linalg.svdvals(residual).flip(-1)  # ascending -> ascending angles
    from_cos = torch.arccos(cosines.clamp(-1.0, 1.0))
    from_sin = torch.arcsin(sines.clamp(-1.0, 1.0))
    return torch.where(cosines.square() >= 0.5, from_sin, from_cos)


def alignment_score(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine of the principal angles, (1/k) sum_i cos^2(theta_i), in [0, 1].

    Equals ||Q1^T Q2||_F^2 / k with k = min(r1, r2): 1 when one subspace contains the other,
    0 when they are orthogonal. Shape (...,).
    """
    _check_pair(first, second)
    q1, q2 = orthonormal_basis(first), orthonormal_basis(second)
    k = min(first.shape[-1], second.shape[-1])
    return (q1.transpose(-1, -2) @ q2).square().sum(dim=(-1, -2)) / k


def _projection_distance(angles: torch.Tensor) -> torch.Tensor:
    return torch.sin(angles).square().sum(-1).sqrt()


def _geodesic_distance(angles: torch.Tensor) -> torch.Tensor:
    return angles.square().sum(-1).sqrt()


def _binet_cauchy_distance(angles: torch.Tensor) -> torch.Tensor:
    product = torch.cos(angles).square().prod(-1)
    return (1.0 - product).clamp_min(0.0).sqrt()


SUBSPACE_DISTANCES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # ||sin theta||_2, the chordal distance; equals ||P1 - P2||_F / sqrt(2) for r1 = r2.
    "projection": _projection_distance,
    # ||theta||_2, the arc length of the Grassmann geodesic.
    "geodesic": _geodesic_distance,
    # sqrt(1 - prod cos^2 theta_i).
    "binet_cauchy": _binet_cauchy_distance,
}


def subspace_distance(
    first: torch.Tensor, second: torch.Tensor, kind: str = "projection"
) -> torch.Tensor:
    """Distance between colspan(first) and colspan(second), shape (...,).

    kind: ``projection`` (chordal, at most sqrt(k)), ``geodesic`` (at most sqrt(k) pi / 2) or
    ``binet_cauchy`` (at most 1).
    """
    if kind not in SUBSPACE_DISTANCES:
        raise ValueError(
            f"unknown subspace distance {kind!r}; choose one of {sorted(SUBSPACE_DISTANCES)}."
        )
    return SUBSPACE_DISTANCES[kind](principal_angles(first, second))


def max_distance(kind: str, k: int) -> float:
    """Largest value of ``subspace_distance(kind)`` between k-dimensional subspaces."""
    return {"projection": math.sqrt(k), "geodesic": math.sqrt(k) * math.pi / 2,
            "binet_cauchy": 1.0}[kind]
