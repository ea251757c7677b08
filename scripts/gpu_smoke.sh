#!/usr/bin/env bash
# GPU smoke test (scripts/gpu_smoke.py): the lifecycle on a CUDA GPU with its guarantees checked.
# Skips cleanly, exit 0, on a machine without a CUDA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_smoke: no CUDA GPU on this machine: skipped"
  exit 0
fi
exec "$PY" scripts/gpu_smoke.py --device cuda "$@"
