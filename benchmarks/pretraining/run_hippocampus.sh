#!/usr/bin/env bash
# The "must show on real data" run of the pretraining module, regenerable with this one command:
#   bash benchmarks/pretraining/run_hippocampus.sh          (about 20 min pretraining + 7 min probe on 2 CPU cores)
# Extra arguments go to `pretrain`, e.g. --set optim.teacher_temp.peak=0.02 (see docs/pretraining.md, iBOT).
# Pretrains the tiny_cpu recipe from scratch on the unlabeled Dataset004_Hippocampus images (the 40 probe test
# cases excluded) plus the TotalSegmentator example CT, exports the teacher, and runs the linear probe.
# Writes loss_curves.png, run_summary.json and probe_results.json next to this script.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
SHARED=${MEDDINOV3_SHARED:-../shared}
RUN=${RUN:-/tmp/meddinov3_pretrain_hippocampus}
OUT=benchmarks/pretraining
export OMP_NUM_THREADS=1   # one thread per process: multi-threaded OpenMP on 2 busy shared cores was ~14x slower

rm -rf "$RUN"
"$PYTHON" -m meddinov3_nnunet.cli pretrain --config tiny_cpu \
    --data "$SHARED/datasets/Dataset004_Hippocampus" \
    --data "ct=$SHARED/datasets/ct_example_totalsegmentator/example_ct.nii.gz" \
    --exclude-cases "$OUT/probe_test_cases.txt" \
    --corpus-workers 2 --device cpu -o "$RUN" "$@"
"$PYTHON" -m meddinov3_nnunet.cli export "$RUN"
"$PYTHON" "$OUT/summarise_run.py" "$RUN" > "$OUT/run_summary.json"
cp "$RUN/loss_curves.png" "$OUT/loss_curves.png"
OMP_NUM_THREADS=2 "$PYTHON" "$OUT/linear_probe.py" --encoder "$RUN/export/encoder.pth" --out "$OUT/probe_results.json"
