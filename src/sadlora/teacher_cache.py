"""Teacher-logit cache: the KD teacher's logits over a dataset, computed once and kept on disk.

A trained teacher's logits on a fixed dataset never change, so they are computed once per
(teacher weights, tokenised dataset, settings) fingerprint and reused across methods, ranks
and seeds. Rows are stored in example-index order (the dataset's ``idx`` column), so a batch
looks its logits up by ``idx``. Files are written to a temporary name and renamed; a file whose
checksum does not match is reported and recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

__all__ = ["fingerprint", "compute_teacher_logits", "TeacherLogitsCache"]

logger = logging.getLogger(__name__)


def _model_digest(model: torch.nn.Module) -> str:
    """sha256 of the model class, config and every parameter's bytes."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _rows_digest(rows: Iterable, columns: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        for column in columns:
            digest.update(json.dumps(row[column]).encode())
    return digest.hexdigest()


def fingerprint(teacher: torch.nn.Module, dataset, settings: dict | None = None) -> str:
    """Identity of a teacher-logit table: teacher weights, tokenised inputs and settings."""
    columns = [c for c in ("idx", "input_ids", "attention_mask", "token_type_ids")
               if c in dataset.column_names]
    parts = [_model_digest(teacher), _rows_digest(dataset, columns),
             json.dumps(settings or {}, sort_keys=True)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


@torch.no_grad()
def compute_teacher_logits(
    teacher: torch.nn.Module,
    dataset,
    collate: Callable,
    *,
    batch_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Logits (N, num_labels) of ``teacher`` on a tokenised dataset with an ``idx`` column.

    Row i holds the logits of the example whose idx is i (N = max idx + 1). Batches are built
    by ``collate`` (dynamic padding); ``autocast_dtype`` (e.g. bfloat16) speeds the forward up
    on CPUs with bf16 support; the stored logits are float32.
    """
    if "idx" not in dataset.column_names:
        raise ValueError("the dataset needs an 'idx' column (example index) to cache logits.")
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    keep = [c for c in dataset.column_names if c in ("input_ids", "attention_mask",
                                                     "token_type_ids", "idx")]
    rows = dataset.select_columns(keep)
    table: torch.Tensor | None = None
    for start in tqdm(range(0, len(rows), batch_size), desc="teacher logits",
                      disable=not progress):
        batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        index = batch.pop("idx")
        batch = {k: v.to(device) for k, v in batch.items()}
        enabled = autocast_dtype is not None
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=enabled):
            logits = teacher(**batch).logits.float().cpu()
        if table is None:
            table = torch.full((int(max(rows["idx"])) + 1, logits.shape[-1]), float("nan"))
        table[index] = logits
    teacher.train(was_training)
    if table is None:
        raise ValueError("cannot compute teacher logits of an empty dataset.")
    if not torch.isfinite(table[torch.as_tensor(rows["idx"])]).all():
        raise ValueError("the teacher produced NaN or Inf logits; check its weights and inputs.")
    return table


class TeacherLogitsCache:
    """A folder of logit tables, one ``<fingerprint>.safetensors`` file per table."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        """The table stored under ``key``, or None if absent or corrupted (then removed)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            stored = load_file(str(path))
            table = stored["logits"]
            expected = stored["checksum"]
            if not torch.equal(_checksum(table), expected):
                raise ValueError("checksum mismatch")
        except (SafetensorError, KeyError, ValueError, OSError) as error:
            logger.warning("teacher-logit cache %s is corrupted (%s); recomputing", path, error)
            path.unlink(missing_ok=True)
            return None
        return table

    def save(self, key: str, table: torch.Tensor) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        try:
            save_file({"logits": table.contiguous(), "checksum": _checksum(table)},
                      str(temporary))
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path

    def get_or_compute(self, teacher, dataset, collate, *, settings: dict | None = None,
                       **kwargs) -> torch.Tensor:
        """Load the table of (teacher, dataset, settings) or compute and store it."""
        key = fingerprint(teacher, dataset, settings)
        table = self.load(key)
        if table is not None:
            logger.info("teacher logits: cache hit %s", self.path(key))
            return table
        table = compute_teacher_logits(teacher, dataset, collate, **kwargs)
        # Under torchrun only rank 0 writes (the others computed the same table themselves).
        if int(os.environ.get("RANK", "0")) == 0:
            with contextlib.suppress(OSError):  # a read-only cache folder costs a recompute
                self.save(key, table)
        return table


def _checksum(table: torch.Tensor) -> torch.Tensor:
    # A content hash as a tensor, so it lives inside the same safetensors file.
    digest = hashlib.sha256(table.contiguous().view(torch.uint8).numpy().tobytes()).digest()
    return torch.frombuffer(bytearray(digest), dtype=torch.uint8).clone()
