"""Throughput: attributed step time vs plain step time, side by side in ONE process (docs/benchmarks.md).

Plain steps and attributed steps of every configuration alternate (round-robin, one step each per
repeat) on private copies of the same model, so that machine noise hits all of them alike; the first
`--warmup` rounds are discarded and medians are reported. Per configuration it prints:
  ratio   median attributed step time / median plain step time (and the quartiles of the per-round
          ratios: the spread within the run)
  rho     target tokens / training tokens per optimizer step (the target pass floor is about 1 + rho)
  R       Pearson R of its per-sample values against exact mode on the same steps (both computed on deep
          copies of the same model/optimizer state)
  mem     peak memory of one step above the memory held before it: on CUDA torch.cuda.max_memory_allocated;
          on CPU the resident set high-water mark (VmHWM, reset through /proc/self/clear_refs), with glibc's
          mmap threshold fixed at 128 KiB so that freed tensors leave the resident set
W2 adds the per-sample-gradient baseline (torch.func vmap over grad, dotted with the same W vectors).

    python benchmarks/throughput.py --quick            # W1 only, fewer repeats: about 3 minutes on 2 CPU cores
    python benchmarks/throughput.py                    # W1 full tables
    python benchmarks/throughput.py --workloads w2     # GPT-2 small (124M, T=512, batch 8) + vmap baseline
    python benchmarks/throughput.py --profile exact    # torch.profiler summary of attributed W1 steps
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import shardshap  # noqa: E402
from shardshap.backends import OwnedSlice  # noqa: E402
from shardshap.estimators import ESTIMATORS  # noqa: E402
from shardshap.optim import update_rule_for  # noqa: E402
from shardshap.verify import pearson  # noqa: E402

SECANT = ESTIMATORS["secant"]


# ----------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    batch: Callable[[int], tuple]        # step -> (input ids [b, T], sample ids [b])
    targets: torch.Tensor                # [target batch, T]
    train_tokens: int
    device: torch.device

    @property
    def rho(self) -> float:
        return self.targets.numel() / self.train_tokens


def seq_losses(model, ids):
    """Per-sequence mean next-token loss, [b]."""
    logits = model(input_ids=ids).logits[:, :-1]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return tok.view(ids.shape[0], -1).mean(1)


def train_loss(model, batch):
    return seq_losses(model, batch)


def target_loss(model, targets):
    return seq_losses(model, targets).mean()


def stdlib_corpus(vocab: int, T: int):
    """Word-level tokens (the vocab-1 most frequent words and symbols, plus UNK) of the local Python
    standard library's top-level sources, cut into sequences of T: real text with a natural spectrum, no
    download. Returns (training sequences, held-out sequences from the last 5% of the stream)."""
    import collections
    import glob
    import re
    import sysconfig
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    words = re.findall(r"\w+|[^\w\s]", "\n".join(open(f, encoding="utf-8", errors="replace").read() for f in files))
    ids = {w: i for i, (w, _) in enumerate(collections.Counter(words).most_common(vocab - 1))}
    stream = torch.tensor([ids.get(w, vocab - 1) for w in words])
    seqs = stream[: len(stream) // T * T].view(-1, T)
    cut = int(0.95 * len(seqs))
    g = torch.Generator().manual_seed(0)
    return seqs[:cut][torch.randperm(cut, generator=g)], seqs[cut:]


def make_workload(name: str, device, target_batch: int, seed: int = 0) -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel
    if name == "w1":
        cfg = dict(vocab_size=4096, n_positions=128, n_embd=256, n_layer=4, n_head=4, tie_word_embeddings=False)
        T, b = 128, 32
    elif name == "w2":  # GPT-2 small: 124M parameters with the tied head
        cfg = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
        T, b = 512, 8
    else:
        raise ValueError(name)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **cfg)).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    corpus, held_out = stdlib_corpus(cfg["vocab_size"], T)
    targets = held_out[:target_batch].to(device)

    def batch(step):
        idx = (step * b + torch.arange(b)) % len(corpus)
        return corpus[idx].to(device), idx

    return Workload(name, model, opt, batch, targets, b * T, torch.device(device))


# ----------------------------------------------------------------------------------------- measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ExactRss:
    """While active, glibc serves every block above 128 KiB with its own mmap, so that freed tensors leave
    the resident set and the high-water mark counts live memory. Not used while timing (fresh pages fault
    on first touch, which slows everything); afterwards the threshold is fixed at 32 MiB, the value
    glibc's dynamic threshold settles at once large blocks have been freed."""

    def __enter__(self):
        global LIBC
        try:
            LIBC = LIBC or ctypes.CDLL("libc.so.6")
            LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        if LIBC is not None:
            LIBC.mallopt(-3, 32 * 1024 * 1024)


