"""Per-layer spectral targets as buffers, grouped by shape for batching: ``AlignmentTargets``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .common import _working_dtype

if TYPE_CHECKING:
    from ..targets import LayerTarget, SpectralTargets


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
