"""The ``sadlora`` command.

Every subcommand reads a dataclass config from ``--config FILE`` (YAML, ``base:`` inheritance)
plus ``key=value`` overrides, and calls one library function with it:

    sadlora synthetic --config configs/exp_synthetic.yaml quick=true
    sadlora distill --config configs/distill.yaml method=sad_lora_align lora_rank=16
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from dataclasses import dataclass

from .config import load_config

__all__ = ["main", "COMMANDS"]


@dataclass(frozen=True)
class Command:
    """A subcommand: ``runner`` and ``config`` are ``module:attribute`` paths, imported lazily
    so that ``sadlora --help`` does not import torch or transformers."""

    help: str
    runner: str | None
    config: str | None = None


COMMANDS: dict[str, Command] = {
    "prepare-teacher": Command(
        "full fine-tune of a model on a task (the KD teacher or the spectral teacher)",
        "sadlora.commands:prepare_teacher", "sadlora.commands:TeacherConfig"),
    "extract": Command("per-layer spectral targets of a spectral teacher's update",
                       "sadlora.commands:extract", "sadlora.commands:ExtractConfig"),
    "distill": Command("distil a teacher into a LoRA student (every method of DESIGN.md §2)",
                       "sadlora.commands:distill", "sadlora.commands:DistillConfig"),
    "evaluate": Command("task metrics of a saved student",
                        "sadlora.commands:evaluate", "sadlora.commands:EvaluateConfig"),
    "demo": Command(
        "the main job: teachers, targets and LoRA distillation on the embedded STS-B",
        "sadlora.experiments.demo:run_demo", "sadlora.experiments.demo:DemoConfig"),
    "grid": Command(
        "a resumable grid of tasks x ranks x methods x seeds with shared teachers and targets",
        "sadlora.experiments.grid:run_grid", "sadlora.experiments.grid:GridConfig"),
    "spectral-analysis": Command(
        "angles, effective rank, intruders and T_I/T_II/T_III of trained adapters",
        "sadlora.experiments.spectral_analysis:run_spectral_analysis",
        "sadlora.experiments.spectral_analysis:SpectralAnalysisConfig"),
    "llama-instruct": Command(
        "instruction-following distillation of a causal LM (SmolLM2 offline, Llama with a hub)",
        "sadlora.experiments.llama_instruct:run_llama_instruct",
        "sadlora.experiments.llama_instruct:LlamaInstructConfig"),
    "synthetic": Command(
        "controlled spectral validation of Theorems 1-3 on linear layers",
        "sadlora.experiments.synthetic:run_synthetic",
        "sadlora.experiments.synthetic:SyntheticConfig",
    ),
}



# Subcommands whose config has a ``quick`` size.
QUICK = ("demo", "synthetic")


def _resolve(path: str):
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sadlora",
        description="SAD-LoRA: spectral alignment distillation for low-rank adaptation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        sub.add_argument("--config", help="YAML config file (may name a base: file)")
        sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="config overrides, e.g. lora_rank=16 seeds=[0,1,2]")
        if name in QUICK:
            sub.add_argument("--quick", action="store_true",
                             help="the small size (same as the override quick=true)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    command = COMMANDS[args.command]
    overrides = list(args.overrides) + (["quick=true"] if getattr(args, "quick", False) else [])
    try:
        config = load_config(_resolve(command.config), args.config, overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"sadlora {args.command}: {error}", file=sys.stderr)
        return 2
    result = _resolve(command.runner)(config)
    if isinstance(result, dict) and "summary" in result:
        print(json.dumps(result["summary"], indent=2, default=str))
    elif isinstance(result, dict) and "wall_time_s" in result:
        print(f"wrote {result['config']['output_dir']} in {result['wall_time_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
