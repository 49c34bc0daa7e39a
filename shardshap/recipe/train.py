"""The reference training loop: seed, data, model, AdamW + warmup/cosine, the engine (none, DDP, FSDP2 or
DeepSpeed), `shardshap.Attributor` per optimizer step, checkpoints that resume to the same store."""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..backends import barrier, free_port, init_distributed, world_sum
from ..config import ConfigError
from .config import RecipeConfig, deepspeed_dict
from .data import Sampler, build_data, write_corpus_manifest
from .model import build_model, count_parameters, position_losses, sequence_losses, target_losses


@dataclass
class Result:
    summary: dict
    module: nn.Module            # the trained model (unwrapped; sharded under FSDP2/ZeRO-3)
    engine: object = None        # the DeepSpeed engine, if any


def lr_lambda(cfg: RecipeConfig):
    """Multiplier of train.lr at step s: linear warmup, then cosine (or constant) down to min_lr."""
    t = cfg.train
    floor = t.min_lr / t.lr

    def f(s: int) -> float:
        if s < t.warmup:
            return (s + 1) / t.warmup
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - t.warmup) / max(1, t.steps - t.warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _start_distributed(cfg: RecipeConfig) -> tuple[int, int]:
    engine = cfg.distributed.engine
    if engine != "none" and "RANK" not in os.environ and not any(
            k in os.environ for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        # a distributed engine started without a launcher: a group of one, so the same code path runs
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    rank, world = init_distributed(cfg.distributed.backend, cfg.distributed.timeout_s)
    if world > 1 and engine == "none":
        raise ConfigError(f"launched with {world} ranks but distributed.engine is 'none'; set it to ddp, fsdp2 "
                          "or deepspeed (or launch one process)")
    return rank, world


def _device(cfg: RecipeConfig) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but no GPU is visible; set train.device: cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _adamw(cfg: RecipeConfig, model: nn.Module) -> torch.optim.AdamW:
    t = cfg.train
    return torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)


def _wrap(cfg: RecipeConfig, model: nn.Module, sched_fn, world: int, device):
    """-> (model to train, torch optimizer, optimizer for the Attributor, scheduler, DeepSpeed engine or None).
    The optimizer is built after FSDP2 sharding (it must see the sharded parameters)."""
    engine = cfg.distributed.engine
    if engine == "deepspeed":
        opt = _adamw(cfg, model)
        import deepspeed
        deepspeed.init_distributed(cfg.distributed.backend or ("nccl" if device.type == "cuda" else "gloo"))
        ds_engine, _, _, sched = deepspeed.initialize(
            model=model, optimizer=opt, config=deepspeed_dict(cfg, world),
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, sched_fn))
        return ds_engine, opt, None, sched, ds_engine
    if engine == "ddp":
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        blocks = getattr(getattr(model, "transformer", None), "h", None) or model.model.layers
        for block in blocks:  # one FSDP unit per transformer block, then the root (embeddings, head)
            fully_shard(block)
        fully_shard(model)
    opt = _adamw(cfg, model)
    return model, opt, opt, torch.optim.lr_scheduler.LambdaLR(opt, sched_fn), None


def _counted_positions(micro_ids, world: int) -> float:
    """What the step's mean over counted positions divides by on each rank: all ranks' count / ranks (the
    engines average the ranks' gradients), as Attributor.step does for per-position ids."""
    return world_sum(float(sum(int((i >= 0).sum()) for i in micro_ids))) / world


def _plain_step(cfg, model, opt, ds_engine, micro, micro_ids, world) -> torch.Tensor:
    """The step attr.step replaces, with the same arithmetic (attribution off trains to the same numbers).
    With per-document values the loss is the mean over the step's counted positions."""
    per_document = cfg.data.values_per == "document"
    if per_document:
        c = 1.0 / _counted_positions(micro_ids, world)

        def loss_of(m, mb, ids):  # (and the counted positions' losses, for the log)
            per = position_losses(m, mb)
            counted = (ids >= 0).to(per.device)
            return torch.where(counted, per, 0).sum() * c, per[counted]
    if ds_engine is not None:
        losses = []
        for mb, ids in zip(micro, micro_ids):
            if per_document:
                loss, per = loss_of(ds_engine, mb, ids)
                ds_engine.backward(loss, scale_wrt_gas=False)
            else:
                per = sequence_losses(ds_engine, mb)
                ds_engine.backward(per.mean())
            ds_engine.step()
            losses.append(per.detach())
        return torch.cat([x.reshape(-1) for x in losses]).mean()
    opt.zero_grad(set_to_none=True)
    n = sum(len(mb[0]) for mb in micro)
    losses = []
    for j, (mb, ids) in enumerate(zip(micro, micro_ids)):
        skip_sync = isinstance(model, nn.parallel.DistributedDataParallel) and j < len(micro) - 1
        with model.no_sync() if skip_sync else torch.enable_grad():
            if per_document:
                loss, per = loss_of(model, mb, ids)
                loss.backward()
            else:
                per = sequence_losses(model, mb)
                (per.mean() if len(micro) == 1 else per.sum() * (1.0 / n)).backward()
        losses.append(per.detach().reshape(-1))
    if cfg.train.max_grad_norm is not None:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
    opt.step()
    return torch.cat(losses).mean()


