"""Smoke runs of every engine on one device with a store: DDP, FSDP2, tensor parallelism (a tiny transformer split
over a "tp" mesh of the ranks) and DeepSpeed ZeRO-1/2/3 (when deepspeed is importable), launched as
`torchrun --nproc_per_node 1 benchmarks/nccl_smoke.py`. On a GPU the process group is NCCL: a group of size 1
still takes every collective path (the engines' and shardshap's), so a collective issued on the wrong device
fails here. On CPU it is gloo (the script's CPU mode). Prints one PASS/FAIL line per engine and exits 1 if any
failed.
"""
from __future__ import annotations

import os
import sys
import tempfile
import traceback

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import shardshap  # noqa: E402
from shardshap.backends import init_distributed, shutdown  # noqa: E402
from shardshap.testing import cases  # noqa: E402

STEPS = 3


def on_device(batch, device):
    return tuple(x.to(device) for x in batch)


def run(engine: str, device: torch.device, store: str) -> str:
    build = cases.tiny_transformer if engine == "tp" else cases.tiny_gpt2
    case = build(batch_size=8, dtype=torch.float32)
    model = case.model.to(device)
    opt = None
    if engine == "tp":
        from torch.distributed.device_mesh import init_device_mesh

        from shardshap.testing.tensor_parallel import parallelize
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),), mesh_dim_names=("tp",))
        wrapped = parallelize(model, mesh)
    elif engine == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for block in model.transformer.h:
            fully_shard(block)
        wrapped = fully_shard(model)
    else:
        import deepspeed
        stage = int(engine[-1])
        wrapped, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
            "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
            "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9})
    if not engine.startswith("zero"):
        opt = torch.optim.AdamW(wrapped.parameters(), lr=3e-3)
    clip = None if engine.startswith("zero") else 1.0
    targets = on_device(case.batches(100)[0], device)  # a held-out batch, two targets of 4 sequences
    with shardshap.Attributor(wrapped, opt, case.train_loss, target_loss,
                              # (next-step checks: a GPU's default, so that the CPU mode takes the same path)
                              shardshap.Config(max_grad_norm=clip, num_samples=64, check_timing="next-step"),
                              store=store) as attr:
        for s in range(STEPS):
            (ids, mask), sample_ids = case.batches(s)
            micro = [on_device((ids[:4], mask[:4]), device), on_device((ids[4:], mask[4:]), device)]
            out = attr.step(micro, [sample_ids[:4], sample_ids[4:]], targets)
            assert torch.isfinite(out.scores).all()
    committed = shardshap.open_scores(store).num_steps
    assert committed == STEPS, f"the store committed {committed} of {STEPS} steps"
    return f"{out.metadata['bytes_sent']} bytes sent by shardshap in the last step"


def target_loss(model, targets):
    ids, mask = targets
    return cases.lm_losses(model, ids, mask).view(2, -1).mean(1)


def main():
    rank, world = init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    engines = ["ddp", "fsdp2", "tp"]
    try:
        import deepspeed  # noqa: F401
        engines += ["zero1", "zero2", "zero3"]
    except ImportError:
        print("deepspeed not importable: ZeRO-1/2/3 skipped", flush=True)
    backend = torch.distributed.get_backend()
    failed = 0
    for engine in engines:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                info = run(engine, device, os.path.join(tmp, f"{engine}.zarr"))
                print(f"PASS {engine} ({backend}, {world} rank(s), {device}): {info}", flush=True)
            except Exception:  # noqa: BLE001  (report every engine, then fail)
                failed += 1
                print(f"FAIL {engine} ({backend}, {device}):\n{traceback.format_exc()}", flush=True)
    shutdown()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
