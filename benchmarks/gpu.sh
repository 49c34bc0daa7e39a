#!/usr/bin/env bash
# Issue 15's checks for a lent GPU machine, in one time-boxed call (docs/benchmarks.md, "GPU step: the script"):
#   bash benchmarks/gpu.sh                        # GPU: NCCL smoke runs, then the GPT-2 small / Llama-370M table
#   bash benchmarks/gpu.sh --device cpu --tiny    # the same pipeline on CPU (gloo, tiny models), to test it here
# Writes gpu.log and gpu_llm.md to $OUT (default /tmp/shardshap-gpu); ~8 minutes at most on a GPU.
# The GPU image brings a CUDA torch and transformers but not zarr, numcodecs or deepspeed, and reaches no
# network: their wheels travel in .whl/ (docs/benchmarks.md has the pip download line) and are installed into
# /tmp/site. Without deepspeed the ZeRO smoke runs are skipped (and say so).
set -uo pipefail
cd "$(dirname "$0")/.."
device=cuda
tiny=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --tiny) tiny="--tiny"; shift ;;
    *) echo "gpu.sh: unknown argument $1 (use --device cuda|cpu, --tiny)" >&2; exit 2 ;;
  esac
done
out="${OUT:-/tmp/shardshap-gpu}"
mkdir -p "$out"
py="$(command -v python3 || command -v python)"
if [ "$device" != cpu ] && ls .whl/*.whl >/dev/null 2>&1; then  # (CPU mode: this machine's venv has them)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu.sh: installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
if [ "$device" = cpu ]; then
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
fi
status=0
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)"
  git log -1 --format='library code %h %s' 2>/dev/null || true
  echo "## smoke runs: DDP, FSDP2, ZeRO-1/2/3 with a store, one rank (NCCL on a GPU)"
  timeout 240 "$py" -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/nccl_smoke.py || status=1
  echo "## GPT-2 small and Llama-370M, bf16 autocast, rho 1/16, K 1 and 2"
  timeout 300 "$py" benchmarks/gpu_llm.py --device "$device" $tiny --out "$out/gpu_llm.md" || status=1
  exit $status
} 2>&1 | tee "$out/gpu.log"
exit "${PIPESTATUS[0]}"
