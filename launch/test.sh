#!/usr/bin/env bash
# Installs into ./.venv, checks the code with ruff (pyproject.toml) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
. .venv/bin/activate
ruff check shardshap tests benchmarks launch
python -m pytest -q tests "$@"
