"""Helpers shared by the loss modules: the precision policy and the check of option names.

Losses run with autocast disabled, in float32 (bf16/fp16 inputs are upcast) or in float64 when
an input is float64.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


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
