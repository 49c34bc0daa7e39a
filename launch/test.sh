#!/usr/bin/env bash
# Installs into ./.venv and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
. .venv/bin/activate
python -m pytest -q tests "$@"
