"""Controlled spectral validation experiment (see sadlora.experiments.synthetic).

Usage:
    python experiments/run_synthetic.py --config configs/exp_synthetic.yaml [key=value ...]
e.g. ``quick=true output_dir=/tmp/synthetic`` for a few-second smoke run.
"""

from __future__ import annotations

import argparse

from sadlora.config import load_config
from sadlora.experiments.synthetic import SyntheticConfig, run_synthetic


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (with optional base:)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of config fields")
    args = parser.parse_args(argv)
    results = run_synthetic(load_config(SyntheticConfig, args.config, args.overrides))
    print(f"wrote {results['config']['output_dir']} in {results['wall_time_s']:.1f} s")
    return results


if __name__ == "__main__":
    main()
