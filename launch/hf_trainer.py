"""A Hugging Face `Trainer` run valued by `ShardshapCallback`: a tiny GPT-2 on the demo corpus (byte tokens, the
first 64 bytes of each document), targets held-out code and prose, values streamed to <out>/run.zarr.

    python launch/hf_trainer.py                                           # one process
    torchrun --nproc_per_node 2 launch/hf_trainer.py                      # Trainer's DDP (gloo on CPU)
    torchrun --nproc_per_node 2 launch/hf_trainer.py --deepspeed configs/ds_zero2.json   # ZeRO-1/2/3
    torchrun --nproc_per_node 2 launch/hf_trainer.py --fsdp               # FSDP2 (GPUs: Accelerate enables FSDP
                                                                          # on accelerators only)
Then: shardshap report <out>/run.zarr
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import shardshap
from shardshap.analysis.manifest import default_path, write_manifest
from shardshap.integrations.hf import ShardshapCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_corpus import write_demo_corpus  # noqa: E402

T = 64


def encode(texts):
    """[n, T] byte tokens (256 pads) and their attention mask."""
    ids = torch.full((len(texts), T), 256, dtype=torch.long)
    for i, text in enumerate(texts):
        b = list(text.encode("utf-8", errors="replace"))[:T]
        ids[i, :len(b)] = torch.tensor(b)
    return ids, (ids != 256).long()


class Rows(torch.utils.data.Dataset):
    """The training set: each row with its index as `sample_id` (the id the store keeps)."""

    def __init__(self, ids, mask):
        self.ids, self.mask = ids, mask

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels, "sample_id": i}


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/hf_trainer")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON (configs/ds_zero{1,2,3}.json)")
    ap.add_argument("--fsdp", action="store_true", help="Trainer's FSDP2 (fsdp_config version 2)")
    ap.add_argument("--checkpointing", action="store_true", help="TrainingArguments(gradient_checkpointing=True)")
    args = ap.parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    paths = write_demo_corpus(os.path.join(args.out, f"data-rank{rank}"), per_domain=100, val=8)  # (same on each)
    rows = read(paths["train"])
    ids, mask = encode([r["text"] for r in rows])
    targets = {}
    for name in ("code", "prose"):
        v_ids, v_mask = encode([r["text"] for r in read(paths[f"val_{name}"])])
        targets[name] = {"input_ids": v_ids, "attention_mask": v_mask, "labels": v_ids.masked_fill(v_mask == 0, -100)}
    store = os.path.join(args.out, "run.zarr")
    if rank == 0:  # id -> domain and text, for `shardshap report`
        write_manifest(default_path(store), range(len(rows)), [r["domain"] for r in rows], [r["text"] for r in rows])

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=T, n_embd=64, n_layer=2, n_head=4,
                                       bos_token_id=256, eos_token_id=256))
    engine = {}
    if args.deepspeed:  # the Trainer fills the DeepSpeed config's batch sizes and clipping from its arguments
        ds = json.loads(Path(args.deepspeed).read_text())
        ds.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto",
                  gradient_clipping="auto", train_batch_size="auto")
        engine = {"deepspeed": ds}
    elif args.fsdp:
        engine = {"fsdp": "full_shard", "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]}}
    training = TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"), max_steps=args.steps, per_device_train_batch_size=16 // world,
        gradient_accumulation_steps=2, learning_rate=2e-3, warmup_steps=5, weight_decay=0.1, max_grad_norm=1.0,
        logging_steps=10, save_strategy="no", report_to=[], seed=0, use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,  # `sample_id` must reach the model (the callback pops it)
        gradient_checkpointing=args.checkpointing,
        ddp_backend="gloo" if world > 1 and not torch.cuda.is_available() else None, **engine)
    callback = ShardshapCallback(targets, shardshap.Config(), store=store, overwrite=True)
    Trainer(model=model, args=training, train_dataset=Rows(ids, mask), callbacks=[callback]).train()
    if rank == 0:
        print(f"values of {len(rows)} training documents over {args.steps} steps in {store}; "
              f"read them with: shardshap report {store}")


if __name__ == "__main__":
    main()
