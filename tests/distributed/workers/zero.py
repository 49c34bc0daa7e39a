"""One rank of the DeepSpeed tests (launched by tests/distributed/test_deepspeed.py with torchrun or mpiexec).

For each requested ZeRO configuration it trains the tiny GPT-2 of shardshap/testing/cases.py twice in this process:
with shardshap.Attributor(ds_engine, None, ...) and plain (engine.backward / engine.step only), on the same
global batches, and writes per-sample values, the full fp32 master parameters and Adam moments to
<out>.<config>.rank<r>.npz (attributed) and <out>.<config>-plain.rank<r>.npz.
"""
import argparse
import json
import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import numpy as np  # noqa: E402
import torch  # noqa: E402

import shardshap  # noqa: E402
from helpers.distributed import GLOBAL_BATCH, MICRO, STEPS, local_micro_batches  # noqa: E402
from helpers.zero_configs import ATTRIBUTION, CLIP, CONFIGS, LR, plain_twin  # noqa: E402
from shardshap.backends import init_distributed, shutdown  # noqa: E402
from shardshap.testing import cases  # noqa: E402


def ds_config(zero: dict, world: int, torch_adam: bool = True, bf16: bool = False) -> dict:
    return {
        "bf16": {"enabled": bf16},
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world // MICRO,
        "gradient_accumulation_steps": MICRO,
        "gradient_clipping": CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.1, "torch_adam": torch_adam}},
        "zero_optimization": zero,
        "steps_per_print": 10 ** 9,
    }


def full_state(engine):
    """Full fp32 master parameters and Adam moments (collectives: every rank, same order)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    out = {}
    for name, p in engine.module.named_parameters():
        out[name] = safe_get_full_fp32_param(p).detach().numpy().copy()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}:{name}"] = safe_get_full_optimizer_state(p, key).detach().numpy().copy()
    return out


def fail_first_steps(engine, case, rank, world):
    """Steps that must raise before DeepSpeed steps, and leave nothing behind."""
    from shardshap import AttributionError
    micro, micro_ids = local_micro_batches(case, 0, rank, world)
    bad = shardshap.Attributor(engine, None, case.train_loss, case.target_loss,
                               shardshap.Config(num_samples=64, max_grad_norm=2 * CLIP))
    for args, message in [((micro[0], micro_ids[0], None), "gradient_accumulation_steps"),  # 1 micro-batch of 2
                          ((micro, micro_ids, None), "gradient_clipping")]:  # fails after the boundary backward
        try:
            bad.step(*args)
        except AttributionError as e:
            assert message in str(e), e
        else:
            raise AssertionError("the step should have failed")
    bad.close()
    assert engine.global_steps == 0


def run(config: str, attributed: bool, rank: int, world: int, out: str) -> dict:
    import deepspeed
    case = cases.tiny_gpt2(batch_size=GLOBAL_BATCH, dtype=torch.float32)
    config_dict = ds_config(CONFIGS[config], world, torch_adam=not config.endswith("-fused"),
                            bf16=config.endswith("-bf16"))
    engine, _, _, _ = deepspeed.initialize(model=case.model, model_parameters=case.model.parameters(),
                                           config=config_dict)
    attr = shardshap.Attributor(engine, None, case.train_loss, case.target_loss,
                                shardshap.Config(num_samples=64, **ATTRIBUTION.get(config, {}))) if attributed else None
    if attributed and config.endswith("-recover"):
        fail_first_steps(engine, case, rank, world)
    ids_out, scores_out, clips, seconds, sent = [], [], [], [], []
    for step in range(STEPS):
        micro, micro_ids = local_micro_batches(case, step, rank, world)
        t0 = time.perf_counter()
        if attr is None:
            for mb in micro:
                engine.backward(case.train_loss(engine, mb).mean())
                engine.step()
        else:
            res = attr.step(micro, micro_ids, None)
            ids_out.append(res.sample_ids.numpy())
            scores_out.append(res.scores.numpy())
            clips.append(res.clip_factor)
            sent.append(res.metadata.get("bytes_sent", -1))
        seconds.append(time.perf_counter() - t0)
    state = full_state(engine)
    tag = f"{out}.{config}{'' if attributed else '-plain'}.rank{rank}"
    if attributed:
        np.savez(tag + ".npz", ids=np.stack(ids_out), scores=np.stack(scores_out), clip=np.array(clips),
                 engine_norm=np.array([engine.get_global_grad_norm() or 0.0]), **state)
        attr.close()
    else:
        np.savez(tag + ".npz", **state)
    info = {"config": config, "attributed": attributed, "seconds": seconds, "bytes_sent": sent,
            "engine": type(attr.backend).__name__ if attr else None}
    engine.destroy()
    return info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default="z1,z2,z3")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain DeepSpeed reference runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, world = init_distributed("gloo")  # torchrun, deepspeed launcher or mpiexec
    import deepspeed
    deepspeed.init_distributed("gloo")      # picks up the existing process group
    for config in args.configs.split(","):
        for attributed in ([True] if args.no_plain or plain_twin(config) != config else [True, False]):
            info = run(config, attributed, rank, world, args.out)
            if rank == 0:
                print("DSINFO " + json.dumps(info), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
