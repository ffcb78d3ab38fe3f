"""Per-layer spectral targets: the data structure, build, save/load, validation.

A target describes, for one adapted linear layer of the student (named by its module name in
the *base* model, e.g. ``bert.encoder.layer.0.attention.self.query``), the data-weighted
subspace of the spectral teacher's update dW = W_T - W0 (DESIGN.md §1).

On disk, targets live in a directory ``path`` holding two files:

- ``targets.safetensors``: the tensors, keys ``"<module name>/<field>"`` (basis,
  singular_values, total_energy, and optionally delta_w and sigma; a Sigma shared by several
  layers, e.g. query/key/value, is stored once under the first of them);
- ``targets.json``: format version, metadata (model fingerprint, calibration, settings), the
  per-layer scalars (rank, gap, which Sigma) and the sha256 of ``targets.safetensors``, so a
  truncated or corrupted tensor file is detected. Both are written to temporary names and
  renamed into place, the JSON last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .calibration import (
    collect_second_moments,
    collect_update_grams,
    linear_weight,
    resolve_target_modules,
)
from .spectral import data_weighted_subspace, select_ranks, sigma_factor

__all__ = ["LayerTarget", "SpectralTargets", "model_fingerprint", "task_updates",
           "build_targets", "save_targets", "load_targets", "check_fingerprint"]

logger = logging.getLogger(__name__)
TENSOR_FILE, META_FILE, FORMAT_VERSION = "targets.safetensors", "targets.json", 1


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

    @property
    def ranks(self) -> dict[str, int]:
        return {name: target.rank for name, target in self.layers.items()}


# --------------------------------------------------------------------------------------------
# Model facts
# --------------------------------------------------------------------------------------------


def _module(model: nn.Module, name: str, role: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"the {role} ({type(model).__name__}) has no module {name!r}: teacher, base and "
            f"targets must all be for the same architecture (same module names).") from None


def model_fingerprint(model: nn.Module, module_names: list[str]) -> dict[str, Any]:
    """{model_type, class_name, layers: {name: [d_out, d_in]}} identifying what targets fit."""
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "class_name": type(model).__name__,
        "layers": {name: list(linear_weight(_module(model, name, "model")).shape)
                   for name in module_names},
    }


def _finite_weight(model: nn.Module, name: str, role: str) -> torch.Tensor:
    weight = linear_weight(_module(model, name, role)).detach()
    if not torch.isfinite(weight).all():
        raise ValueError(f"the {role} parameter {name}.weight contains NaN or Inf values.")
    return weight


def _checked_pair(teacher: nn.Module, base: nn.Module, name: str) -> tuple:
    """(W_teacher, W_base) of one layer, both (d_out, d_in), after the user-error checks."""
    w_teacher, w_base = _finite_weight(teacher, name, "teacher"), _finite_weight(base, name, "base")
    if w_teacher.shape != w_base.shape:
        raise ValueError(
            f"parameter {name}.weight has shape {tuple(w_teacher.shape)} in the teacher but "
            f"{tuple(w_base.shape)} in the base: they must be the same architecture.")
    if torch.equal(w_teacher, w_base.to(w_teacher.device)):
        raise ValueError(
            f"the task update of {name} is zero: teacher and base weights are identical. "
            f"Check that the spectral teacher is the fine-tuned checkpoint.")
    return w_teacher, w_base


def task_updates(teacher: nn.Module, base: nn.Module, module_names: list[str], *,
                 dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """dW = W_teacher - W_base, (d_out, d_in) in ``dtype``, for each named linear layer.

    Raises ValueError naming the parameter when a module is missing, the shapes differ, a
    weight is not finite, or dW = 0 (the teacher is then the base: likely the wrong checkpoint).
    """
    pairs = {name: _checked_pair(teacher, base, name) for name in module_names}
    # Subtract in float64 (no float32 cancellation error), then round once to ``dtype``.
    return {name: (t.double() - b.to(t.device, torch.float64)).to(dtype)
            for name, (t, b) in pairs.items()}


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def _check_settings(rank, energy_threshold, total_budget, use_gram, shrinkage, keep_sigma):
    if (rank is None) == (energy_threshold is None and total_budget is None):
        raise ValueError(
            "give exactly one of rank (a fixed rank for every layer) or energy_threshold / "
            "total_budget (data-driven ranks r*(eps) of Theorem 2).")
    if use_gram and (shrinkage is not None or keep_sigma):
        raise ValueError("use_gram=True never forms Sigma: it cannot apply shrinkage or keep "
                         "Sigma. Use the Sigma route (use_gram=False).")


def _layer_spectra(teacher, base, names, moments, *, use_gram, shrinkage, max_rank, keep,
                   data_weighted=True):
    """Layer by layer, so only one float64 dW and K live at once. With ``data_weighted`` False,
    Sigma = I (the plain SVD of dW, the unweighted ablation). Per layer: a LayerTarget
    still without rank and gap, the float64 values (k + 1,) (sigma~_{k+1} = 0 when k = d_out,
    for the gap at r = k) and tr K (float64)."""
    # sigma_of: accumulator id -> {"sigma", "sigma32" (its float32 copy), "factor" (F with
    # Sigma = F^T F, made on the first wide layer: gate and up share it)}
    results, sigma_of = {}, {}
    for name in names:
        delta = task_updates(teacher, base, [name])[name]
        if use_gram:
            subspace, sigma32 = data_weighted_subspace(None, gram=moments[name].mean()), None
        else:
            if id(moments[name]) not in sigma_of:  # shared by query/key/value: computed once
                sigma_of.clear()  # sharing layers are adjacent; don't hold every d_in^2 Sigma
                mean = (moments[name].mean(shrinkage) if data_weighted else
                        torch.eye(delta.shape[1], dtype=torch.float64))
                sigma_of[id(moments[name])] = {"sigma": mean, "sigma32": mean.to(torch.float32)}
            shared = sigma_of[id(moments[name])]
            sigma, sigma32 = shared["sigma"], shared["sigma32"]
            if delta.shape[0] > delta.shape[1]:  # wide layer: SVD of dW F^T, see spectral.py
                if "factor" not in shared:
                    shared["factor"] = sigma_factor(sigma).to(delta.device)
                subspace = data_weighted_subspace(delta, factor=shared["factor"])
            else:
                subspace = data_weighted_subspace(delta, sigma.to(delta.device))
        k = min(max_rank, delta.shape[0])
        values = torch.cat([subspace.singular_values, subspace.singular_values.new_zeros(1)])
        target = LayerTarget(
            basis=subspace.basis[:, :k].to(torch.float32).contiguous(),
            singular_values=values[:k].to(torch.float32).contiguous(),
            total_energy=subspace.total_energy.to(torch.float32), rank=0, gap=float("inf"),
            sigma=sigma32 if keep["sigma"] else None,
            delta_w=delta.to(torch.float32) if keep["delta_w"] else None)
        results[name] = (target, values[: k + 1].clone(), subspace.total_energy)
    return results


def _gap(values: torch.Tensor, r: int) -> float:
    """sigma~_r / sigma~_{r+1} from values (>= r + 1,); inf when sigma~_{r+1} = 0."""
    return float("inf") if float(values[r]) == 0.0 else float(values[r - 1] / values[r])


def build_targets(
    teacher: nn.Module, base: nn.Module, dataloader, target_modules, *,
    calibration_model: nn.Module | None = None, max_rank: int = 64, rank: int | None = None,
    energy_threshold: float | None = None, min_rank: int = 1, total_budget: int | None = None,
    keep_sigma: bool = False, keep_delta_w: bool = False, shrinkage: str | None = None,
    use_gram: bool = False, device=None, progress: bool = True, max_batches: int | None = None,
    data_weighted: bool = True,
) -> SpectralTargets:
    """Per-layer targets of the spectral teacher's update dW = W_teacher - W_base (DESIGN.md §1).

    Sigma (or K, with ``use_gram``) is calibrated on ``calibration_model`` (default: base) over
    ``dataloader``; K = dW Sigma dW^T is eigendecomposed in float64; each layer keeps
    k = min(max_rank, d_out) directions and its rank: ``rank`` for all layers, or r*(eps) from
    ``energy_threshold`` or the greedy split of ``total_budget`` (Theorem 2, with tr K; the
    budget wins when both are given). ``data_weighted=False`` replaces Sigma by I (ablation). ``target_modules``: suffixes (resolved on base) or full
    module names. Raises ValueError for a missing/mismatched/non-finite/unchanged layer.

    Under torch.distributed each rank calibrates on its own share of the batches, S and n are
    all-reduced, and the targets are computed on rank 0 and broadcast (on CPU) to the others.
    """
    _check_settings(rank, energy_threshold, total_budget, use_gram, shrinkage, keep_sigma)
    if not data_weighted and use_gram:
        raise ValueError("data_weighted=False sets Sigma = I, which the use_gram route (K "
                         "accumulated from data) cannot do: use use_gram=False.")
    names = resolve_target_modules(base, target_modules)
    ks = {name: min(max_rank, linear_weight(base.get_submodule(name)).shape[0]) for name in names}
    if rank is not None and any(not 1 <= rank <= k for k in ks.values()):
        raise ValueError(f"rank={rank} must be in [1, min(max_rank, d_out)] for every layer; "
                         f"the smallest is {min(ks.values())}. Lower rank or raise max_rank.")
    for name in names:  # user errors surface before the expensive calibration
        _checked_pair(teacher, base, name)
    calibration_model = base if calibration_model is None else calibration_model
    collect_kw = dict(device=device, max_batches=max_batches, progress=progress)
    if use_gram:  # all dW are needed at once by the hooks: float32 halves their memory
        deltas = task_updates(teacher, base, names, dtype=torch.float32)
        moments = collect_update_grams(calibration_model, dataloader, deltas, **collect_kw)
        del deltas
    else:
        moments = collect_second_moments(calibration_model, dataloader, names, **collect_kw)
    settings = dict(max_rank=max_rank, rank=rank, energy_threshold=energy_threshold,
                    min_rank=min_rank, total_budget=total_budget, shrinkage=shrinkage,
                    use_gram=use_gram, keep_sigma=keep_sigma, keep_delta_w=keep_delta_w,
                    data_weighted=data_weighted)
    return _computed_on_rank_zero(
        lambda: _targets_from_moments(teacher, base, names, moments, settings))


def _targets_from_moments(teacher, base, names, moments, settings: dict) -> SpectralTargets:
    """The eigendecompositions, rank selection and metadata of ``build_targets``."""
    max_rank, rank = settings["max_rank"], settings["rank"]
    energy_threshold = settings["energy_threshold"]
    spectra = _layer_spectra(teacher, base, names, moments, use_gram=settings["use_gram"],
                             shrinkage=settings["shrinkage"], max_rank=max_rank,
                             keep={"sigma": settings["keep_sigma"],
                                   "delta_w": settings["keep_delta_w"]},
                             data_weighted=settings["data_weighted"])
    ranks = dict.fromkeys(names, rank) if rank is not None else select_ranks(
        {name: values[:-1] for name, (_, values, _) in spectra.items()},
        energy_threshold=energy_threshold if energy_threshold is not None else 0.9,
        min_rank=settings["min_rank"], max_rank=max_rank, total_budget=settings["total_budget"],
        total_energy_by_layer={name: total for name, (_, _, total) in spectra.items()})
    layers = {name: target for name, (target, _, _) in spectra.items()}
    for name, (target, values, _) in spectra.items():
        target.rank, target.gap = int(ranks[name]), _gap(values, int(ranks[name]))
    metadata = {
        "fingerprint": model_fingerprint(base, names),
        "teacher_class": type(teacher).__name__,
        "calibration_tokens": {name: moments[name].count for name in names},
        "settings": settings,
    }
    logger.info("built targets for %d layers, ranks %s", len(layers), sorted(set(ranks.values())))
    return SpectralTargets(layers=layers, metadata=metadata)


def _computed_on_rank_zero(compute: Callable[[], SpectralTargets]) -> SpectralTargets:
    """``compute()`` on rank 0 only, its result broadcast to every rank (DESIGN.md §3).

    Every rank then holds bit-identical targets (eigensolvers on different devices need not
    agree to the last bit, nor pick the same signs), and the float64 eigendecompositions run
    once. Without an initialised process group this is just ``compute()``. An error on rank 0
    is re-raised on every rank instead of leaving the others waiting in the broadcast.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute()
    payload: list = [None]
    if dist.get_rank() == 0:
        try:
            payload[0] = ("ok", _targets_to_cpu(compute()))
        except ValueError as error:
            payload[0] = ("error", str(error))
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise ValueError(value)
    return value


