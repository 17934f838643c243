#!/usr/bin/env bash
# fedsim's GPU figures in one go, under 8 minutes on one GPU (what it measures: bench/gpu.py).
# After `make install GPU=1`:  bench/gpu.sh [--tiny] [--out DIR] [--budget-s S]
# Writes bench/results/gpu_*.json (or DIR/gpu_*.json); --tiny is a CPU smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec timeout --signal=TERM --kill-after=20 "${GPU_BENCH_LIMIT_S:-480}" "$PY" bench/gpu.py "$@"
