"""Instruction following with a causal LM (see sadlora.experiments.llama_instruct).

Usage:
    python experiments/run_llama_instruct.py --config configs/exp_llama_instruction.yaml \
        [key=value ...]
e.g. ``base_model=meta-llama/Llama-3.2-1B-Instruct kd_teacher=meta-llama/Llama-3.2-3B-Instruct``
with a model hub.
"""

from __future__ import annotations

import argparse

from sadlora.config import load_config
from sadlora.experiments.llama_instruct import LlamaInstructConfig, run_llama_instruct


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (with optional base:)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of config fields")
    args = parser.parse_args(argv)
    results = run_llama_instruct(load_config(LlamaInstructConfig, args.config, args.overrides))
    print(f"wrote {results['config']['output_dir']} in {results['wall_time_s']:.1f} s")
    return results


if __name__ == "__main__":
    main()
