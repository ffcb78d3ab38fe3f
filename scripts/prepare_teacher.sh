#!/usr/bin/env bash
# Fine-tune the KD teacher and the spectral teacher of one task.
#   scripts/prepare_teacher.sh [TASK] [KD_TEACHER_MODEL] [STUDENT_MODEL] [OUT]
# defaults: embedded:stsb asset:mpnet asset:minilm runs/<task>
set -euo pipefail
task=${1:-embedded:stsb}
kd_model=${2:-asset:mpnet}
student_model=${3:-asset:minilm}
out=${4:-runs/${task//:/_}}
sadlora prepare-teacher model="$kd_model" task="$task" output_dir="$out/kd_teacher" \
    learning_rate=5e-5 num_train_epochs=3 bf16=true
sadlora prepare-teacher model="$student_model" task="$task" output_dir="$out/spectral_teacher" \
    learning_rate=1e-4 num_train_epochs=3 bf16=true
