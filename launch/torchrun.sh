#!/usr/bin/env bash
# NPROC=2 bash launch/torchrun.sh --config configs/demo_cpu.yaml [--set key=value ...]
# Any engine (none needs NPROC=1; ddp, fsdp2, deepspeed). Multi-node: call torchrun yourself (--nnodes, --rdzv-endpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/_env.sh
exec torchrun --standalone --nproc_per_node "$NPROC" launch/train.py "$@"
