#!/usr/bin/env bash
# The throughput checks for a lent GPU machine, in one call (docs/benchmarks.md, "Machines"):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# W1 quick table (exact, exact + compile_math, rank 16, bf16 cache + rank 16, preset fast) and rho sweep, the
# phase split of preset fast, then W2 with the per-sample-gradient baseline. Each part has its own time limit,
# so that one slow part cannot take the others' time: ~9 minutes at most, to fit one 10-minute device command.
# Needs only torch and transformers (the benchmark imports no store or recipe code).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
py="$(command -v python3 || command -v python)"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  git log -1 --format='library code %h %s' 2>/dev/null || true
  echo "## W1 quick"
  timeout 240 "$py" benchmarks/throughput.py --quick --device cuda
  echo "## breakdown, preset fast"
  timeout 60 "$py" benchmarks/throughput.py --breakdown fast --device cuda
  echo "## W2"
  timeout 220 "$py" benchmarks/throughput.py --workloads w2 --device cuda
} 2>&1 | tee "$out/gpu_check.log"
