"""Ablations of SAD-LoRA: a grid whose variants each change one setting of the reference.

    python experiments/run_ablations.py --config configs/exp_ablations.yaml [key=value ...]

Same as ``sadlora grid --config configs/exp_ablations.yaml``; resumable like every grid.
"""

import sys

from sadlora.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["grid", *sys.argv[1:]]))
