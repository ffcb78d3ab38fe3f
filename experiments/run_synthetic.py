"""Controlled spectral validation experiment (see sadlora.experiments.synthetic).

    python experiments/run_synthetic.py --config configs/exp_synthetic.yaml [key=value ...]

Same as ``sadlora synthetic --config ...``; e.g. ``quick=true output_dir=/tmp/synthetic`` for a
few-second smoke run.
"""

import sys

from sadlora.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["synthetic", *sys.argv[1:]]))
