"""The GLUE distillation experiment: a resumable grid of tasks x ranks x methods x seeds.

    python experiments/run_roberta_glue.py --config configs/exp_roberta_glue.yaml  # the paper's
    python experiments/run_roberta_glue.py --config configs/exp_embedded.yaml      # offline

Same as ``sadlora grid --config ...``; ``key=value`` arguments override the config.
"""

import sys

from sadlora.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["grid", *sys.argv[1:]]))