def _evaluate(eval_model, module, targets) -> list:
    """Each target's loss now (train.eval_every), in eval mode (dropout off, no RNG drawn), on every rank
    (FSDP2 gathers its shards in the forward)."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = target_losses(eval_model, targets).tolist()
    module.train(was_training)
    return out


# -------------------------------------------------------------------- checkpoints
def save_checkpoint(cfg, step: int, rank: int, model, opt, sched, ds_engine, attr) -> str:
    """<checkpoint dir>/step_<step>/: rank<r>.pt (scheduler, RNG, attribution state) plus the model and
    optimizer (DeepSpeed's own files, DCP shards under FSDP2, or in rank<r>.pt). `latest` is written last, so
    a crash mid-save leaves the previous checkpoint as the latest."""
    root = Path(cfg.checkpoint_dir)
    tag = f"step_{step:08d}"
    path = root / tag
    path.mkdir(parents=True, exist_ok=True)
    if attr is not None:
        attr.flush(durable=True)  # the store's steps survive whatever the checkpoint survives
    state = {"step": step, "rng": torch.get_rng_state(), "attr": attr.state_dict() if attr else None,
             "run_id": cfg.run_id()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on a GPU draws from its generator
        state["cuda_rng"] = torch.cuda.get_rng_state()  # this rank's device (init_distributed set it)
    if ds_engine is not None:
        ds_engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    elif cfg.distributed.engine == "fsdp2":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path / "dcp"))
        state["scheduler"] = sched.state_dict()
    else:
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        state.update(model=module.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict())
    torch.save(state, path / f"rank{rank}.pt")
    barrier()
    if rank == 0:  # atomically: a kill during the write must not leave an empty `latest`
        (root / "latest.tmp").write_text(tag)
        os.replace(root / "latest.tmp", root / "latest")
    return str(path)


def _find_checkpoint(cfg) -> Optional[Path]:
    r = cfg.train.resume
    if r is False:
        return None
    if r is True:
        latest = Path(cfg.checkpoint_dir) / "latest"
        return Path(cfg.checkpoint_dir) / latest.read_text().strip() if latest.is_file() else None
    if not Path(r).is_dir():
        raise ConfigError(f"train.resume: no checkpoint folder {r!r}; give a step_* folder, true (latest) or false")
    return Path(r)


def load_checkpoint(cfg, path: Path, rank: int, world: int, model, opt, sched, ds_engine) -> dict:
    f = path / f"rank{rank}.pt"
    if not f.is_file():
        raise ConfigError(f"train.resume: {path} has no {f.name}; was it saved with {world} ranks?")
    state = torch.load(f, weights_only=False)
    if state["run_id"] != cfg.run_id():
        raise ConfigError(f"train.resume: checkpoint of run {state['run_id']!r}, this config is run "
                          f"{cfg.run_id()!r} (model, data, seed or attribution changed); resume with the same config")
    if ds_engine is not None:
        ds_engine.load_checkpoint(str(path.parent), tag=path.name)
    elif cfg.distributed.engine == "fsdp2":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        sched.load_state_dict(state["scheduler"])
    else:
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    return state


# -------------------------------------------------------------------- the run
def run(cfg: RecipeConfig, stop_after: Optional[int] = None) -> Result:
    """Train as the config says; returns the summary (also written to <out_dir>/summary.json by rank 0).
    `stop_after`: end cleanly after that many steps in total, as a preempted job would (tests)."""
    from tqdm import tqdm

    import shardshap
    # torch deprecates a collective DeepSpeed calls every step; the warning is not actionable here
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    t_start = time.time()
    rank, world = _start_distributed(cfg)
    device = _device(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg)
    per_document = cfg.data.values_per == "document"
    N = len(data.documents) if per_document else len(data.train)
    sampler = Sampler(data.pool, cfg.train.micro_batch, cfg.train.grad_accum, world, cfg.train.seed)
    model = build_model(cfg, data.tokenizer.vocab_size, data.tokenizer.pad_id, device)
    model.train()
    n_params = count_parameters(model)
    model, opt, attr_opt, sched, ds_engine = _wrap(cfg, model, lr_lambda(cfg), world, device)
    module = ds_engine.module if ds_engine is not None else getattr(model, "module", model)
    attention, mask_dtype = cfg.data.attention, next(module.parameters()).dtype  # (DeepSpeed bf16 casts it)
    targets = {k: v.batch(np.arange(len(v)), device, attention, mask_dtype) for k, v in data.val.items()}
    if per_document and cfg.data.packing == "pack" and attention == "causal" and rank == 0:
        warnings.warn("data.values_per: document with data.attention: causal: tokens attend across the documents "
                      "of a packed sequence, so a document's value also carries the effect of later documents' "
                      "losses through its tokens (an approximation, measured in docs/training.md); set "
                      "data.attention: document for exact per-document values", stacklevel=2)

    ckpt = _find_checkpoint(cfg)
    store = cfg.store_path if cfg.attribution.enabled else None
    attr = None
    if store is not None:
        if rank == 0:
            Path(store).parent.mkdir(parents=True, exist_ok=True)
            write_corpus_manifest(store, data, per_document)
        # per document: slots for every document a rank's sequences of one step can hold
        slots = cfg.train.micro_batch * cfg.train.grad_accum * data.train.most_documents() if per_document else None
        attr = shardshap.Attributor(model, attr_opt, position_losses if per_document else sequence_losses,
                                    target_losses, cfg.shardshap_config(N, slots), store=store, run_id=cfg.run_id(),
                                    overwrite=cfg.attribution.overwrite and ckpt is None)
    start = 0
    if ckpt is not None:
        state = load_checkpoint(cfg, ckpt, rank, world, model, opt, sched, ds_engine)
        start = state["step"]
        if attr is not None:
            if state["attr"] is None:
                raise ConfigError(f"train.resume: {ckpt} was saved with attribution off; resume with "
                                  "attribution.enabled: false or start a new run")
            attr.load_state_dict(state["attr"])
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)
    names = list(targets)
    if rank == 0:
        valued = f"; values for {N} documents" if per_document else ""
        print(f"shardshap train: {cfg.model.family} {n_params:,} parameters, {len(data.train)} sequences "
              f"({len(data.pool)} in the pool{valued}), global batch {sampler.global_batch} on {world} rank(s), "
              f"engine {cfg.distributed.engine}, attribution {'-> ' + store if store else 'off'}"
              f"{f', resumed at step {start}' if start else ''}", flush=True)
    bar = tqdm(range(start, end), initial=start, total=cfg.train.steps, disable=rank != 0, unit="step",
               desc="training" + (" with attribution" if attr else ""), dynamic_ncols=True)
    tokens, t0, loss, tl = 0, time.time(), float("nan"), None
    eval_model = model if cfg.distributed.engine == "fsdp2" else module
    evals, every_eval = [], cfg.train.eval_every
    for step in bar:
        micro_ids = sampler.local_ids(step, rank)
        micro = [data.train.batch(i, device, attention, mask_dtype) for i in micro_ids]
        ids = [data.train.position_ids_of(i) if per_document else torch.from_numpy(i) for i in micro_ids]
        if attr is not None:
            out = attr.step(micro, ids, targets)
            loss, tl = float(out.loss), out.target_loss.tolist()
        else:
            loss = float(_plain_step(cfg, model, opt, ds_engine, micro, ids, world))
        if ds_engine is None:
            sched.step()  # DeepSpeed steps its scheduler itself at the accumulation boundary
        tokens += int(data.train.length[sampler.global_ids(step)].sum())
        if rank == 0 and (step % cfg.train.log_every == 0 or step == end - 1):
            post = {"loss": f"{loss:.3f}", **({n: f"{v:.3f}" for n, v in zip(names, tl)} if tl else {}),
                    "tok/s": f"{tokens / max(1e-9, time.time() - t0):.0f}"}
            bar.set_postfix(post, refresh=False)
        if every_eval and targets and ((step + 1) % every_eval == 0 or step == end - 1):
            evals.append({"step": step + 1, **dict(zip(names, _evaluate(eval_model, module, targets)))})
        every = cfg.train.checkpoint.every
        if every and (step + 1) % every == 0:
            save_checkpoint(cfg, step + 1, rank, model, opt, sched, ds_engine, attr)
    bar.close()
    train_s = time.time() - t0
    if attr is not None:
        attr.close()
    with torch.no_grad():
        final = target_losses(eval_model, targets).tolist() if targets else []
    summary = {"run_id": cfg.run_id(), "steps": end, "resumed_at": start, "ranks": world,
               "engine": cfg.distributed.engine, "parameters": n_params, "num_samples": N,
               "pool": int(len(data.pool)), "train_seconds": round(train_s, 2),
               "total_seconds": round(time.time() - t_start, 2),
               "tokens_per_second": round(tokens / max(1e-9, train_s), 1), "final_loss": loss,
               "target_loss": dict(zip(names, final)), "store": store}
    if every_eval:
        summary["eval"] = evals
    if rank == 0:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        if every_eval:
            with open(Path(cfg.out_dir) / "eval.jsonl", "w") as f:
                f.writelines(json.dumps(e) + "\n" for e in evals)
        (Path(cfg.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        tl_text = ", ".join(f"{k} {v:.4f}" for k, v in summary["target_loss"].items())
        print(f"shardshap train: {end - start} steps in {train_s:.1f} s ({summary['tokens_per_second']:.0f} "
              f"tokens/s), final loss {loss:.4f}{'; target losses ' + tl_text if tl_text else ''}"
              f"{'; store ' + store if store else ''}", flush=True)
    return Result(summary, module, ds_engine)
