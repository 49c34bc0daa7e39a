"""One rank of a distributed attribution run (launched by tests/distributed/test_ddp_fsdp.py with torchrun or
mpiexec). Writes its per-sample values and the final parameters to an .npz file per rank."""
import argparse
import os

import numpy as np
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import shardshap  # noqa: E402
from helpers.distributed import GLOBAL_BATCH, MICRO, STEPS, local_micro_batches  # noqa: E402
from shardshap.backends import init_distributed, shutdown  # noqa: E402
from shardshap.testing import cases  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fail-at-step", type=int, default=-1, help="rank 1 raises at this step")
    ap.add_argument("--plain", action="store_true", help="train without attribution (the reference)")
    ap.add_argument("--low-level", action="store_true", help="the user's own loop: attr.record + attr.attribute")
    ap.add_argument("--store", default=None, help="stream the values to this store")
    ap.add_argument("--cold-steps", type=int, default=10, help="Config.cold_steps")
    ap.add_argument("--preset", default=None, help="Config.preset")
    ap.add_argument("--schedule", default="cached", help="Config.schedule")
    ap.add_argument("--product-rank", type=int, default=None, help="Config.product_rank")
    ap.add_argument("--stream-predictor", default="subspace", help="Config.stream_predictor")
    ap.add_argument("--check-timing", default=None, help="Config.check_timing")
    ap.add_argument("--mixed-precision", action="store_true",
                    help="FSDP2 MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)")
    ap.add_argument("--engine", default="ddp", choices=["ddp", "fsdp", "fsdp-keep"],
                    help="fsdp-keep: FSDP2 with reshard_after_forward=False")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, world = init_distributed()
    case = cases.tiny_gpt2(batch_size=GLOBAL_BATCH, dtype=torch.float32)
    if args.engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(case.model)
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        reshard = args.engine == "fsdp"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if args.mixed_precision else MixedPrecisionPolicy()
        for block in case.model.transformer.h:
            fully_shard(block, reshard_after_forward=reshard, mp_policy=mp)
        model = fully_shard(case.model, reshard_after_forward=reshard, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    train_loss = case.train_loss
    if rank == 1 and args.fail_at_step >= 0:
        calls = {"n": 0}

        def train_loss(m, b):  # fails inside attr.step, in the first micro-batch of step fail_at_step
            calls["n"] += 1
            if calls["n"] > args.fail_at_step * MICRO:
                raise RuntimeError("injected failure on rank 1")
            return case.train_loss(m, b)
    attr = shardshap.Attributor(model, opt, train_loss, case.target_loss,
                                shardshap.Config(max_grad_norm=1.0, num_samples=64, cold_steps=args.cold_steps,
                                                 preset=args.preset, schedule=args.schedule,
                                                 product_rank=args.product_rank,
                                                 stream_predictor=args.stream_predictor,
                                                 check_timing=args.check_timing),
                                store=args.store)
    ids_out, scores_out = [], []
    for step in range(STEPS):
        micro, micro_ids = local_micro_batches(case, step, rank, world)
        if args.plain:
            opt.zero_grad()
            n = sum(len(i) for i in micro_ids)
            for j, mb in enumerate(micro):
                skip_sync = args.engine == "ddp" and j < len(micro) - 1
                with model.no_sync() if skip_sync else torch.enable_grad():
                    (case.train_loss(model, mb).sum() / n).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            continue
        if args.low_level:  # the plain loop above, with record around each micro-batch and attribute before step
            opt.zero_grad()
            n = sum(len(i) for i in micro_ids)
            for j, (mb, ids) in enumerate(zip(micro, micro_ids)):
                skip_sync = args.engine == "ddp" and j < len(micro) - 1
                with model.no_sync() if skip_sync else torch.enable_grad(), attr.record(ids, targets=None):
                    (case.train_loss(model, mb).sum() / n).backward()
            out = attr.attribute(None)
            opt.step()
        else:
            out = attr.step(micro, micro_ids, None)
        ids_out.append(out.sample_ids.numpy())
        scores_out.append(out.scores.numpy())
        if rank == 0:
            print(f"{args.engine} step {step}: shardshap collectives sent {out.metadata['bytes_sent']} bytes "
                  f"(cold start: {out.metadata['cold_start']}), {out.metadata['seconds']:.3f} s", flush=True)
        if step == 1 and args.store:
            attr.state_dict()  # a training checkpoint: flushes the store
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p
    params = {n: full(p.detach()).numpy() for n, p in case.model.named_parameters()}
    if args.plain:
        np.savez(f"{args.out}.rank{rank}.npz", **params)
    else:
        np.savez(f"{args.out}.rank{rank}.npz", ids=np.stack(ids_out), scores=np.stack(scores_out), **params)
    attr.close()
    shutdown()


if __name__ == "__main__":
    main()
