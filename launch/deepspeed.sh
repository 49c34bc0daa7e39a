#!/usr/bin/env bash
# NPROC=2 bash launch/deepspeed.sh --config configs/demo_cpu.yaml [--set key=value ...]
# DeepSpeed's own launcher; on a CPU machine it runs with DS_ACCELERATOR=cpu (--num_gpus then counts processes).
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/_env.sh
exec deepspeed --num_gpus "$NPROC" launch/train.py "$@"
