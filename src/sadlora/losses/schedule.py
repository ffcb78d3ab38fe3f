"""Schedules of the spectral weights: (alpha, beta, progress p_t) -> (alpha_t, beta_t)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def _adaptive_schedule(alpha: float, beta: float, progress: torch.Tensor):
    # Align while colspan(B) is off target, shift weight to coefficients as it aligns.
    return alpha * progress, beta * (1.0 - progress)


def _fixed_schedule(alpha: float, beta: float, progress: torch.Tensor):
    return torch.full_like(progress, alpha), torch.full_like(progress, beta)


SCHEDULES: dict[str, Callable[[float, float, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "adaptive": _adaptive_schedule,
    "fixed": _fixed_schedule,
}
