"""SAD-LoRA training losses and their schedule (DESIGN.md §1 "Losses"). Pure torch.

Shapes, for one adapted linear layer (a leading batch of layers ``...`` is allowed everywhere):

- ``B``  (..., d_out, r)   PEFT's ``lora_B.weight``; ``A`` (..., r, d_in) PEFT's ``lora_A.weight``;
  the adapter is M = s B A with s the LoRA scaling.
- ``basis`` U_k (..., d_out, k), k >= r, orthonormal columns: the top-k left singular vectors of
  the data-weighted teacher update W~ = dW Sigma^{1/2}; ``singular_values`` sigma~ (..., k),
  descending.
- ``sigma`` Sigma (..., d_in, d_in), the uncentred input second moment.

Precision: every loss runs with autocast disabled, in float32 (bf16/fp16 inputs are upcast) or
in float64 when an input is float64. Nothing here calls ``.item()``/``.cpu()`` or branches on
tensor values, and Cholesky uses ``cholesky_ex`` (no error check on the host). One exception:
``torch.linalg.eigvalsh`` in ``coefficient_loss`` synchronises a CUDA device with the host
(torch documents this; there is no ``_ex`` variant), so the coefficient term, active only when
beta > 0 after warmup, costs one sync per shape group and step. The recommended
SAD-LoRA-Align (beta = 0) is sync-free.

Modules:

- ``distillation``: ``kd_loss`` and ``task_loss`` (and their per-kind tables).
- ``alignment``: ``alignment_loss`` and ``coefficient_loss`` with their r x r Gram helpers.
- ``alignment_targets``: ``AlignmentTargets``, the targets as buffers grouped per shape.
- ``schedule``: the adaptive / fixed schedules of the spectral weights.
- ``sad_loss``: ``SADLoss``, the combined loss.
- ``common``: the precision helpers above and the check of option names.
"""

from __future__ import annotations

from .alignment import ALIGNMENT_LOSSES, alignment_loss, coefficient_loss
from .alignment_targets import AlignmentTargets, TargetGroup
from .distillation import IGNORE_INDEX, KD_LOSSES, TASK_LOSSES, kd_loss, task_loss
from .sad_loss import SADLoss
from .schedule import SCHEDULES

__all__ = [
    "IGNORE_INDEX",
    "KD_LOSSES",
    "TASK_LOSSES",
    "ALIGNMENT_LOSSES",
    "SCHEDULES",
    "kd_loss",
    "task_loss",
    "alignment_loss",
    "coefficient_loss",
    "TargetGroup",
    "AlignmentTargets",
    "SADLoss",
]
