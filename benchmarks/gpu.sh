#!/bin/sh
# The GPU check of benchmarks/gpu.py, under 8 minutes: run it whenever a GPU is lent (the device tool), then commit
# benchmarks/results/gpu.md. PYTHON defaults to the repository's .venv, else python3 (with torch installed).
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
PYTHONPATH=src exec timeout 480 "$PY" benchmarks/gpu.py "$@"
