"""Forward hooks that stream layer-input statistics of a model into spectral.py (DESIGN.md §1).

Two statistics, both over the **non-padding** token positions of a calibration set, neither
ever storing activations:

- :func:`collect_second_moments`: S = sum_t x_t x_t^T and n for the input x_t (d_in) of each
  named linear layer, i.e. Sigma = S / n (``SecondMoment``). Layers that read the same input
  tensor (query/key/value of an attention block) share one accumulator.
- :func:`collect_update_grams`: the K-accumulation route, sum_t (dW x_t)(dW x_t)^T and n for
  a given update dW (d_out, d_in) per layer, i.e. K = dW Sigma dW^T at memory d_out^2 instead
  of d_in^2. ``moments[name].mean()`` is K, to feed ``data_weighted_subspace(None, gram=K)``.

Batches are mappings as produced by a transformers data collator; everything except
``labels`` is passed to ``model(**batch)``. ``attention_mask`` (batch, seq), when present,
marks the real tokens.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .spectral import SecondMoment

__all__ = [
    "resolve_target_modules",
    "linear_weight",
    "collect_second_moments",
    "collect_update_grams",
]

logger = logging.getLogger(__name__)

# Called as hook(module name, layer input x (..., d_in), mask of x's leading shape or None).
_InputHandler = Callable[[str, torch.Tensor, "torch.Tensor | None"], None]


# --------------------------------------------------------------------------------------------
# Which modules
# --------------------------------------------------------------------------------------------


def _conv1d_class() -> type | None:
    try:  # transformers' GPT-2 style Conv1D: a linear layer with a transposed weight
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def _is_adaptable(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as (d_out, d_in) (transposing transformers' Conv1D)."""
    if isinstance(module, nn.Linear):
        return module.weight
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.T  # Conv1D stores (d_in, d_out)
    raise ValueError(
        f"{type(module).__name__} is not a linear layer (torch.nn.Linear or transformers "
        f"Conv1D); only those can be targets."
    )


