"""The LoRA student: a stock PEFT LoRA model, initialised from spectral targets (DESIGN.md §1).

Each adapted linear layer computes ``y = W0 x + s B A x`` with B (d_out, r), A (r, d_in) and
s = lora_alpha / r (lora_alpha = r by default, so s = 1). The rank r may differ per layer
(``layer_ranks``, e.g. the r*(eps) of the targets; PEFT ``rank_pattern``), the scaling s is
one for all layers (``alpha_pattern`` = s r_l). The adapter is PEFT's own
(``LoraConfig`` + ``get_peft_model``); this module only chooses the configuration, writes the
initial B and A into PEFT's ``lora_B`` / ``lora_A`` weights, and reads the live factors back for
the losses. The result saves and loads with plain ``save_pretrained`` / ``PeftModel.from_pretrained``
and merges with ``merge_and_unload()``.

Initialisers (``init=``):

- ``gaussian``       PEFT's default: A random, B = 0 (output unchanged at step 0).
- ``spectral``       B = U_r (top-r data-weighted directions of the teacher update), A = 0:
                     output unchanged at step 0 and L_align = 0.
- ``spectral_full``  B = U_r, A = U_r^T dW / s, so s B A = U_r U_r^T dW, the optimal
                     data-weighted rank-r approximation of the spectral teacher's update.
                     Needs ``LayerTarget.delta_w``.
- ``pissa``          PEFT's PiSSA (``init_lora_weights="pissa"``): balanced sqrt(S) split of the
                     top-r SVD of W0, base weight replaced by the residual.

Names: targets and the dictionaries returned here are keyed by the module name in the *base*
model (``bert.encoder.layer.0.attention.self.query``), i.e. PEFT's name without its
``base_model.model.`` prefix. Targets of modules that are not adapted are ignored (logged at
info level): one targets file can serve students adapting a subset of its layers.

The task head of a sequence classification / regression model (``classifier``, ``score``,
``pre_classifier``, ...) is trainable and saved with the adapter (PEFT ``modules_to_save``).
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import (
    BaseTuner,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from torch import nn

from .targets import LayerTarget, SpectralTargets

__all__ = [
    "INITIALISERS",
    "adapted_module_names",
    "build_student",
    "load_student",
    "lora_factors",
    "lora_scaling",
    "save_student",
]

logger = logging.getLogger(__name__)

# Factors (B (d_out, r), A (r, d_in)) to write into one layer.
Factors = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Initialisers
# --------------------------------------------------------------------------------------------


def _spectral_factors(name: str, target: LayerTarget, rank: int, scaling: float, d_in: int) -> Factors:
    """B = U_r = basis[:, :r] (d_out, r), A = 0 (r, d_in): s B A = 0, output unchanged."""
    basis = target.basis[:, :rank]
    return basis, torch.zeros(rank, d_in, dtype=basis.dtype, device=basis.device)


def _spectral_full_factors(
    name: str, target: LayerTarget, rank: int, scaling: float, d_in: int
) -> Factors:
    """B = U_r (d_out, r), A = U_r^T dW / s (r, d_in), so that s B A = U_r U_r^T dW.

    U_r U_r^T dW is the best rank-r adapter in the data-weighted norm (DESIGN §1, Theorem 2):
    the student starts with T_I = T_II = 0.
    """
    if target.delta_w is None:
        raise ValueError(
            f"init='spectral_full' needs the teacher update dW of layer {name!r}, but its target "
            "has delta_w=None. Build the targets with delta_w kept (the spectral_full option of "
            "target extraction), or use init='spectral'."
        )
    d_out = target.basis.shape[0]
    if tuple(target.delta_w.shape) != (d_out, d_in):
        raise ValueError(
            f"Target of {name!r} has delta_w of shape {tuple(target.delta_w.shape)}, but the layer "
            f"is ({d_out}, {d_in}) (d_out, d_in). The targets were made for a different model; "
            "re-extract them for this base model."
        )
    basis = target.basis[:, :rank]
    # float64 so that s B A reproduces U_r U_r^T dW to round-off of the final cast only.
    coeff = basis.double().T @ target.delta_w.to(basis.device).double() / scaling
    return basis, coeff.to(basis.dtype)


def _random_subspace_factors(
    name: str, target: LayerTarget, rank: int, scaling: float, d_in: int
) -> Factors:
    """B = a uniformly random orthonormal r-frame (d_out, r) from torch's global generator,
    A = 0: the ablation control for ``spectral`` (same norms, no teacher information)."""
    d_out = target.basis.shape[0]
    gaussian = torch.randn(d_out, rank, dtype=torch.float64)
    basis = torch.linalg.qr(gaussian).Q.to(target.basis.dtype)
    return basis, torch.zeros(rank, d_in, dtype=basis.dtype)


@dataclass(frozen=True)
class _Initialiser:
    """How one ``init=`` value is realised.

    peft_init:  the ``init_lora_weights`` value handed to PEFT's LoraConfig.
    factors:    None when PEFT's initialisation is kept; else a function
                (module name, target, rank, scaling s, d_in) -> (B, A) whose result is copied
                into PEFT's lora_B / lora_A weights after PEFT has created them.
    """

    peft_init: bool | str
    factors: Callable[[str, LayerTarget, int, float, int], Factors] | None = None

    @property
    def needs_targets(self) -> bool:
        return self.factors is not None


INITIALISERS: dict[str, _Initialiser] = {
    # PEFT's default (init_lora_weights=True): Kaiming-uniform A, B = 0. "gaussian" is the seed's
    # name for "the usual LoRA init" (A random, B = 0).
    "gaussian": _Initialiser(peft_init=True),
    "spectral": _Initialiser(peft_init=True, factors=_spectral_factors),
    "spectral_full": _Initialiser(peft_init=True, factors=_spectral_full_factors),
    # Full SVD (not "pissa_niter_k"): deterministic, so PeftModel.from_pretrained on the original
    # base recomputes exactly the same residual weight and reproduces the trained student.
    "pissa": _Initialiser(peft_init="pissa"),
    "random_subspace": _Initialiser(peft_init=True, factors=_random_subspace_factors),
}


def init_needs_targets(init: str) -> bool:
    """Whether ``init`` reads the spectral targets (ValueError for an unknown init)."""
    return _get_initialiser(init).needs_targets


def _get_initialiser(init: str) -> _Initialiser:
    if init not in INITIALISERS:
        raise ValueError(
            f"Unknown init={init!r}. Valid values: {sorted(INITIALISERS)} (DESIGN.md §1)."
        )
    return INITIALISERS[init]


# --------------------------------------------------------------------------------------------
# Model inspection (before PEFT touches the model: get_peft_model modifies it in place, so every
# user error is raised while the base model is still intact)
# --------------------------------------------------------------------------------------------

# Suffix of the transformers class name -> PEFT task type.
_TASK_TYPES: dict[str, TaskType] = {
    "ForSequenceClassification": TaskType.SEQ_CLS,
    "ForCausalLM": TaskType.CAUSAL_LM,
}


def _infer_task_type(model: nn.Module) -> TaskType | None:
    """SEQ_CLS for classification/regression heads, CAUSAL_LM for LMs, else None (plain PeftModel).

    The whole MRO is searched so that a user subclass of e.g. BertForSequenceClassification
    is still recognised.
    """
    for cls in type(model).__mro__:
        for suffix, task_type in _TASK_TYPES.items():
            if cls.__name__.endswith(suffix):
                return task_type
    return None


def _head_module_names(model: nn.Module) -> list[str]:
    """Top-level children of a classification model that are not its backbone: the task head.

    PEFT's SEQ_CLS only knows the names ``classifier`` and ``score``; heads with more parts
    (DistilBERT's ``pre_classifier``) would otherwise stay frozen at their initialisation.
    """
    backbone = getattr(model, "base_model_prefix", None)
    return [
        name
        for name, child in model.named_children()
        if name != backbone and any(True for _ in child.parameters())
    ]


def _modules_to_save(
    model: nn.Module, task_type: TaskType | None, extra: Sequence[str] | None
) -> list[str] | None:
    names = list(extra or [])
    if task_type == TaskType.SEQ_CLS:
        names += _head_module_names(model)
    names = list(dict.fromkeys(names))  # de-duplicate, keep order
    return names or None


def _trainable_pooler(model: nn.Module, task_type: TaskType | None, adapted) -> str | None:
    """``"pooler"`` when a classification model's head reads a pooler inside its backbone
    (BERT: CLS -> pooler.dense -> tanh -> classifier) that no adapter touches.

    RoBERTa and MPNet keep that dense layer in their ``classifier``; for BERT it sits in the
    backbone and would stay frozen at its pretraining value (random-like for sentence-embedding
    checkpoints such as all-MiniLM, which were trained with mean pooling): the head could then
    not learn pair tasks such as STS-B. Trained in full and saved with the adapter instead.
    """
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    pooler = getattr(backbone, "pooler", None) if backbone is not None else None
    if task_type != TaskType.SEQ_CLS or pooler is None or next(pooler.parameters(), None) is None:
        return None
    prefix = f"{model.base_model_prefix}.pooler."
    return None if any(name.startswith(prefix) for name in adapted) else "pooler"


def _linear_suffixes(model: nn.Module) -> list[str]:
    """Last name component of every nn.Linear: what ``target_modules`` usually lists."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    )


def _matched_modules(model: nn.Module, config: LoraConfig) -> dict[str, nn.Linear]:
    """The modules PEFT will adapt under ``config``, by base-model name, matched by PEFT's rule.

    Raises ValueError when nothing matches or a matched module is not an nn.Linear (the
    SAD-LoRA mathematics is for linear layers y = W x).
    """
    # PEFT expands "all-linear" in place; work on a copy to keep the user's config intact.
    config = _maybe_include_all_linear_layers(copy.deepcopy(config), model)
    matched = {
        name: module
        for name, module in model.named_modules()
        if name and check_target_module_exists(config, name)
    }
    if not matched:
        raise ValueError(
            f"target_modules={config.target_modules!r} matches no module of "
            f"{type(model).__name__}. Linear layers of this model end with: "
            f"{_linear_suffixes(model)}; pass some of these names."
        )
    not_linear = {n: type(m).__name__ for n, m in matched.items() if not isinstance(m, nn.Linear)}
    if not_linear:
        raise ValueError(
            f"target_modules={config.target_modules!r} matches modules that are not nn.Linear: "
            f"{not_linear}. SAD-LoRA adapts linear layers only; choose among {_linear_suffixes(model)}."
        )
    return matched


def _module_ranks(
    modules: dict[str, nn.Linear], lora_rank: int, layer_ranks: Mapping[str, int] | None
) -> dict[str, int]:
    """The LoRA rank of every adapted module: ``lora_rank``, or its entry in ``layer_ranks``.

    ``layer_ranks`` must name every adapted module (a layer silently falling back to lora_rank
    would change an ablation without a trace); entries of modules that are not adapted are
    ignored, as their targets are.
    """
    if layer_ranks is None:
        return dict.fromkeys(modules, lora_rank)
    missing = [name for name in modules if name not in layer_ranks]
    if missing:
        raise ValueError(
            f"layer_ranks gives no rank for adapted module(s) {missing}; it covers "
            f"{sorted(layer_ranks)[:5]}... Give a rank for every adapted module (targets "
            "extracted for these layers), or narrow target_modules."
        )
    bad = {name: layer_ranks[name] for name in modules
           if isinstance(layer_ranks[name], bool)
           or not isinstance(layer_ranks[name], numbers.Integral) or layer_ranks[name] < 1}
    if bad:
        raise ValueError(f"layer_ranks must be positive integers, got {bad}.")
    ignored = sorted(set(layer_ranks) - set(modules))
    if ignored:
        logger.info("Ignoring layer_ranks of %d module(s) that are not adapted: %s",
                    len(ignored), ignored)
    return {name: int(layer_ranks[name]) for name in modules}


def _rank_label(rank: int, per_layer: bool) -> str:
    return f"layer rank {rank}" if per_layer else f"lora_rank={rank}"


def _check_rank_fits(modules: dict[str, nn.Linear], ranks: dict[str, int], per_layer: bool) -> None:
    """A rank above min(d_out, d_in) has no low-rank meaning and breaks the spectral inits."""
    for name, m in modules.items():
        if ranks[name] > min(m.out_features, m.in_features):
            raise ValueError(
                f"{_rank_label(ranks[name], per_layer)} exceeds min(d_out, d_in) of adapted "
                f"layer {name!r} (weight shape (d_out, d_in) = {tuple(m.weight.shape)}). Use a "
                f"rank <= {min(m.out_features, m.in_features)} or do not adapt this layer."
            )


def _layer_targets(
    modules: dict[str, nn.Linear], targets: SpectralTargets | None, ranks: dict[str, int],
    init: str, per_layer: bool,
) -> dict[str, LayerTarget]:
    """The target of every adapted module, validated against the module and its rank."""
    if targets is None:
        raise ValueError(
            f"init={init!r} needs spectral targets (the basis U_r of each adapted layer); got "
            "targets=None. Pass targets=SpectralTargets(...) from target extraction, or use "
            "init='gaussian' or init='pissa'."
        )
    available = sorted(targets.layers)
    missing = [name for name in modules if name not in targets.layers]
    if missing:
        raise ValueError(
            f"Adapted module(s) {missing} have no spectral target. Targets exist for: "
            f"{available}. Extract targets for these modules or narrow target_modules."
        )
    ignored = [name for name in available if name not in modules]
    if ignored:
        logger.info("Ignoring targets of %d module(s) that are not adapted: %s", len(ignored), ignored)
    chosen = {name: targets.layers[name] for name in modules}
    for name, target in chosen.items():
        _check_target(name, target, modules[name], ranks[name], per_layer)
    return chosen


def _check_target(
    name: str, target: LayerTarget, module: nn.Linear, rank: int, per_layer: bool
) -> None:
    d_out, k = target.basis.shape
    if d_out != module.out_features:
        raise ValueError(
            f"Target of {name!r} has a basis of shape {tuple(target.basis.shape)} (d_out, k), but "
            f"the layer has d_out={module.out_features}. The targets were made for a different "
            "model; re-extract them for this base model."
        )
    if rank > k:
        raise ValueError(
            f"{_rank_label(rank, per_layer)} exceeds the {k} basis vectors stored in the target "
            f"of {name!r}. Use a rank <= {k}, or re-extract the targets keeping at least {rank} "
            "directions (a larger r_max)."
        )


# --------------------------------------------------------------------------------------------
# Reading PEFT's adapter back
# --------------------------------------------------------------------------------------------


def _name_prefix(model: nn.Module) -> str:
    """Prefix that PEFT puts before base-model module names in ``model.named_modules()``."""
    if isinstance(model, PeftModel):
        return "base_model.model."
    if isinstance(model, BaseTuner):
        return "model."
    return ""


def _lora_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, LoraLayer]:
    """Every LoRA layer holding ``adapter_name``, keyed by base-model module name."""
    prefix = _name_prefix(model)
    layers = {
        name.removeprefix(prefix): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }
    if not layers:
        adapters = sorted(getattr(model, "peft_config", {}) or {})
        raise ValueError(
            f"{type(model).__name__} has no LoRA layer with adapter {adapter_name!r} "
            f"(adapters present: {adapters}). Build it with build_student/load_student, and "
            "read the factors before merge_and_unload()."
        )
    return layers


