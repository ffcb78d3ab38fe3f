"""Spectral analysis of trained adapters (see sadlora.experiments.spectral_analysis).

Usage:
    python experiments/run_spectral_analysis.py --config configs/exp_spectral_analysis.yaml \
        [key=value ...]
e.g. ``runs={kd_lora: runs/kd_lora, sad_lora_align: runs/sad} targets=runs/targets``.
"""

from __future__ import annotations

import argparse

from sadlora.config import load_config
from sadlora.experiments.spectral_analysis import SpectralAnalysisConfig, run_spectral_analysis


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (with optional base:)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of config fields")
    args = parser.parse_args(argv)
    results = run_spectral_analysis(load_config(SpectralAnalysisConfig, args.config,
                                                args.overrides))
    print(f"wrote {results['config']['output_dir']} in {results['wall_time_s']:.1f} s")
    return results


if __name__ == "__main__":
    main()