def resolve_target_modules(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the linear layers of ``model`` matching ``target_modules`` (PEFT-like).

    A module matches a suffix ``s`` when its name is ``s`` or ends with ``"." + s`` (so
    ``"query"`` matches ``bert.encoder.layer.0.attention.self.query``). Returns the names in
    ``model.named_modules()`` order.
    """
    suffixes = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not suffixes:
        raise ValueError("target_modules is empty; give suffixes such as ['query', 'value'].")
    linear = [name for name, module in model.named_modules() if _is_adaptable(module)]
    matched = [name for name in linear
               if any(name == s or name.endswith("." + s) for s in suffixes)]
    if not matched:
        existing = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ValueError(
            f"target_modules {suffixes} match no linear layer of {type(model).__name__}; "
            f"its linear layers end in {existing}. Choose suffixes from that list."
        )
    return matched


def _modules_by_name(model: nn.Module, module_names: Sequence[str]) -> dict[str, nn.Module]:
    available = dict(model.named_modules())
    missing = [name for name in module_names if name not in available]
    if missing:
        raise ValueError(
            f"{type(model).__name__} has no module named {missing[:5]}; resolve names on the "
            f"same model with resolve_target_modules(model, suffixes)."
        )
    if not module_names:
        raise ValueError("module_names is empty: nothing to calibrate.")
    return {name: available[name] for name in module_names}


# --------------------------------------------------------------------------------------------
# The streaming loop
# --------------------------------------------------------------------------------------------


def _align_mask(x: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """The mask for a layer input x: (batch, seq, d) gets (batch, seq); (batch*seq, d) the
    flattened mask; a per-example input (batch, d) (e.g. a pooler) has no padding: None."""
    if mask is None:
        return None
    lead = tuple(x.shape[:-1])
    if lead == tuple(mask.shape):
        return mask.to(x.device)
    if x.dim() == 2 and lead[0] == mask.numel():
        return mask.reshape(-1).to(x.device)
    if x.dim() == 2 and lead[0] == mask.shape[0]:
        return None
    raise ValueError(
        f"input of {name!r} has shape {tuple(x.shape)}, which does not match the attention "
        f"mask {tuple(mask.shape)}: only (batch, seq, d), (batch*seq, d) or (batch, d) inputs "
        f"can be masked. Target a different layer."
    )


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError("a target layer was called without a tensor input.")


@contextmanager
def _input_hooks(modules: Mapping[str, nn.Module], state: dict, handler: _InputHandler):
    """Forward pre-hooks that pass each layer's input and the current batch mask to
    ``handler``; removed on exit, also when the forward raises."""

    def make_hook(name: str):
        def hook(module, args, kwargs):
            x = _first_tensor(args, kwargs)
            # x itself, not x.detach(): sharing is detected by tensor identity (no_grad is on).
            handler(name, x, _align_mask(x, state["mask"], name))

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name), with_kwargs=True)
               for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _model_inputs(batch, device: torch.device) -> tuple[dict, torch.Tensor | None]:
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"calibration batches must be mappings (dicts from a transformers data collator), "
            f"got {type(batch).__name__}."
        )
    inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value
              for key, value in batch.items() if key != "labels"}
    return inputs, inputs.get("attention_mask")


def _stream(model: nn.Module, dataloader: Iterable, modules: Mapping[str, nn.Module],
            handler: _InputHandler, *, device, max_batches: int | None, progress: bool,
            on_batch_end: Callable[[int], None] = lambda index: None) -> int:
    """Run the model over the calibration batches with input hooks; returns the batch count."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 (or None for all), got {max_batches}.")
    device = torch.device(device) if device is not None else _model_device(model)
    total = len(dataloader) if hasattr(dataloader, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    state: dict = {"mask": None}
    was_training = model.training
    model.eval()
    batches = 0
    try:
        with torch.no_grad(), _input_hooks(modules, state, handler):
            for batch in tqdm(dataloader, total=total, desc="calibration", disable=not progress):
                inputs, state["mask"] = _model_inputs(batch, device)
                if state["mask"] is None and batches == 0:
                    logger.info("batches have no attention_mask: every position counts.")
                model(**inputs)
                on_batch_end(batches)
                batches += 1
                if batches == max_batches:  # stop before fetching (collating) another batch
                    break
    finally:
        model.train(was_training)
    if batches == 0:
        raise ValueError(
            "the calibration dataloader yielded no batches; pass a non-empty calibration set."
        )
    return batches


def _reduce_and_check(moments: Mapping[str, SecondMoment], modules: Sequence[str]) -> None:
    """Sum each distinct accumulator over processes (once, in module order, the same on every
    process), then reject layers that saw no input or only padding."""
    never = [name for name in modules if name not in moments]
    if never:
        raise ValueError(
            f"target layers {never[:5]} were never called in the model's forward pass; "
            f"they cannot be calibrated. Remove them from the targets."
        )
    reduced: set[int] = set()
    for name in modules:
        if id(moments[name]) not in reduced:
            reduced.add(id(moments[name]))
            moments[name].all_reduce()
    empty = [name for name in modules if moments[name].count == 0]
    if empty:
        raise ValueError(
            f"no non-padding token reached {empty[:5]}: the attention masks of the calibration "
            f"batches are all zero. Pass batches whose attention_mask marks the real tokens."
        )
    # One check after the loop (not a host sync per batch): a NaN/Inf activation would
    # otherwise surface later as NaN targets or an eigensolver failure.
    nonfinite = [name for name in modules if not bool(torch.isfinite(moments[name].sum).all())]
    if nonfinite:
        raise ValueError(
            f"the inputs of {nonfinite[:5]} contained NaN or Inf during calibration: the "
            f"calibration model produces non-finite activations. Check its weights (and run "
            f"calibration in float32 rather than float16)."
        )


# --------------------------------------------------------------------------------------------
# Input second moments, one accumulator per distinct input tensor
# --------------------------------------------------------------------------------------------


class _SharedInputs:
    """Groups layers that read the same input tensor so that it is accumulated once.

    On the first batch the groups are discovered by tensor identity (a weak reference to each
    group's last input, so no activation is kept alive); the first layer of a group to run is
    its leader and the only one that updates. Later, the other members check that they still
    receive the leader's tensor, so a model whose wiring changes is caught instead of being
    silently mis-counted.
    """

    def __init__(self, dims: Mapping[str, int], dtype: torch.dtype) -> None:
        self.dims, self.dtype = dims, dtype
        self.moment: dict[str, SecondMoment] = {}
        self.leader: dict[str, str] = {}
        self.last_input: dict[str, weakref.ref] = {}  # leader name -> its last input
        self.discovering = True

    def __call__(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if name not in self.leader:
            if not self.discovering:
                raise ValueError(f"layer {name!r} was first called after the first batch.")
            self._assign(name, x)
        leader = self.leader[name]
        if leader == name:
            self.last_input[name] = weakref.ref(x)
            self.moment[name].update(x, mask)
        elif self.last_input[leader]() is not x:
            raise ValueError(
                f"layer {name!r} shared its input with {leader!r} on the first batch but not "
                f"later; calibrate such dynamically wired models layer by layer."
            )

    def _assign(self, name: str, x: torch.Tensor) -> None:
        for leader, ref in self.last_input.items():
            if ref() is x:
                self.leader[name], self.moment[name] = leader, self.moment[leader]
                return
        self.leader[name] = name
        self.moment[name] = SecondMoment(self.dims[name], dtype=self.dtype, device=x.device)


def collect_second_moments(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    module_names: Sequence[str],
    *,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float64,
) -> dict[str, SecondMoment]:
    """Stream the uncentred input second moment of each named linear layer (DESIGN.md §1).

    For layer l with inputs x_t (d_in,), accumulates S_l = sum_t x_t x_t^T and n_l over the
    non-padding positions (``attention_mask`` != 0) of every batch; ``result[name].mean()`` is
    Sigma_l (d_in, d_in). Runs under ``torch.no_grad()`` in eval mode (the model's mode is
    restored afterwards); batches are moved to ``device`` (default: the model's).

    Returns {module name: SecondMoment}; layers that read the same input tensor map to the SAME
    object. Accumulators are summed over processes when torch.distributed is initialised.
    """
    modules = _modules_by_name(model, module_names)
    dims = {name: linear_weight(module).shape[1] for name, module in modules.items()}
    shared = _SharedInputs(dims, dtype)

    def end_discovery(index: int) -> None:
        shared.discovering = False

    _stream(model, dataloader, modules, shared, device=device, max_batches=max_batches,
            progress=progress, on_batch_end=end_discovery)
    _reduce_and_check(shared.moment, list(modules))
    groups = len({id(m) for m in shared.moment.values()})
    logger.info("calibrated %d layers with %d distinct inputs, %d tokens for %r", len(modules),
                groups, shared.moment[module_names[0]].count, module_names[0])
    return {name: shared.moment[name] for name in module_names}


# --------------------------------------------------------------------------------------------
# K-accumulation: second moment of dW x (d_out) instead of x (d_in)
# --------------------------------------------------------------------------------------------


def collect_update_grams(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    deltas: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float64,
) -> dict[str, SecondMoment]:
    """Accumulate K_l = (1/n) sum_t (dW_l x_t)(dW_l x_t)^T per layer (DESIGN.md §1, K route).

    Args:
        deltas: {module name: dW (d_out, d_in)}, the update whose data-weighted subspace is
            wanted (e.g. from ``targets.task_updates``).

    Returns {module name: SecondMoment of dimension d_out} (one per layer, never shared since
    the updates differ): ``result[name].mean()`` is K (d_out, d_out), ready for
    ``data_weighted_subspace(None, gram=K)``; ``.count`` is n. Memory d_out^2 per layer instead
    of d_in^2; the inputs x_t are never stored.
    """
    modules = _modules_by_name(model, list(deltas))
    projections: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        weight = linear_weight(module)
        if tuple(deltas[name].shape) != tuple(weight.shape):
            raise ValueError(
                f"delta for {name!r} has shape {tuple(deltas[name].shape)} but the layer's "
                f"weight is (d_out, d_in) = {tuple(weight.shape)}."
            )
        # Transposed once here so the hook does a single (N, d_in) @ (d_in, d_out) product.
        projections[name] = deltas[name].detach().to(weight.device, dtype).T.contiguous()
    moments: dict[str, SecondMoment] = {}

    def accumulate(name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        projection = projections[name]
        if name not in moments:
            moments[name] = SecondMoment(projection.shape[1], dtype=dtype, device=x.device)
        moments[name].update(x.to(projection) @ projection, mask)

    _stream(model, dataloader, modules, accumulate, device=device, max_batches=max_batches,
            progress=progress)
    _reduce_and_check(moments, list(modules))
    return {name: moments[name] for name in deltas}
