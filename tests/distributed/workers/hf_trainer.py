"""One rank of a Hugging Face Trainer run with ShardshapCallback (launched by tests/distributed/test_hf_trainer.py
with torchrun, or alone for the one-process reference): a tiny GPT-2 in float64, sequential sampling, 2
micro-batches per step; writes every step's values and the final parameters to an .npz file per rank."""
import argparse
import os

import numpy as np
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

import shardshap  # noqa: E402
from helpers.hf_rows import rows_and_target  # noqa: E402
from shardshap.backends import shutdown  # noqa: E402
from shardshap.integrations.hf import ShardshapCallback  # noqa: E402

N, T, VOCAB, STEPS, GLOBAL_MICRO = 48, 16, 40, 3, 8  # GLOBAL_MICRO: sequences per micro-batch over all ranks


def fsdp_on_cpu():
    """Accelerate enables FSDP on accelerators only (a CPU job silently gets DDP); FSDP2 itself runs on CPU with
    gloo, so the test lifts that restriction to run Trainer's FSDP2 path here."""
    from accelerate.state import AcceleratorState, DistributedType
    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
    AcceleratorState.__init__ = patched


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--engine", default="none", choices=["none", "ddp", "fsdp", "zero1", "zero2", "zero3"])
    ap.add_argument("--checkpointing", action="store_true", help="TrainingArguments(gradient_checkpointing=True)")
    ap.add_argument("--plain", action="store_true", help="no callback (the training reference)")
    ap.add_argument("--dtype", default="float64", help="the model's (DeepSpeed runs take float32)")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=16, n_layer=2, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                       eos_token_id=0)).to(getattr(torch, args.dtype))
    extra = {}
    if args.engine == "fsdp":
        fsdp_on_cpu()
        extra = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"],
                                                     "reshard_after_forward": True})
    if args.engine.startswith("zero"):
        stage = int(args.engine[-1])
        extra = dict(deepspeed={"zero_optimization": {"stage": stage, **(
            {"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "train_batch_size": "auto", "steps_per_print": 10 ** 9})
    targs = TrainingArguments(output_dir=f"{args.out}.trainer", max_steps=STEPS,
                              per_device_train_batch_size=GLOBAL_MICRO // world, gradient_accumulation_steps=2,
                              learning_rate=5e-3, max_grad_norm=0.5, optim="adamw_torch", lr_scheduler_type="constant",
                              weight_decay=0.1, logging_steps=1000, save_strategy="no", report_to=[],
                              remove_unused_columns=False, use_cpu=True, seed=0, dataloader_num_workers=0,
                              train_sampling_strategy="sequential", gradient_checkpointing=args.checkpointing,
                              ddp_backend="gloo" if world > 1 else None, **extra)
    train_set, val = rows_and_target(N, T, VOCAB)
    values = []

    class Keep(ShardshapCallback):
        def on_pre_optimizer_step(self, *a, **kw):
            super().on_pre_optimizer_step(*a, **kw)
            values.append((self.last.sample_ids.numpy(), self.last.scores.numpy()))

    cb = None if args.plain else Keep(val, shardshap.Config())
    trainer = Trainer(model=model, args=targs, train_dataset=train_set, callbacks=[cb] if cb else None)
    trainer.train()
    if cb is not None and rank == 0:
        print(f"BACKEND {type(cb.attributor.backend).__name__}", flush=True)
    if args.engine.startswith("zero"):
        from deepspeed.utils import safe_get_full_fp32_param
        params = {n: safe_get_full_fp32_param(p).detach().numpy() for n, p in trainer.model.named_parameters()}
    else:
        full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p
        params = {n: full(p.detach()).numpy() for n, p in trainer.model.named_parameters()}
    out = {f"ids{s}": v[0] for s, v in enumerate(values)} | {f"scores{s}": v[1] for s, v in enumerate(values)}
    np.savez(f"{args.out}.rank{rank}.npz", **params, **out)
    shutdown()  # (gloo's exit race: without it a rank sometimes dies with SIGABRT after its work is done)


if __name__ == "__main__":
    main()
