"""Instruction following with a causal LM (see sadlora.experiments.llama_instruct).

    python experiments/run_llama_instruct.py --config configs/exp_llama_instruction.yaml \
        [key=value ...]

Same as ``sadlora llama-instruct --config ...``; with a model hub e.g.
``base_model=meta-llama/Llama-3.2-1B-Instruct kd_teacher=meta-llama/Llama-3.2-3B-Instruct``.
"""

import sys

from sadlora.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["llama-instruct", *sys.argv[1:]]))