LIBC = None


def keep_freed_memory() -> bool:
    """glibc returns freed blocks above its mmap threshold (dynamic, from 128 KiB) and the top of its heap to
    the OS, and every step then page-faults them back in: measured on W1 (CPU, 2 threads) as ~10% of a plain
    step and ~5% more for an attributed one, whose captured output gradients outlive the backward. Fix the
    threshold at its 32 MiB maximum and never trim, the way PyTorch's CUDA allocator keeps freed blocks.
    Returns False where glibc is not there."""
    global LIBC
    try:
        LIBC = LIBC or ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(LIBC.mallopt(-3, 32 * 1024 * 1024) and LIBC.mallopt(-1, 2 ** 31 - 1))  # M_MMAP_, M_TRIM_THRESHOLD


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory of a block above what was held before it, in MiB (see the module docstring)."""

    def __init__(self, device):
        self.device, self.mib = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            if LIBC is not None:
                LIBC.malloc_trim(0)
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current resident set
            except OSError:
                pass
            self.base = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _rss_kib("VmHWM") * 1024
        self.mib = (peak - self.base) / 2 ** 20


def plain_step(model, opt, batch):
    from torch.profiler import record_function
    opt.zero_grad(set_to_none=True)
    train_loss(model, batch).mean().backward()
    with record_function("plain.optimizer_step"):  # the pass the secant math mirrors
        opt.step()


class Runner:
    """One configuration on its own copy of the model: `plain` (config None), an Attributor, or the
    per-sample-gradient baseline (config "vmap")."""

    def __init__(self, wl: Workload, config, model=None, opt=None):
        self.wl, self.config = wl, config
        self.model, self.opt = copy.deepcopy((wl.model, wl.opt)) if model is None else (model, opt)
        self.attr = None
        if isinstance(config, shardshap.Config):
            self.attr = shardshap.Attributor(self.model, self.opt, train_loss, target_loss, config)
        elif config == "vmap":
            self.baseline = VmapBaseline(self.model, self.opt)

    free_grads = False  # drop .grad after each step (saves a model's worth of memory between steps)

    def step(self, step: int):
        """Returns the step result (the per-sample values for the baseline, None for plain)."""
        x, ids = self.wl.batch(step)
        if self.attr is not None:
            out = self.attr.step(x, ids, self.wl.targets)
        elif self.config == "vmap":
            out = self.baseline.step(x, self.wl.targets)
        else:
            out = plain_step(self.model, self.opt, x)
        if self.free_grads:
            self.opt.zero_grad(set_to_none=True)
        return out

    def close(self):
        if self.attr is not None:
            self.attr.close()


class VmapBaseline:
    """What users reach for otherwise: per-sample gradients with torch.func (vmap over grad), the batch
    gradient as their mean, the same W vectors (secant, order 2, from the same frozen optimizer maps and
    a target pass at the midpoint), values = <g_i / b, W>, then the optimizer step."""

    def __init__(self, model, opt):
        from torch.func import functional_call, grad, vmap
        if hasattr(model, "set_attn_implementation"):  # sdpa's CPU backward has no vmap rule (a per-sample loop)
            model.set_attn_implementation("eager")
        self.model, self.opt = model, opt
        self.rule = update_rule_for(opt)
        self.groups = {id(p): g for g in opt.param_groups for p in g["params"]}
        self.params = dict(model.named_parameters())

        def loss_i(params, x):  # one sample's loss, the same as seq_losses for a batch of one
            logits = functional_call(model, params, (), {"input_ids": x.unsqueeze(0)}).logits[0, :-1]
            return F.cross_entropy(logits, x[1:])
        self.per_sample = vmap(grad(loss_i), in_dims=(None, 0))

    def step(self, x, targets):
        opt, b = self.opt, x.shape[0]
        params = {n: p.detach() for n, p in self.params.items()}
        G = self.per_sample(params, x)                       # {name: [b, *shape]}
        opt.zero_grad(set_to_none=True)
        for n, p in self.params.items():
            p.grad = G[n].mean(0)
        frozen = {n: SECANT.freeze(self.rule, OwnedSlice(p, p.detach(), p.grad, opt.state.get(p, {}),
                                                         self.groups[id(p)]), 1.0, torch.float32, order=2)
                  for n, p in self.params.items()}
        saved = [p.detach().clone() for p in self.params.values()]
        with torch.no_grad():
            for n, p in self.params.items():
                p.add_(frozen[n].shift)
        h = torch.autograd.grad(target_loss(self.model, targets), list(self.params.values()))
        with torch.no_grad():
            for p, s in zip(self.params.values(), saved):
                p.copy_(s)
        scores = torch.zeros(b, 1, device=x.device)
        for n, hp in zip(self.params, h):
            Wp = frozen[n].multiplier * hp
            scores[:, 0] += (G[n].flatten(1) @ Wp.flatten()) / b
        del G
        opt.step()
        return scores


def interleave(wl: Workload, runners: dict[str, Runner], rounds: int, warmup: int, first_step: int) -> dict:
    """Round-robin one step of each runner per round; returns {name: [seconds of each kept round]}."""
    times = {k: [] for k in runners}
    names = list(runners)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]  # alternate the order too
        for k in order:
            sync(wl.device)
            t0 = time.perf_counter()
            runners[k].step(first_step + r)
            sync(wl.device)
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def fidelity(wl: Workload, config: shardshap.Config, steps: list[int]) -> tuple[float, dict]:
    """min Pearson R (over `steps`) of `config`'s values vs exact mode, both from copies of the same state;
    the state advances with plain steps in between. Also returns the last step's metadata."""
    model, opt = copy.deepcopy((wl.model, wl.opt))
    worst, meta = 1.0, {}
    for s in range(max(steps) + 1):
        if s in steps:
            x, ids = wl.batch(s)
            vals = []
            for cfg in (shardshap.Config(), config):
                m2, o2 = copy.deepcopy((model, opt))
                with shardshap.Attributor(m2, o2, train_loss, target_loss, cfg) as attr:
                    res = attr.step(x, ids, wl.targets)
                vals.append(res.scores)
                meta = res.metadata
            worst = min(worst, pearson(vals[0], vals[1]))
        plain_step(model, opt, wl.batch(s)[0])
    return worst, meta


