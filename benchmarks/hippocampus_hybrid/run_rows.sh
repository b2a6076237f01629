#!/usr/bin/env bash
# The hybrid rows of benchmarks/hippocampus_hybrid, one row at a time, each through `meddinov3-nnunet benchmark`
# (cpu preset: 10 epochs x 50 iterations, batch 32 in 2D and 2 in 3D, fold 0 unless given), from a frozen copy of the
# code (pip install --target SITE .) so that edits to the working tree cannot reach a running row.
#   WORK=~/meddinov3_hippocampus_benchmark benchmarks/hippocampus_hybrid/run_rows.sh SITE "TRAINER:CONFIG|SEED|FOLD" ...
# WORK holds nnU-Net's folders, planned and preprocessed by benchmarks/hippocampus/run.sh's step 1.
# The learning curve's 2000-step rows: PRESET=benchmarks/hippocampus_hybrid/cpu_2000.json (their own nnU-Net results
# folder, WORK/nnUNet_results_cpu_2000, and run folders named ..._cpu_2000). RUNS_PARENT=DIR writes the runs to DIR/runs
# (issue 22's rows: benchmarks/hippocampus/pretraining_small_data). RESULTS=DIR gives the trainings their own
# nnUNet_results: needed when a row is run again from other MEDDINOV3_WEIGHTS (a row already trained in the results
# folder is otherwise resumed: `benchmark` refuses one recorded with other weights, and cannot tell for rows trained
# before it kept that record).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${WORK:-$HOME/meddinov3_hippocampus_benchmark}"
PRESET="${PRESET:-cpu}"
TAG="$([ "$PRESET" = cpu ] || basename "$PRESET" .json)"
SITE=$1; shift
export nnUNet_raw="$WORK/nnUNet_raw" nnUNet_preprocessed="$WORK/nnUNet_preprocessed"
export nnUNet_results="${RESULTS:-$WORK/nnUNet_results${TAG:+_$TAG}}"
export nnUNet_n_proc_DA=2 nnUNet_def_n_proc=2
export PYTHONPATH=$SITE MEDDINOV3_NO_AUTOREGISTER=1 MEDDINOV3_AMP=bf16 nnUNet_extTrainer=$SITE/meddinov3_nnunet/nnunet_ext
OUT="${RUNS_PARENT:-$REPO/benchmarks/hippocampus_hybrid}"  # runs go to OUT/runs
for spec in "$@"; do
  IFS='|' read -r row seed fold <<< "$spec"
  name="$(echo "${row%%:*}" | sed 's/MedDINOv3Trainer_//')_${row#*:}_s${seed}_f${fold}${TAG:+_$TAG}"
  echo "=== $(date -u +%FT%T) start $row seed $seed fold $fold"
  "$REPO/.venv/bin/python" -m meddinov3_nnunet.cli benchmark -d 4 --preset "$PRESET" --seeds "$seed" --folds "$fold" \
      --rows "$row" -o "$OUT/runs/$name"
  echo "=== $(date -u +%FT%T) end $row rc=$?"
done
