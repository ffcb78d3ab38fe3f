"""SAD-LoRA: Spectral Alignment Distillation for Low-Rank Adaptation."""

from .geometry import alignment_score, orthonormal_basis, principal_angles, subspace_distance
from .spectral import (
    DataWeightedSubspace,
    SecondMoment,
    data_weighted_gram,
    data_weighted_subspace,
    error_decomposition,
    optimal_adapter,
    select_ranks,
    spectral_gap,
)

__version__ = "0.1.0"

__all__ = [
    "DataWeightedSubspace",
    "SecondMoment",
    "alignment_score",
    "data_weighted_gram",
    "data_weighted_subspace",
    "error_decomposition",
    "optimal_adapter",
    "orthonormal_basis",
    "principal_angles",
    "select_ranks",
    "spectral_gap",
    "subspace_distance",
]