def memory(wl: Workload, runner: Runner, step: int) -> float:
    with PeakMemory(wl.device) as pm:
        runner.step(step)
    return pm.mib


# ----------------------------------------------------------------------------------------- reports
def configs(rank_list) -> dict[str, object]:
    out = {"exact": shardshap.Config(), "exact + compile_math": shardshap.Config(compile_math=True)}
    for r in rank_list:
        out[f"rank {r}"] = shardshap.Config(product_rank=r)
    out["bf16 cache + rank 16"] = shardshap.Config(cache_dtype="bfloat16", product_rank=16)
    out["preset fast"] = shardshap.Config(preset="fast")  # bf16 cache and target pass, exact contraction, compiled
    out["streaming"] = shardshap.Config(schedule="streaming")  # sketches in the backward, W after it
    out["streaming sketch_rank 32"] = shardshap.Config(schedule="streaming", sketch_rank=32)
    out["streaming momentum"] = shardshap.Config(schedule="streaming", stream_predictor="momentum")  # W before
    out["streaming + preset fast"] = shardshap.Config(schedule="streaming", preset="fast")
    return out


def warm(wl: Workload, steps: int):
    for s in range(steps):
        plain_step(wl.model, wl.opt, wl.batch(s)[0])


def run_table(wl: Workload, cfgs: dict, rounds: int, warmup: int, fid_steps: list[int], start: int,
              mem: bool = True) -> list[dict]:
    runners = {"plain": Runner(wl, None)}
    runners.update({k: Runner(wl, c) for k, c in cfgs.items()})
    times = interleave(wl, runners, rounds, warmup, start)
    plain = statistics.median(times["plain"])
    rows = []
    mems = {}
    if mem:
        with ExactRss():
            mems = {k: memory(wl, r, start + rounds) for k, r in runners.items()}
    for k, r in runners.items():
        med = statistics.median(times[k])
        # the spread within this run: quartiles of the per-round ratios (each round steps every runner once)
        q1, _, q3 = statistics.quantiles([t / p for t, p in zip(times[k], times["plain"])], n=4)
        row = dict(config=k, ms=1e3 * med, ratio=med / plain, spread=(q1, q3), rho=wl.rho,
                   mem=mems.get(k, float("nan")))
        if isinstance(r.config, shardshap.Config):
            row["R"], meta = (1.0, {}) if k == "exact" else fidelity(wl, r.config, fid_steps)
            en = meta.get("product_energy") or {}
            row["energy"] = min(en.values()) if en else float("nan")
            row["exact_layers"] = len(meta.get("product_exact_layers", []))
        r.close()
        rows.append(row)
    return rows


