#!/usr/bin/env bash
# One-shot GPU check (< 10 min on one H100): writes benchmarks/gpu_check.md and .json. See benchmarks/gpu_check.py.
#   benchmarks/gpu_check.sh                  # on a GPU machine (one GPU: gloo ranks; two or more: NCCL)
#   benchmarks/gpu_check.sh --dry-run        # CPU, toy sizes, same code paths (what tests/nnunet/test_gpu_check.py runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" benchmarks/gpu_check.py "$@"  # sections share a time budget (--time-limit, 540 s on a GPU)