def lora_factors(
    model: nn.Module, adapter_name: str = "default"
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The live LoRA factors of every adapted layer: {base module name: (B, A)}.

    B = lora_B.weight (d_out, r), A = lora_A.weight (r, d_in): the parameters themselves, not
    copies, so a loss computed from them back-propagates into the adapter. The update of the
    layer is s * B @ A with s = ``lora_scaling(model)``.
    """
    return {
        name: (layer.lora_B[adapter_name].weight, layer.lora_A[adapter_name].weight)
        for name, layer in _lora_layers(model, adapter_name).items()
    }


def lora_scaling(model: nn.Module, adapter_name: str = "default") -> float:
    """The LoRA scaling s = lora_alpha / r, which the losses need; equal across layers.

    Ranks may differ per layer (a ``rank_pattern``) as long as ``alpha_pattern`` keeps
    lora_alpha_l / r_l the same: equal up to the round-off of that division (relative 1e-9).
    """
    scalings = {
        name: float(layer.scaling[adapter_name])
        for name, layer in _lora_layers(model, adapter_name).items()
    }
    first = next(iter(scalings.values()))
    if any(not math.isclose(value, first, rel_tol=1e-9) for value in scalings.values()):
        raise ValueError(
            f"Adapter {adapter_name!r} has different scalings per layer {scalings} (a "
            "rank_pattern without the matching alpha_pattern?). SAD-LoRA assumes one scaling "
            "s = lora_alpha / r: give each layer lora_alpha_l = s * r_l (build_student with "
            "layer_ranks does), or use one lora_rank and lora_alpha for all layers."
        )
    return first


def adapted_module_names(model: nn.Module, adapter_name: str = "default") -> list[str]:
    """Base-model names of the LoRA-adapted modules, in model order."""
    return list(_lora_layers(model, adapter_name))


# --------------------------------------------------------------------------------------------
# Build, save, load
# --------------------------------------------------------------------------------------------


def _write_factors(model: PeftModel, factors: dict[str, Factors], adapter_name: str) -> None:
    """Copy (B, A) into PEFT's lora_B / lora_A weights, in their dtype and on their device."""
    layers = _lora_layers(model, adapter_name)
    with torch.no_grad():
        for name, (b, a) in factors.items():
            weight_b = layers[name].lora_B[adapter_name].weight
            weight_a = layers[name].lora_A[adapter_name].weight
            weight_b.copy_(b.to(device=weight_b.device, dtype=weight_b.dtype))
            weight_a.copy_(a.to(device=weight_a.device, dtype=weight_a.dtype))


def _dedupe_modules_to_save(config: LoraConfig) -> None:
    """PEFT's SEQ_CLS appends "classifier" and "score" even when listed already; keep the saved
    adapter_config.json free of the repeats (PEFT treats the list as a set anyway)."""
    if config.modules_to_save:
        config.modules_to_save = list(dict.fromkeys(config.modules_to_save))


def build_student(
    base_model: nn.Module,
    *,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.05,
    target_modules: str | Sequence[str],
    init: str = "gaussian",
    targets: SpectralTargets | None = None,
    modules_to_save: Sequence[str] | None = None,
    layer_ranks: Mapping[str, int] | None = None,
) -> PeftModel:
    """Wrap ``base_model`` in a PEFT LoRA adapter and initialise it (DESIGN.md §1).

    base_model:      a transformers model; modified in place by PEFT (as get_peft_model does).
                     Sequence classification/regression models get task type SEQ_CLS (the
                     head is trainable and saved with the adapter), causal LMs CAUSAL_LM,
                     anything else a plain PeftModel.
    lora_rank:       r, the same for every adapted layer unless ``layer_ranks`` is given.
    lora_alpha:      None means r, i.e. scaling s = lora_alpha / r = 1. With ``layer_ranks``
                     the scaling stays s = lora_alpha / lora_rank for every layer.
    target_modules:  PEFT's target_modules (list of name suffixes, a regex, or "all-linear");
                     must match nn.Linear layers only.
    init:            one of ``INITIALISERS``: gaussian | spectral | spectral_full | pissa |
                     random_subspace (the ablation control).
    targets:         needed by the spectral inits: a target for every adapted module with at
                     least r basis vectors (``delta_w`` too for spectral_full). Targets of
                     modules that are not adapted are ignored. ``LayerTarget.rank`` (the rank
                     selected for that layer) is only used when passed as ``layer_ranks``.
    modules_to_save: extra modules trained in full and saved with the adapter.
    layer_ranks:     {base module name: r_l} for every adapted module (e.g.
                     ``SpectralTargets.ranks``, the r*(eps) of each layer): per-layer LoRA
                     ranks through PEFT's ``rank_pattern``, with ``alpha_pattern`` =
                     s * r_l so that the scaling s is one for all layers (the losses assume
                     it). The spectral inits then use each layer's own r_l. ``lora_rank``
                     stays PEFT's default ``r`` (unused: every adapted module has an entry).

    Every user error raises ValueError before the base model is modified.
    """
    initialiser = _get_initialiser(init)
    if not isinstance(lora_rank, int) or lora_rank < 1:
        raise ValueError(f"lora_rank must be a positive integer, got {lora_rank!r}.")
    alpha = float(lora_rank if lora_alpha is None else lora_alpha)
    task_type = _infer_task_type(base_model)
    config = LoraConfig(
        r=lora_rank,
        lora_alpha=alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        init_lora_weights=initialiser.peft_init,
        task_type=task_type,
        modules_to_save=_modules_to_save(base_model, task_type, modules_to_save),
    )
    modules = _matched_modules(base_model, config)
    ranks = _module_ranks(modules, lora_rank, layer_ranks)
    _check_rank_fits(modules, ranks, per_layer=layer_ranks is not None)
    pooler = _trainable_pooler(base_model, task_type, modules)
    if pooler:
        config.modules_to_save = [*(config.modules_to_save or []), pooler]
    scaling = alpha / lora_rank
    if layer_ranks is not None:
        # PEFT matches pattern keys as regexes against the module name: escaped full names
        # match exactly their own module. alpha_l = s r_l keeps alpha_l / r_l = s everywhere.
        config.rank_pattern = {re.escape(name): r for name, r in ranks.items()}
        config.alpha_pattern = {re.escape(name): scaling * r for name, r in ranks.items()}

    factors: dict[str, Factors] = {}
    if initialiser.needs_targets:
        chosen = _layer_targets(modules, targets, ranks, init, per_layer=layer_ranks is not None)
        for name, target in chosen.items():
            factors[name] = initialiser.factors(
                name, target, ranks[name], scaling, modules[name].in_features
            )
    elif targets is not None:
        logger.info("init=%r does not use the spectral targets; they are ignored here.", init)

    model = get_peft_model(base_model, config)
    adapted = adapted_module_names(model)
    if set(adapted) != set(modules):
        # Our pre-check mirrors PEFT's matching rule; a difference is a bug here, not a user error.
        raise RuntimeError(
            f"PEFT adapted {sorted(adapted)} but the pre-check expected {sorted(modules)}."
        )
    _dedupe_modules_to_save(model.peft_config["default"])
    _write_factors(model, factors, adapter_name="default")
    logger.info(
        "Built LoRA student: init=%s, r=%s, scaling=%g, %d adapted modules, task_type=%s, "
        "modules_to_save=%s",
        init, lora_rank if layer_ranks is None else sorted(set(ranks.values())), scaling,
        len(modules), task_type, config.modules_to_save,
    )
    return model


def save_student(model: PeftModel, output_dir: str | Path, *, is_main_process: bool = True) -> None:
    """Write the stock PEFT adapter: adapter_config.json + adapter_model.safetensors.

    The safetensors file holds the LoRA factors and the trained task head (modules_to_save).
    Targets and run configuration are written by their own owners, not here.
    """
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"save_student expects the PeftModel returned by build_student/load_student, got "
            f"{type(model).__name__}. After merge_and_unload(), save with save_pretrained instead."
        )
    model.save_pretrained(str(output_dir), is_main_process=is_main_process)


def load_student(
    base_model: nn.Module, adapter_dir: str | Path, *, is_trainable: bool = False
) -> PeftModel:
    """Load an adapter saved by ``save_student`` onto a fresh copy of its base model.

    Plain ``PeftModel.from_pretrained``: the loaded model reproduces the saved student's outputs
    (for a PiSSA student PEFT re-runs the deterministic SVD on the fresh base, recreating the
    same residual weight). ``is_trainable=False`` (default) loads for inference.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"No adapter_config.json in {str(adapter_dir)!r}: not a saved student. Pass the "
            "directory given to save_student."
        )
    return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)
