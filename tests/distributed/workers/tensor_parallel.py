"""One rank of a tensor-parallel attribution run (tests/distributed/test_tensor_parallel.py): the tiny transformer
of shardshap.testing.tensor_parallel under one layout, attributed, and a second copy trained the same way without
attribution. Writes the per-sample values and both copies' final parameters (whole, DTensor.full_tensor; the
plain copy's as "plain:<name>") to an .npz file per rank."""
import argparse
import os

import numpy as np
import torch

import shardshap
from helpers.distributed import GLOBAL_BATCH, STEPS, local_micro_batches
from shardshap.backends import init_distributed, shutdown
from shardshap.backends.dtensor import clip_grad_norm_
from shardshap.testing import cases
from shardshap.testing.tensor_parallel import parallelize

LAYOUTS = {  # name: (mesh shape, mesh dimension names)
    "tp": ((2,), ("tp",)),
    "tp-sp": ((2,), ("tp",)),
    "fsdp-tp": ((2, 2), ("dp", "tp")),
    "fsdp-tp-sp": ((2, 2), ("dp", "tp")),
    "hsdp": ((2, 2), ("replicate", "shard")),
}


def build(layout: str, case, mesh):
    """(model, data-parallel rank, data-parallel size) of a layout."""
    from torch.distributed.fsdp import fully_shard
    model = case.model
    if layout in ("tp", "tp-sp"):
        return parallelize(model, mesh, sequence_parallel=layout == "tp-sp"), 0, 1
    if layout.startswith("fsdp-tp"):
        parallelize(model, mesh["tp"], sequence_parallel=layout == "fsdp-tp-sp")
        for block in model.layers:
            fully_shard(block, mesh=mesh["dp"])
        return fully_shard(model, mesh=mesh["dp"]), mesh["dp"].get_local_rank(), 2
    for block in model.layers:  # HSDP: replicate x shard, every rank its own samples
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh), mesh.get_rank(), 4


def train(case, model, opt, dp_rank, dp_size, attr, clip, on_step, torch_clip: bool):
    """STEPS steps of the global batches: attributed (`attr.step`), or plain when `attr` is None (clipped by torch's
    clip_grad_norm_ where it takes the model's parameters: all DTensors on one mesh)."""
    for step in range(STEPS):
        micro, micro_ids = local_micro_batches(case, step, dp_rank, dp_size)
        if attr is None:
            opt.zero_grad()
            n = sum(len(i) for i in micro_ids)
            for mb in micro:
                (case.train_loss(model, mb).sum() / n).backward()
            (torch.nn.utils.clip_grad_norm_ if torch_clip else clip_grad_norm_)(model.parameters(), clip)
            opt.step()
        else:
            on_step(step, attr.step(micro, micro_ids, None))


def main():
    from torch.distributed.device_mesh import init_device_mesh
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--store", default=None, help="stream the values to this store")
    ap.add_argument("--clip", type=float, default=0.05)
    ap.add_argument("--cold-steps", type=int, default=10, help="Config.cold_steps (0: every step warm)")
    ap.add_argument("--schedule", default="cached", help="Config.schedule")
    ap.add_argument("--preset", default=None, help="Config.preset")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, _ = init_distributed()
    shape, names = LAYOUTS[args.layout]
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p
    saved = {}
    for attributed in (True, False):
        case = cases.tiny_transformer(batch_size=GLOBAL_BATCH, dtype=torch.float32)
        model, dp_rank, dp_size = build(args.layout, case, mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        attr = None if not attributed else shardshap.Attributor(
            model, opt, case.train_loss, case.target_loss,
            shardshap.Config(max_grad_norm=args.clip, num_samples=64, cold_steps=args.cold_steps,
                             schedule=args.schedule, preset=args.preset), store=args.store)
        ids_out, scores_out = [], []

        def on_step(step, out, ids_out=ids_out, scores_out=scores_out):
            ids_out.append(out.sample_ids.numpy())
            scores_out.append(out.scores.numpy())
            if rank == 0:
                print(f"{args.layout} step {step}: clip {float(out.clip_factor):.4f}, shardshap collectives sent "
                      f"{out.metadata['bytes_sent']} bytes ({out.metadata.get('bytes_sent_model_parallel', 0)} over "
                      f"the model-parallel group), cold start: {out.metadata['cold_start']}", flush=True)
        train(case, model, opt, dp_rank, dp_size, attr, args.clip, on_step,
              torch_clip=args.layout in ("tp-sp", "hsdp"))
        prefix = "" if attributed else "plain:"
        saved.update({prefix + n: full(p.detach()).numpy() for n, p in case.model.named_parameters()})
        if attr is not None:
            saved.update(ids=np.stack(ids_out), scores=np.stack(scores_out))
            attr.close()
    np.savez(f"{args.out}.rank{rank}.npz", **saved)
    shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