def _targets_to_cpu(targets: SpectralTargets) -> SpectralTargets:
    """A CPU copy (pickled device tensors would land on rank 0's device index elsewhere);
    a Sigma shared by several layers stays one object."""
    copies: dict[int, torch.Tensor] = {}

    def cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        return copies.setdefault(id(tensor), tensor.cpu())

    layers = {name: LayerTarget(basis=cpu(t.basis), singular_values=cpu(t.singular_values),
                                total_energy=cpu(t.total_energy), rank=t.rank, gap=t.gap,
                                sigma=cpu(t.sigma), delta_w=cpu(t.delta_w))
              for name, t in targets.layers.items()}
    return SpectralTargets(layers=layers, metadata=targets.metadata)


# --------------------------------------------------------------------------------------------
# Save / load / validate
# --------------------------------------------------------------------------------------------

_TENSOR_FIELDS = ("basis", "singular_values", "total_energy", "delta_w")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_targets(targets: SpectralTargets, path: str | os.PathLike) -> Path:
    """Write ``targets`` into the directory ``path`` (created if needed); returns it."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, layers, sigma_owner = {}, {}, {}
    for name, target in targets.layers.items():
        for key in _TENSOR_FIELDS:
            if getattr(target, key) is not None:
                tensors[f"{name}/{key}"] = getattr(target, key).detach().cpu().contiguous()
        sigma_key = None
        if target.sigma is not None:  # shared Sigma (query/key/value) is stored once
            sigma_owner.setdefault(id(target.sigma), name)
            sigma_key = f"{sigma_owner[id(target.sigma)]}/sigma"
            tensors[sigma_key] = target.sigma.detach().cpu().contiguous()
        layers[name] = {"rank": target.rank, "gap": target.gap, "sigma": sigma_key}
    tmp_tensors = directory / f".{TENSOR_FILE}.{os.getpid()}.tmp"
    tmp_meta = directory / f".{META_FILE}.{os.getpid()}.tmp"
    try:
        save_file(tensors, str(tmp_tensors))
        document = {"format": "sadlora-targets", "version": FORMAT_VERSION,
                    "sha256": _sha256(tmp_tensors), "layers": layers, "metadata": targets.metadata}
        tmp_meta.write_text(json.dumps(document, indent=1))
        # Tensors first, JSON last: a crash in between leaves a checksum mismatch, never a
        # silent mix of old and new.
        for tmp, final in ((tmp_tensors, TENSOR_FILE), (tmp_meta, META_FILE)):
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, directory / final)
    finally:
        tmp_tensors.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
    return directory


def _read_document(directory: Path) -> dict:
    for name in (META_FILE, TENSOR_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"no {name} in {directory}: not a targets directory written "
                                    f"by save_targets (build them with build_targets).")
    try:
        document = json.loads((directory / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{directory / META_FILE} is corrupted ({error}); rebuild the targets.") \
            from error
    if not isinstance(document, dict) or document.get("format") != "sadlora-targets":
        raise ValueError(f"{directory / META_FILE} is not a sadlora targets file.")
    if document.get("version") != FORMAT_VERSION:
        raise ValueError(f"{directory} has targets format version {document.get('version')}, "
                         f"this sadlora reads version {FORMAT_VERSION}; rebuild the targets.")
    if _sha256(directory / TENSOR_FILE) != document.get("sha256"):
        raise ValueError(f"{directory / TENSOR_FILE} is truncated or corrupted (its sha256 does "
                         f"not match {META_FILE}); rebuild the targets with build_targets.")
    return document


def check_fingerprint(targets: SpectralTargets, model: nn.Module,
                      module_names: list[str] | None = None) -> None:
    """Raise ValueError if ``model`` lacks a target layer or a layer's (d_out, d_in) differs."""
    names = list(targets.layers) if module_names is None else list(module_names)
    unknown = [name for name in names if name not in targets.layers]
    if unknown:
        raise ValueError(f"the targets have no layer {unknown[:5]}; they cover "
                         f"{list(targets.layers)[:5]}... Rebuild them for these layers.")
    expected, actual = targets.metadata.get("fingerprint", {}), model_fingerprint(model, names)
    for name in names:
        want, shape = expected.get("layers", {}).get(name), actual["layers"][name]
        if want is not None and list(want) != shape:
            raise ValueError(f"layer {name!r} has weight shape {tuple(shape)} in "
                             f"{actual['class_name']} but the targets were made for "
                             f"{tuple(want)}: wrong model for these targets.")
    if None not in (actual["model_type"], expected.get("model_type")) and \
            actual["model_type"] != expected["model_type"]:
        raise ValueError(f"targets were made for model_type {expected['model_type']!r}, "
                         f"the model is {actual['model_type']!r}.")


