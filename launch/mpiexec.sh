#!/usr/bin/env bash
# NPROC=2 bash launch/mpiexec.sh --config configs/demo_cpu.yaml [--set key=value ...]
# MPI launch (the mpich wheel's mpiexec): shardshap.init_distributed takes the ranks from mpi4py.
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/_env.sh
exec mpiexec -n "$NPROC" python launch/train.py "$@"
