#!/usr/bin/env bash
# Regenerates benchmarks/hippocampus/ (table, plots, per-row evaluations) on the 200 Hippocampus cases of
# ../shared, fold 0 of nnU-Net's default 5-fold split, with the `cpu` benchmark preset. About 1.6 h on 2 CPU cores (measured).
#   benchmarks/hippocampus/run.sh            # WORK=~/meddinov3_hippocampus_benchmark holds nnU-Net's folders
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
SHARED="${MEDDINOV3_SHARED:-$REPO/../shared}"
WORK="${WORK:-$HOME/meddinov3_hippocampus_benchmark}"
BIN="${BIN:-$REPO/.venv/bin}"
OUT="$REPO/benchmarks/hippocampus"

export nnUNet_raw="$WORK/nnUNet_raw" nnUNet_preprocessed="$WORK/nnUNet_preprocessed" nnUNet_results="$WORK/nnUNet_results"
export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-2}" nnUNet_def_n_proc="${nnUNet_def_n_proc:-2}"
export nnUNet_extTrainer="$("$BIN/meddinov3-nnunet" doctor --trainer-dir)"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
[ -e "$nnUNet_raw/Dataset004_Hippocampus" ] || ln -s "$SHARED/datasets/Dataset004_Hippocampus" "$nnUNet_raw/Dataset004_Hippocampus"

# 1. nnU-Net planning + preprocessing (2d, 3d_fullres), the ViT-aware 2d_meddinov3 (cpu planning preset), the split
"$BIN/meddinov3-nnunet" benchmark -d 4 --preset cpu -o "$OUT" --prepare-only

# 2. pretrain the tiny encoder on the training images of fold 0 only (no validation image is seen), then export it
PRE="$WORK/pretrain_fold0"
if [ ! -f "$PRE/export/encoder.pth" ]; then
  if [ -f "$PRE/checkpoint.pth" ]; then RESUME=--resume; else RESUME=""; fi
  "$BIN/meddinov3-nnunet" pretrain --config tiny_cpu --data "$nnUNet_raw/Dataset004_Hippocampus" \
      --nnunet-split "$nnUNet_preprocessed/Dataset004_Hippocampus/splits_final.json" --fold 0 -o "$PRE" \
      --no-progress $RESUME
  "$BIN/meddinov3-nnunet" export "$PRE"
fi
mkdir -p "$OUT/pretraining"
cp "$PRE/loss_curves.png" "$OUT/pretraining/loss_curves_fold0_tiny.png"
"$BIN/python" "$REPO/benchmarks/pretraining/summarise_run.py" "$PRE" > "$OUT/pretraining/run_summary_fold0_tiny.json"

# 3. all rows under the same budget; finished rows are skipped on a re-run
MEDDINOV3_WEIGHTS="$PRE/export/encoder.pth" "$BIN/meddinov3-nnunet" benchmark -d 4 --preset cpu -o "$OUT"
