# Sourced by the launch wrappers: CPU defaults when no GPU is visible (DeepSpeed on CPU, one thread per rank).
NPROC=${NPROC:-2}
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error}
