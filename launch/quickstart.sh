#!/usr/bin/env bash
# The quickstart: installs into ./.venv, builds the demo corpus (stdlib code and docstrings plus generated junk),
# trains a tiny GPT-2 with attribution on 2 CPU ranks under DeepSpeed ZeRO-2 (configs/demo_cpu.yaml), then prints
# `shardshap report` and writes `shardshap plot` PNGs to runs/quickstart/plots/.
#
#   bash launch/quickstart.sh [--steps N] [--nproc N] [--gpu] [--no-install] [--set key=value ...]
#     --steps N     optimizer steps (default 500, configs/demo_cpu.yaml)
#     --nproc N     ranks (default 2; with --gpu: one per GPU)
#     --gpu         train on GPUs (DeepSpeed on CUDA, nccl)
#     --no-install  skip launch/install.sh (the venv exists)
#     --set k=v     any config override, e.g. --set train.lr=1e-3
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=2; GPU=0; INSTALL=1; SETS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --steps) SETS+=(--set "train.steps=$2"); shift 2 ;;
        --nproc) NPROC=$2; shift 2 ;;
        --gpu) GPU=1; shift ;;
        --no-install) INSTALL=0; shift ;;
        --set) SETS+=(--set "$2"); shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "quickstart.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ "$INSTALL" = 1 ] && bash launch/install.sh
. .venv/bin/activate
OUT=runs/quickstart
if [ "$GPU" = 1 ]; then
    SETS+=(--set train.device=cuda --set train.threads=null)
else
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
fi
export TRANSFORMERS_VERBOSITY=error
t0=$(date +%s)
python launch/demo_corpus.py --out "$OUT/data"
torchrun --standalone --nproc_per_node "$NPROC" launch/train.py --config configs/demo_cpu.yaml ${SETS[@]+"${SETS[@]}"}
echo
shardshap report "$OUT/run.zarr"
shardshap plot "$OUT/run.zarr" -o "$OUT/plots"
echo "quickstart: done in $(( $(date +%s) - t0 )) s (after install); store $OUT/run.zarr, plots in $OUT/plots/"