def print_rows(title: str, rows: list[dict]):
    print(f"\n### {title}\n")
    print("| configuration | ms / step | ratio vs plain | per-round ratio, quartiles | rho | Pearson R vs exact | "
          "min layer energy | exact-fallback layers | peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        R = f"{r['R']:.5f}" if "R" in r else "-"
        en = f"{r['energy']:.3f}" if r.get("energy") == r.get("energy") and "energy" in r else "-"
        ex = str(r["exact_layers"]) if "exact_layers" in r and r["config"] != "exact" else "-"
        print(f"| {r['config']} | {r['ms']:.0f} | {r['ratio']:.3f} | {r['spread'][0]:.3f}-{r['spread'][1]:.3f} | "
              f"{r['rho']:.4f} | {R} | {en} | {ex} | {r['mem']:.0f} |")
    sys.stdout.flush()


def _phase_times(prof, steps: int, device) -> dict[str, float]:
    """ms per step of every range the library labels "shardshap.<phase>" (and the benchmark's own
    "plain.*" ranges): host time on CPU, device time of the range on CUDA."""
    out = {}
    for e in prof.key_averages():
        if e.key.startswith(("shardshap.", "plain.")):
            us = e.device_time_total if device.type == "cuda" and e.device_time_total else e.cpu_time_total
            out[e.key] = us / 1e3 / steps
    return out


def _profiled(wl: Workload, runners: dict, steps: int, start: int):
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as tprofile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if wl.device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for s in range(steps):
            for name, r in runners.items():
                with record_function(f"plain.{name} step" if name == "plain" else f"shardshap.{name} step"):
                    r.step(start + s)
    sync(wl.device)
    return prof


def profile(wl: Workload, cfg: shardshap.Config, steps: int, start: int):
    """torch.profiler over attributed steps; the phases are the library's own record_function labels."""
    runner, plain = Runner(wl, cfg), Runner(wl, None)
    for s in range(2):  # warm
        runner.step(start + s)
        plain.step(start + s)
    prof = _profiled(wl, {"plain": plain, "attributed": runner}, steps, start + 2)
    times = _phase_times(prof, steps, wl.device)
    plain_ms = times["plain.plain step"]
    print(f"\n### Profile: W1, {steps} steps of each, preset {cfg.preset!r}\n")
    print("| range | ms / step | % of a plain step |")
    print("|---|---|---|")
    for key, ms in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"| {key} | {ms:.1f} | {100 * ms / plain_ms:.1f}% |")
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    runner.close()


