#!/usr/bin/env bash
# GPU checks for one H100/H200, nothing downloaded (a random-init Gemma-2B-shaped trunk): cache captions/s
# and MFU in bf16, a Ray Train (NCCL) step at global batch 1024, masked vs separate passes. JSON out.
# Finishes in under 8 minutes; `--toy` runs it at toy size on a CPU (make test does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
