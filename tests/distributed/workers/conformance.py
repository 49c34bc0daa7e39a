"""One rank of the backend conformance run (tests/distributed/test_conformance.py): every backend that needs
ranks (DDP, FSDP2, DeepSpeed ZeRO-1/2/3) in turn, in one torchrun; rank 0 prints one CONFORMANCE line of
JSON per engine."""
import argparse
import json
import os

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import shardshap  # noqa: E402
from helpers.distributed import GLOBAL_BATCH, MICRO, local_micro_batches  # noqa: E402
from shardshap.backends import init_distributed, shutdown  # noqa: E402
from shardshap.testing import cases  # noqa: E402
from shardshap.testing.conformance import run_conformance  # noqa: E402

CLIP = 0.05  # far below the gradient norm: every step is clipped


def build(engine: str, world: int):
    """(case, model or DeepSpeed engine, optimizer or None, full_grads)."""
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g.clone()
    if engine == "tp":  # tensor parallelism over every rank (they all see the same samples)
        from torch.distributed.device_mesh import init_device_mesh

        from shardshap.testing.tensor_parallel import parallelize
        case = cases.tiny_transformer(batch_size=GLOBAL_BATCH, dtype=torch.float32)
        model = parallelize(case.model, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        return case, model, opt, lambda: {n: full(p.grad) for n, p in model.named_parameters()}
    case = cases.tiny_gpt2(batch_size=GLOBAL_BATCH, dtype=torch.float32)
    if engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(case.model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        return case, model, opt, lambda: {n: p.grad.clone() for n, p in model.module.named_parameters()}
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for block in case.model.transformer.h:
            fully_shard(block)
        model = fully_shard(case.model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        return case, model, opt, lambda: {n: full(p.grad) for n, p in model.named_parameters()}
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    zero = {"stage": int(engine[1])}
    if zero["stage"] == 3:
        zero["stage3_param_persistence_threshold"] = 0
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world // MICRO, "gradient_accumulation_steps": MICRO,
              "gradient_clipping": CLIP, "zero_optimization": zero, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}}}
    model, _, _, _ = deepspeed.initialize(model=case.model, model_parameters=case.model.parameters(), config=config)
    return case, model, None, lambda: {n: safe_get_full_grad(p).clone() for n, p in model.module.named_parameters()}


def check(engine: str, rank: int, world: int) -> dict:
    """The conformance checks of one engine on this rank (every rank calls it)."""
    case, model, opt, full_grads = build(engine, world)
    clip = CLIP if engine.startswith("z") else None
    attr = shardshap.Attributor(model, opt, case.train_loss, case.target_loss, shardshap.Config(max_grad_norm=clip))
    step = iter(range(10))
    if engine == "tp":
        rank, world = 0, 1  # (the data: one data-parallel rank)

    def run_step():
        micro, ids = local_micro_batches(case, next(step), rank, world)
        attr.step(micro, ids, None)

    def backward():
        backend = attr.backend
        micro, _ = local_micro_batches(case, next(step), rank, world)
        backend.zero_grad(attr.optimizer)
        for j, mb in enumerate(micro):
            with backend.no_sync(j == len(micro) - 1):
                backend.backward(case.train_loss(model, mb).sum() / GLOBAL_BATCH * world)
            backend.after_micro_batch(j == len(micro) - 1)

    run_step()  # warm optimizer state (DeepSpeed creates it at the first step)
    results = run_conformance(attr, backward, run_step, full_grads,
                              lambda: case.target_loss(attr.module, None)[:1], max_norm=CLIP)
    backend = type(attr.backend).__name__
    attr.close()
    if engine.startswith("z"):
        model.destroy()
    return {"engine": engine, "backend": backend, "results": results}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="ddp,fsdp2,tp,z1,z2,z3")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, world = init_distributed("gloo")
    if any(e.startswith("z") for e in args.engines.split(",")):
        import deepspeed
        deepspeed.init_distributed("gloo")
    for engine in args.engines.split(","):
        result = check(engine, rank, world)
        if rank == 0:
            print("CONFORMANCE " + json.dumps(result), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
