"""One rank of the distributed test in test_reliability.py, run as

    torchrun --nproc_per_node 2 tests/distributed_worker.py ROOT

(gloo, CPU). ROOT holds what the test prepared: ``base`` and ``spectral`` model folders,
``batches.pt`` (calibration batches), ``distill.yaml``. Each rank writes its findings under
ROOT/ddp/, which the test reads:

- rank 0: ``moments.pt``, the all-reduced second moments {name: (S, n)};
- every rank: ``targets_rank{r}.pt`` (its targets) and ``report_rank{r}.json`` (how many
  eigendecompositions it ran, and every file it wrote inside the distill run's folders).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from transformers import AutoModelForSequenceClassification

import sadlora.targets as targets_module
from sadlora.calibration import collect_second_moments, resolve_target_modules
from sadlora.cli import main as sadlora_main
from sadlora.targets import build_targets

MODULES = ["query", "value"]


def calibrate(root: Path, rank: int, world: int, report: dict) -> None:
    """Second moments and targets, each rank streaming every world-th batch."""
    base = AutoModelForSequenceClassification.from_pretrained(root / "base")
    teacher = AutoModelForSequenceClassification.from_pretrained(root / "spectral")
    shard = torch.load(root / "batches.pt")[rank::world]
    names = resolve_target_modules(base, MODULES)
    moments = collect_second_moments(base, shard, names, progress=False)
    if rank == 0:
        torch.save({n: (m.sum, m.count) for n, m in moments.items()}, root / "ddp" / "moments.pt")
    calls = []
    original = targets_module.data_weighted_subspace

    def counted(*args, **kwargs):  # counts the per-layer eigendecompositions of this rank
        calls.append(1)
        return original(*args, **kwargs)

    targets_module.data_weighted_subspace = counted
    try:
        targets = build_targets(teacher, base, shard, MODULES, rank=2, max_rank=4,
                                progress=False)
    finally:
        targets_module.data_weighted_subspace = original
    report["eigendecompositions"] = len(calls)
    torch.save({n: (t.basis, t.singular_values, t.total_energy)
                for n, t in targets.layers.items()}, root / "ddp" / f"targets_rank{rank}.pt")


def watch_writes(folders: list[Path], writes: list[str]) -> None:
    """Record every file operation that would create or change something under ``folders``
    (Python-level: open for writing, rename/replace, remove, mkdir)."""
    roots = [str(folder.resolve()) for folder in folders]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        text = os.path.abspath(os.fsdecode(path))
        return any(text == r or text.startswith(r + os.sep) for r in roots)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and inside(args[0]):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (not mode and flags & write_flags):
                writes.append(f"open {args[0]} {mode or flags}")
        elif event in ("os.rename", "os.remove", "os.mkdir", "shutil.copyfile") and (
                inside(args[0]) or (event == "os.rename" and inside(args[1]))):
            writes.append(f"{event} {args[0]}")

    sys.addaudithook(hook)


def main(root: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report: dict = {}
    calibrate(root, rank, world, report)
    config = yaml.safe_load((root / "distill.yaml").read_text())
    writes: list[str] = []
    watch_writes([Path(config["output_dir"]), Path(config["teacher_cache_dir"])], writes)
    report["exit_code"] = sadlora_main(["distill", "--config", str(root / "distill.yaml")])
    report["writes"] = list(writes)  # copied before the report itself is written
    (root / "ddp" / f"report_rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
