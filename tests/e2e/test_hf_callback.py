"""ShardshapCallback with a real transformers.Trainer (tiny GPT-2, CPU): training unchanged, the store
holds every step and sample, and the values add up to the target loss change they claim to explain."""
import math

import numpy as np
import pytest
import torch

import shardshap

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from helpers.hf_rows import Rows, rows_and_target  # noqa: E402
from shardshap.integrations.hf import ShardshapCallback  # noqa: E402

N, T, VOCAB = 24, 16, 40


def data():
    return rows_and_target(N, T, VOCAB)


def train(tmp_path, callback, optim="adamw_torch", lr=5e-3, steps=6, checkpointing=False):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).double()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=lr, max_grad_norm=0.5, optim=optim,
                             lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1000,
                             save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=True, seed=0,
                             dataloader_num_workers=0, gradient_checkpointing=checkpointing)
    train_set, _ = data()
    trainer = Trainer(model=model, args=args, train_dataset=train_set,
                      callbacks=[callback] if callback else None)
    trainer.train()
    return model, args


@pytest.mark.parametrize("schedule,checkpointing", [("cached", False), ("cached", True), ("streaming", True)])
def test_training_unchanged_and_store_complete(tmp_path, schedule, checkpointing):
    """Trainer's gradient_checkpointing is reentrant torch.utils.checkpoint (the target pass cannot use
    autograd.grad through it)."""
    _, val = data()
    plain, _ = train(tmp_path / "plain", None, checkpointing=checkpointing)
    cb = ShardshapCallback(val, shardshap.Config(schedule=schedule), store=str(tmp_path / "run.zarr"))
    attributed, args = train(tmp_path / "attr", cb, checkpointing=checkpointing)
    assert cb.last.metadata["schedule"] == schedule
    assert args.max_grad_norm == 0.5, "the callback restores TrainingArguments after training"
    for (name, p), q in zip(plain.named_parameters(), attributed.parameters()):
        assert torch.equal(p, q), f"{name} changed by attribution"
    log = shardshap.open_scores(str(tmp_path / "run.zarr")).step_log
    assert log.sizes["step"] == 6
    ids = log["sample_id"].values
    assert all(len(set(row[row >= 0].tolist())) == 8 for row in ids), "each step holds 2 micro-batches of 4"
    assert set(ids[ids >= 0].tolist()) <= set(range(N))
    loss = log["sample_loss"].values[0]
    assert np.isfinite(loss).all() and (loss > math.log(VOCAB) * 0.5).all(), "per-sample training losses recorded"


def test_values_explain_the_target_loss_change(tmp_path):
    """SGD, estimator 'sgd', order 1: a step's values sum to lr * <clipped gradient, h(theta_t)>, the first-order
    change of the target loss; with a small lr that is L(theta_t) - L(theta_{t+1}) to a few parts in a thousand."""
    _, val = data()
    cb = ShardshapCallback(val, shardshap.Config(estimator="sgd", order=1), store=str(tmp_path / "run.zarr"))
    train(tmp_path, cb, optim="sgd", lr=0.005, steps=5)
    log = shardshap.open_scores(str(tmp_path / "run.zarr")).step_log
    for k in range(4):
        total = float(np.nansum(log["score"].values[k, :, 0]))
        drop = float(log["target_loss"].values[k, 0] - log["target_loss"].values[k + 1, 0])
        assert abs(drop) > 1e-4, "the step must move the target loss"
        assert total == pytest.approx(drop, rel=2e-2), (k, total, drop)


def test_missing_sample_id_is_a_clear_error(tmp_path):
    _, val = data()

    class NoIds(Rows):
        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=16, n_layer=1, n_head=2))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=NoIds(data()[0].ids), callbacks=[ShardshapCallback(val)])
    with pytest.raises(shardshap.AttributionError, match="remove_unused_columns=False"):
        trainer.train()


def test_example_script_runs(tmp_path):
    """launch/hf_trainer.py, the runnable recipe of docs/training.md, end to end in one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "launch" / "hf_trainer.py"), "--out", str(tmp_path), "--steps",
                           "3"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = shardshap.open_scores(str(tmp_path / "run.zarr"))
    assert scores.num_steps == 3 and (scores.count > 0).sum() == 3 * 32
