"""One rank of a DeepSpeed-Ulysses run (tests/distributed/test_tensor_parallel.py): the tiny transformer of
shardshap.testing.tensor_parallel, or a tiny HF Llama, with DeepSpeed's DistributedAttention around its
attention, ZeRO over the sequence-parallel ranks, each rank the same samples and its share of their tokens.
Trains it attributed and a second copy plainly (engine.backward / engine.step), on the same global batches, and
writes the values and both copies' fp32 master parameters (the plain one's as "plain:<name>") to
<out>.rank<r>.npz."""
import argparse
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import shardshap  # noqa: E402
from helpers.distributed import GLOBAL_BATCH, MICRO, STEPS, local_micro_batches  # noqa: E402
from shardshap.testing import cases  # noqa: E402
from shardshap.testing.tensor_parallel import causal_attention  # noqa: E402


def sequence_share(model, ids, mask, rank: int, ranks: int):
    """Per-sample next-token loss over this rank's share of the positions, divided by each sample's counted
    positions over all of them: the ranks' shares add up to cases.lm_losses."""
    T = ids.shape[1]
    part = slice(rank * T // ranks, (rank + 1) * T // ranks)
    positions = torch.arange(T)[part].expand(ids.shape[0], -1)
    logits = model(input_ids=ids[:, part], position_ids=positions).logits
    target = torch.cat([ids[:, 1:], ids[:, :1]], 1)[:, part]  # (the last position has no next token: masked)
    counted = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)[:, part].to(logits.dtype)
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return (tok.view(counted.shape) * counted).sum(1) / mask[:, 1:].sum(1).clamp(min=1).to(logits.dtype)


def hf_attention(distributed):
    """A transformers attention function ([B, heads, T, head_dim] in, [B, T, heads, head_dim] out) that runs
    `distributed` (DistributedAttention) on this rank's tokens; the mask is the causal one (right padding only)."""
    def attention(module, query, key, value, attention_mask, **kwargs):
        return distributed(*(t.transpose(1, 2) for t in (query, key, value)), 0), None
    return attention


def main():
    import deepspeed
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.sequence.layer import DistributedAttention
    from deepspeed.utils import safe_get_full_fp32_param
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--store", default=None)
    ap.add_argument("--clip", type=float, default=0.05)
    ap.add_argument("--stage", type=int, default=1, help="ZeRO stage")
    ap.add_argument("--cold-steps", type=int, default=10, help="Config.cold_steps (0: every step warm)")
    ap.add_argument("--model", default="transformer", choices=["transformer", "llama"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    world = torch.distributed.get_world_size()
    parallel_state_sp.initialize_sequence_parallel(world)
    group = parallel_state_sp.get_sequence_parallel_group()
    rank = torch.distributed.get_rank(group)
    saved = {}
    for attributed in (True, False):
        if args.model == "llama":
            from transformers import AttentionInterface
            case = cases.tiny_llama(batch_size=GLOBAL_BATCH, dtype=torch.float32, kv_heads=2)
            AttentionInterface.register("ulysses", hf_attention(
                DistributedAttention(causal_attention, group, scatter_idx=2, gather_idx=1)))
            case.model.config._attn_implementation = "ulysses"
        else:
            case = cases.tiny_transformer(batch_size=GLOBAL_BATCH, dtype=torch.float32)
            for block in case.model.layers:
                block.attend = DistributedAttention(causal_attention, group, scatter_idx=2, gather_idx=1)
        zero = {"stage": args.stage, **({"reduce_scatter": False} if args.stage == 3 else {})}  # (see ZeroBackend)
        config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // MICRO, "gradient_accumulation_steps": MICRO,
                  "gradient_clipping": args.clip, "zero_optimization": zero,
                  "steps_per_print": 10 ** 9,
                  "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                            "weight_decay": 0.1, "torch_adam": True}}}
        engine, _, _, _ = deepspeed.initialize(model=case.model, model_parameters=case.model.parameters(),
                                               config=config, mpu=parallel_state_sp)
        train_loss = lambda m, b: sequence_share(m, *b, rank, world)  # noqa: E731
        target_loss = lambda m, val: sequence_share(m, val, torch.ones_like(val), rank, world).view(2, -1).mean(1)  # noqa: E731,E501
        attr = shardshap.Attributor(engine, None, train_loss, target_loss,
                                    shardshap.Config(max_grad_norm=args.clip, num_samples=64,
                                                     cold_steps=args.cold_steps),
                                    store=args.store if attributed else None) if attributed else None
        ids_out, scores_out = [], []
        for step in range(STEPS):
            micro, micro_ids = local_micro_batches(case, step, 0, 1)  # every rank: the whole global batch
            if attr is not None:
                out = attr.step(micro, micro_ids, case.targets)
                ids_out.append(out.sample_ids.numpy())
                scores_out.append(out.scores.numpy())
                if torch.distributed.get_rank() == 0:
                    print(f"ulysses step {step}: clip {float(out.clip_factor):.4f}, shardshap collectives sent "
                          f"{out.metadata['bytes_sent']} bytes ({out.metadata.get('bytes_sent_model_parallel', 0)} "
                          f"over the sequence-parallel group)", flush=True)
                continue
            for mb in micro:
                engine.backward(train_loss(engine, mb).mean())
                engine.step()
        prefix = "" if attributed else "plain:"
        saved.update({prefix + n: safe_get_full_fp32_param(p).detach().numpy().copy()
                      for n, p in engine.module.named_parameters()})
        if attr is not None:
            saved.update(ids=np.stack(ids_out), scores=np.stack(scores_out))
            attr.close()
        engine.destroy()
    np.savez(f"{args.out}.rank{torch.distributed.get_rank()}.npz", **saved)
    from shardshap.backends import shutdown
    shutdown()


if __name__ == "__main__":
    main()
