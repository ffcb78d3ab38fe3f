"""Per-layer spectral targets: the data structure, build, save/load, validation.

A target describes, for one adapted linear layer of the student (named by its module name in
the *base* model, e.g. ``bert.encoder.layer.0.attention.self.query``), the data-weighted
subspace of the spectral teacher's update dW = W_T - W0 (DESIGN.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LayerTarget", "SpectralTargets"]


@dataclass
class LayerTarget:
    """Spectral target of one linear layer.

    basis:            (d_out, k) top-k left singular vectors U_k of dW Sigma^{1/2}, float32.
    singular_values:  (k,) sigma~_1 >= ... >= sigma~_k, float32.
    total_energy:     () tr(K) over the whole spectrum, float32.
    rank:             the rank chosen for this layer (r*(eps) or the fixed LoRA rank), <= k.
    gap:              sigma~_rank / sigma~_{rank+1} (inf if undefined).
    sigma:            (d_in, d_in) input second moment, only kept when a coefficient loss or
                      the exact decomposition will need it; else None.
    delta_w:          (d_out, d_in) the update itself, only kept for ``spectral_full`` init or
                      analysis; else None.
    """

    basis: torch.Tensor
    singular_values: torch.Tensor
    total_energy: torch.Tensor
    rank: int
    gap: float
    sigma: torch.Tensor | None = None
    delta_w: torch.Tensor | None = None

    @property
    def d_out(self) -> int:
        return self.basis.shape[0]


@dataclass
class SpectralTargets:
    """Targets of all adapted layers plus metadata identifying the model they were made for.

    layers:   {base-model module name: LayerTarget}
    metadata: JSON-serialisable facts: model fingerprint (architecture, parameter shapes of
              the adapted layers), calibration size, energy threshold, shrinkage, ...
    """

    layers: dict[str, LayerTarget]
    metadata: dict[str, Any] = field(default_factory=dict)
