"""One rank of a packed-sequence run with per-position sample ids (launched by
tests/distributed/test_documents.py): rank r trains rows 2r and 2r+1 of each step's packed batch, one row per
micro-batch, so that documents are cut across micro-batches and across ranks. Writes its documents' values
and the final parameters to an .npz file per rank."""
import argparse
import os

import numpy as np
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import shardshap  # noqa: E402
from shardshap.backends import init_distributed, shutdown  # noqa: E402
from shardshap.testing import cases  # noqa: E402

STEPS = 3


def rows_of(case, step, ranks):
    """The micro-batches (one packed row each) and their per-position ids of `ranks`, in rank order."""
    batch, ids = case.batches(step)
    rows = [r for rank in ranks for r in (2 * rank, 2 * rank + 1)]
    return [tuple(x[r:r + 1] for x in batch) for r in rows], [ids[r:r + 1] for r in rows]


def config(clip: bool = True):
    return shardshap.Config(max_grad_norm=1.0 if clip else None, num_samples=1000, cold_steps=0, store_slots=8)


def dtype_of(engine: str):
    return torch.float32 if engine.startswith("zero") else torch.float64  # (DeepSpeed's CPU path: fp32)


def deepspeed_engine(model, stage: int):
    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
        "steps_per_print": 10 ** 9})
    return engine


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--store", default=None)
    ap.add_argument("--engine", default="ddp", choices=["ddp", "fsdp", "zero2", "zero3"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, world = init_distributed()
    case = cases.packed_lm("gpt2", dtype=dtype_of(args.engine))
    opt = None
    if args.engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(case.model)
    elif args.engine.startswith("zero"):
        model = deepspeed_engine(case.model, int(args.engine[-1]))
    else:
        from torch.distributed.fsdp import fully_shard
        for block in case.model.transformer.h:
            fully_shard(block)
        model = fully_shard(case.model)
    if not args.engine.startswith("zero"):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    attr = shardshap.Attributor(model, opt, case.train_loss, case.target_loss,
                                config(clip=opt is not None), store=args.store)
    ids_out, scores_out, loss_out = [], [], []
    for step in range(STEPS):
        micro, micro_ids = rows_of(case, step, [rank])
        out = attr.step(micro, micro_ids, None)
        ids_out.append(out.sample_ids.numpy())
        scores_out.append(out.scores.numpy())
        loss_out.append(out.sample_loss.numpy())
    attr.close()
    if args.engine.startswith("zero"):
        from deepspeed.utils import safe_get_full_fp32_param
        params = {n: safe_get_full_fp32_param(p).detach().numpy() for n, p in model.module.named_parameters()}
    else:
        full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p
        params = {n: full(p.detach()).numpy() for n, p in case.model.named_parameters()}
    np.savez(f"{args.out}.rank{rank}.npz", **params,
             **{f"{key}{s}": v[s] for key, v in (("ids", ids_out), ("scores", scores_out), ("loss", loss_out))
                for s in range(STEPS)})
    shutdown()


if __name__ == "__main__":
    main()