def breakdown(wl: Workload, cfg: shardshap.Config, steps: int, start: int):
    """Split of attributed steps: step totals timed without the profiler (interleaved with plain steps),
    the library's phases ("shardshap.<phase>" ranges, incl. one per product rule) from one profiled run,
    and what recording the training forward/backward costs over a plain one."""
    runner, plain = Runner(wl, cfg), Runner(wl, None)
    attr = runner.attr
    for s in range(2):
        runner.step(start + s)
        plain.step(start + s)
    total = {"plain": 0.0, "attributed": 0.0}
    for s in range(steps):
        for name, r in (("plain", plain), ("attributed", runner)):
            sync(wl.device)
            t0 = time.perf_counter()
            r.step(start + 2 + s)
            sync(wl.device)
            total[name] += time.perf_counter() - t0
    phases = _phase_times(_profiled(wl, {"plain": plain, "attributed": runner}, steps, start + 2 + steps),
                          steps, wl.device)
    x, ids = wl.batch(start)
    rec = {False: [], True: []}
    for _ in range(2 * steps + 2):  # training forward+backward with and without recording, alternating
        for recording in (False, True):
            runner.model.zero_grad(set_to_none=True)
            sync(wl.device)
            t0 = time.perf_counter()
            if recording:
                with attr.capture.recording(torch.as_tensor(ids), 0):
                    train_loss(runner.model, x).mean().backward()
            else:
                train_loss(runner.model, x).mean().backward()
            sync(wl.device)
            rec[recording].append(time.perf_counter() - t0)
            attr.capture.clear()
    runner.model.zero_grad(set_to_none=True)
    fb = {k: statistics.median(v[2:]) for k, v in rec.items()}
    plain_ms = 1e3 * total["plain"] / steps
    profiled_plain = phases.pop("plain.plain step")  # phases are shares of the profiled plain step
    phases.pop("shardshap.attributed step")
    print(f"\n### Breakdown: W1, preset {cfg.preset!r}, {steps} steps of each after step {start}\n")
    print("| phase | ms / step | % of a plain step |")
    print("|---|---|---|")
    print(f"| plain step | {plain_ms:.1f} | 100.0% |")
    attributed_ms = 1e3 * total["attributed"] / steps
    print(f"| attributed step | {attributed_ms:.1f} | {100 * attributed_ms / plain_ms:.1f}% |")
    for key, ms in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"| {key} (profiled) | {ms:.1f} | {100 * ms / profiled_plain:.1f}% |")
    recording = 1e3 * (fb[True] - fb[False])
    print(f"| recording the training forward+backward (median over plain) | {recording:.1f} | "
          f"{100 * recording / plain_ms:.1f}% |")
    floor = (phases.get("shardshap.target", 0.0) + phases.get("shardshap.freeze", 0.0)) / profiled_plain
    print(f"\nFloor of this schedule (a fresh target pass at the midpoint and the secant math, with products, "
          f"recording and checks free): 1 + {floor:.3f} = {1 + floor:.3f}x; rho = {wl.rho:.4f}")
    runner.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["w1"], choices=["w1", "w2"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    ap.add_argument("--rounds", type=int, default=12, help="W1 rounds (one step of each configuration each)")
    ap.add_argument("--warmup", type=int, default=2, help="rounds discarded")
    ap.add_argument("--ranks", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--rho-batches", type=int, nargs="*", default=[1, 2, 4, 8], help="W1 target batches")
    ap.add_argument("--w2-rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="W1 only: 6 rounds, ranks 16, rho sweep of exact/fast")
    ap.add_argument("--profile", choices=["exact", "fast", "lowrank"], help="profile W1 steps of that preset "
                    "instead of the tables")
    ap.add_argument("--breakdown", choices=["exact", "fast", "lowrank"], help="wall-clock split of W1 steps of "
                    "that preset (phases, product rules, recording overhead) instead of the tables")
    ap.add_argument("--configs", type=lambda s: s.split(","), default=None,
                    help="W1: only these configurations (comma-separated names of the table's rows)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--warm-steps", type=int, default=12,
                    help="plain steps before timing (>= 11: past Config.cold_steps, the timed steps are warm)")
    ap.add_argument("--malloc", choices=["keep", "default"], default="keep",
                    help="CPU: 'keep' freed memory in the process (no page faults each step; keep_freed_memory) "
                         "or glibc's 'default'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    malloc = "default"
    if dev.type == "cpu" and args.malloc == "keep" and keep_freed_memory():
        malloc = "keep freed memory (mmap threshold 32 MiB, no trim)"
    if args.quick:
        args.rounds, args.ranks = 6, [16]
    print(f"torch {torch.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else f", {args.threads} threads")
          + f", shardshap {shardshap.__version__}" + (f", malloc: {malloc}" if dev.type == "cpu" else ""))
    warm_steps = args.warm_steps
    fid_steps = [warm_steps, warm_steps + 3]

    if args.profile or args.breakdown:
        wl = make_workload("w1", dev, 2)
        warm(wl, warm_steps)
        if args.profile:
            profile(wl, shardshap.Config(preset=args.profile), 3, warm_steps)
        else:
            breakdown(wl, shardshap.Config(preset=args.breakdown), 5, warm_steps)
        return

    if "w1" in args.workloads:
        wl = make_workload("w1", dev, 2)
        warm(wl, warm_steps)
        chosen = configs(args.ranks)
        if args.configs:
            unknown = set(args.configs) - set(chosen)
            if unknown:
                ap.error(f"unknown --configs {sorted(unknown)}; choose from {list(chosen)}")
            chosen = {name: cfg for name, cfg in chosen.items() if name in args.configs}
        rows = run_table(wl, chosen, args.rounds, args.warmup, fid_steps, warm_steps, mem=not args.no_memory)
        print_rows("W1: GPT-2 4 layers, d=256, T=128, vocab 4096, batch 32, target batch 2, AdamW fp32", rows)
        sweep = []
        for tb in args.rho_batches:
            wl = make_workload("w1", dev, tb)
            warm(wl, warm_steps)
            cf = {"exact": shardshap.Config(), "preset fast": shardshap.Config(preset="fast")}
            for row in run_table(wl, cf, max(6, args.rounds // 2), args.warmup, fid_steps[:1], warm_steps,
                                 mem=False):
                row["tb"] = tb
                sweep.append(row)
        print("\n### W1: ratio vs rho (target batch 1, 2, 4, 8)\n")
        print("| target batch | rho | floor 1 + rho | exact | preset fast | R fast vs exact |")
        print("|---|---|---|---|---|---|")
        for tb in args.rho_batches:
            r = {row["config"]: row for row in sweep if row["tb"] == tb}
            print(f"| {tb} | {r['exact']['rho']:.4f} | {1 + r['exact']['rho']:.3f} | {r['exact']['ratio']:.3f} | "
                  f"{r['preset fast']['ratio']:.3f} | {r['preset fast']['R']:.5f} |")
        sys.stdout.flush()

    if "w2" in args.workloads:
        run_w2(dev, args)


def run_w2(dev, args):
    """GPT-2 small. Warm state is simulated with cold_steps=0 (11 warm-up steps would take minutes on CPU).
    Memory is tight on a 23 GiB CPU machine: the plain runner trains the workload's own model, gradients are
    freed after every step, and each result is printed as soon as it exists."""
    wl = make_workload("w2", dev, 2)
    plain_step(wl.model, wl.opt, wl.batch(0)[0])
    exact = shardshap.Config(cold_steps=0)
    fast = shardshap.Config(preset="fast", cold_steps=0)
    lowrank = shardshap.Config(preset="lowrank", cold_steps=0)
    runners = {"exact": Runner(wl, exact), "preset fast": Runner(wl, fast), "preset lowrank": Runner(wl, lowrank),
               "plain": Runner(wl, None, wl.model, wl.opt)}
    for r in runners.values():
        r.free_grads = True
    times = interleave(wl, runners, args.w2_rounds + 1, 1, 1)
    plain = statistics.median(times["plain"])
    print("\n### W2: GPT-2 small (124M, tied head), T=512, batch 8, target batch 2, AdamW fp32\n")
    print("| configuration | s / step | ratio vs plain |")
    print("|---|---|---|")
    for k in ("plain", "exact", "preset fast", "preset lowrank"):
        print(f"| {k} | {statistics.median(times[k]):.2f} | {statistics.median(times[k]) / plain:.3f} |")
    sys.stdout.flush()
    if not args.no_memory:
        with ExactRss():
            for k, r in runners.items():
                print(f"peak memory of one step, {k}: {memory(wl, r, 10):.0f} MiB", flush=True)
    for r in runners.values():
        r.close()
    del runners
    # the baseline last, alone: it holds b x 124M per-sample gradients and vmap's per-sample intermediates;
    # its step peaked at 20.4 GiB on an H100 (5 x the per-sample gradients), and on the 23 GiB CPU machine
    # it was killed by the kernel for memory: check first instead of crashing
    need = 5 * 8 * sum(p.numel() for p in wl.model.parameters()) * 4
    if LIBC is not None:  # hand the heap that --malloc keep held back to the OS before counting what is free
        LIBC.malloc_trim(0)
    avail = (torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else _rss_kib_meminfo())
    if dev.type == "cpu" and need > 0.8 * avail:
        print(f"per-sample-gradient baseline: out of memory (needs about {need / 2**30:.1f} GiB, "
              f"{avail / 2**30:.1f} GiB available); not run")
        return
    try:
        b = Runner(wl, "vmap", wl.model, wl.opt)
        b.free_grads = True
        base_t = []
        for s in range(args.w2_rounds + 1):
            sync(dev)
            t0 = time.perf_counter()
            with PeakMemory(dev) as pm:
                b.step(20 + s)
            sync(dev)
            if s > 0:
                base_t.append(time.perf_counter() - t0)
        med, ex = statistics.median(base_t), statistics.median(times["exact"])
        print(f"| per-sample grads (vmap) + dot | {med:.2f} | {med / plain:.3f} |  (peak {pm.mib:.0f} MiB)")
        print(f"baseline / exact mode per step: {med / ex:.2f}x", flush=True)
    except torch.cuda.OutOfMemoryError as err:  # only raised on CUDA; CPU OOM kills the process
        print(f"per-sample-gradient baseline: out of memory ({str(err).splitlines()[0]})")


def _rss_kib_meminfo() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main()
