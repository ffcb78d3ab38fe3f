"""Spectral analysis of trained adapters (see sadlora.experiments.spectral_analysis).

    python experiments/run_spectral_analysis.py --config configs/exp_spectral_analysis.yaml \
        [key=value ...]

Same as ``sadlora spectral-analysis --config ...``; e.g.
``runs={kd_lora: runs/kd_lora, sad_lora_align: runs/sad} targets=runs/targets``.
"""

import sys

from sadlora.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["spectral-analysis", *sys.argv[1:]]))
