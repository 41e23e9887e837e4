#!/usr/bin/env bash
# One-shot GPU suite (benchmarks/gpu_suite.py): ResNet-50 -> ResNet-50 at 224 px, bf16, channels_last;
# every ratio's baseline measured in the same run; <= 8 minutes on one H100/H200.
# Writes runs/gpu_suite/suite.json and suite.md (or the folder given as $1); extra flags pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_suite}"
shift || true
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
exec "$PY" benchmarks/gpu_suite.py --out "$OUT" "$@"
