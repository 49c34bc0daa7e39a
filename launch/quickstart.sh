#!/usr/bin/env bash
# Installs into ./.venv and runs the quickstart: a tiny GPT-2 trained with attribution on a corpus built
# from this Python's own standard library (code, prose) plus a generated junk domain.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
. .venv/bin/activate
python launch/quickstart.py "$@"
