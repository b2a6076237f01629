#!/usr/bin/env bash
# One-shot GPU check (< 8 min on one GPU): writes benchmarks/gpu_check.md. See benchmarks/gpu_check.py.
#   benchmarks/gpu_check.sh                  # on a GPU machine
#   benchmarks/gpu_check.sh --dry-run        # CPU, tiny sizes, same code paths (what the test runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" benchmarks/gpu_check.py "$@"  # sections share a time budget (--time-limit, 450 s on a GPU)
