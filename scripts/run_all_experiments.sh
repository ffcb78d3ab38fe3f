#!/usr/bin/env bash
# Every experiment of the README, in order, with its default config. Each step is resumable:
# run the script again after an interruption and complete steps are skipped.
#   scripts/run_all_experiments.sh            # offline (packaged models and data)
#   GLUE=1 scripts/run_all_experiments.sh     # also the paper's RoBERTa grid (needs a hub)
set -euo pipefail
cd "$(dirname "$0")/.."
python experiments/run_synthetic.py --config configs/exp_synthetic.yaml
python experiments/run_roberta_glue.py --config configs/exp_embedded.yaml
if [ "${GLUE:-0}" = 1 ]; then
    python experiments/run_roberta_glue.py --config configs/exp_roberta_glue.yaml
fi
for script in run_ablations run_spectral_analysis run_llama_instruct; do
    config=configs/exp_${script#run_}.yaml
    [ "$script" = run_llama_instruct ] && config=configs/exp_llama_instruction.yaml
    if [ -f "experiments/$script.py" ]; then
        python "experiments/$script.py" --config "$config"
    fi
done
