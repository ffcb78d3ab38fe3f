#!/usr/bin/env bash
# Spectral targets of the spectral teacher's update, weighted by the task's input second moment.
#   scripts/extract_teacher_svd.sh [TASK] [STUDENT_MODEL] [OUT] [RANK]
set -euo pipefail
task=${1:-embedded:stsb}
student_model=${2:-asset:minilm}
out=${3:-runs/${task//:/_}}
rank=${4:-8}
sadlora extract spectral_teacher="$out/spectral_teacher" base_model="$student_model" \
    task="$task" target_modules=[query,value] rank="$rank" max_rank=64 \
    calibration_examples=512 output_dir="$out/targets"
