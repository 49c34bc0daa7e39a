"""Reference trainer: `python launch/train.py --config configs/demo_cpu.yaml [--set train.steps=50 ...]`.

Works under every launcher: plain python, `torchrun --nproc_per_node N`, `deepspeed`, `mpiexec -n N`
(docs/training.md). The config schema is shardshap/recipe/config.py."""
import argparse
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from shardshap.config import ConfigError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML or JSON training config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set train.steps=100 (repeatable; values are YAML)")
    # the deepspeed launcher passes --local_rank
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from shardshap.recipe.config import load_config
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        print(f"launch/train.py: error: {err}", file=sys.stderr)
        return 2
    if cfg.distributed.engine == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    import shardshap
    from shardshap.recipe.train import run
    try:
        run(cfg)
    except ConfigError as err:  # the same on every rank (config and data are read by all)
        print(f"launch/train.py: error: {err}", file=sys.stderr)
        return 2
    shardshap.shutdown()  # not after an error: a barrier with a dead rank would hang
    return 0


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
