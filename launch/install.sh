#!/usr/bin/env bash
# Installs shardshap and everything its tests need into ./.venv (idempotent).
# torch comes first, pinned to the CPU build: anything that depends on torch would otherwise pull a
# multi-GB CUDA build. On a GPU machine, install your CUDA torch into the venv before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>/dev/null || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,hf,distributed]"