def load_targets(path: str | os.PathLike, *, model: nn.Module | None = None,
                 module_names: list[str] | None = None) -> SpectralTargets:
    """Read targets written by :func:`save_targets`; with ``model``, check they fit it."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"targets directory {directory} does not exist.")
    document = _read_document(directory)
    try:
        tensors = load_file(str(directory / TENSOR_FILE))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot read {directory / TENSOR_FILE}: {error}") from error
    layers = {}
    for name, scalars in document["layers"].items():
        fields = {key: tensors.get(f"{name}/{key}") for key in _TENSOR_FIELDS}
        if any(fields[key] is None for key in _TENSOR_FIELDS[:3]):
            raise ValueError(f"{directory / TENSOR_FILE} lacks tensors of layer {name!r}.")
        sigma = tensors.get(scalars["sigma"]) if scalars["sigma"] is not None else None
        if scalars["sigma"] is not None and sigma is None:
            raise ValueError(f"{directory / TENSOR_FILE} lacks the Sigma of layer {name!r}.")
        layers[name] = LayerTarget(rank=scalars["rank"], gap=scalars["gap"], sigma=sigma, **fields)
    targets = SpectralTargets(layers=layers, metadata=document["metadata"])
    if model is not None:
        check_fingerprint(targets, model, module_names)
    return targets
