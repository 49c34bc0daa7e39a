"""The `shardshap` command: look at a score store offline.

    shardshap info RUN.zarr                 metadata
    shardshap report RUN.zarr               steps, samples, negative shares, domains, AUROC, top/bottom
    shardshap top RUN.zarr -k 20 [--bottom] [--target NAME]
    shardshap select RUN.zarr --rule drop-negative|drop-lowest [--fraction 0.1] -o keep.txt
    shardshap plot RUN.zarr -o plots/
    shardshap reduce RUN.zarr               rebuild the per-sample totals from the log
    shardshap verify --config C.yaml        estimators vs exact Shapley values on a few steps of C's model

Add --json for machine-readable output. The corpus manifest (domains, snippets) is read from
RUN.zarr.manifest.jsonl, or --manifest PATH. Errors are one line on stderr: exit code 2 for a bad
flag value, 1 for anything else.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from .errors import ConfigError, ShardshapError, StaleTotalsError, StoreError


class CLIError(ShardshapError):
    """An error to report in one line (no traceback unless --debug)."""


class UsageError(CLIError):
    """A flag value that can never work (exit code 2, like argparse's own usage errors)."""


def _check_flags(args):
    """Reject flag values that cannot work before anything is read, naming the flag and the fix."""
    def need(flag, ok, what, example):
        if not ok:
            raise UsageError(f"{flag} {getattr(args, flag.lstrip('-').replace('-', '_'))}: {what}; "
                             f"pass e.g. {flag} {example}")

    if args.command in ("report", "top"):
        need("-k", args.k >= 1, "must be a positive integer (how many samples to list)", 10)
    if args.command == "select":
        need("--fraction", 0 < args.fraction < 1, "must be in (0, 1), the share of the seen samples "
             "that drop-lowest drops", 0.1)
    if args.command == "reduce" and args.processes is not None:
        need("--processes", args.processes >= 1, "must be at least 1 (worker processes)", 2)
    if args.command == "verify":
        need("--warm-steps", args.warm_steps >= 0, "must be 0 or more (plain steps before the checks)", 12)
        need("--checks", args.checks >= 1, "must be at least 1 (steps compared with the oracle)", 2)
        need("--batch", 2 <= args.batch <= 16, "must be in [2, 16]: the oracle replays the real optimizer "
             "step for every coalition (<= 12 is exact)", 8)
        need("--permutations", args.permutations >= 1, "must be at least 1 (Monte Carlo permutations)", 400)


def _over_steps(scores, window: str):
    """The store's view of the steps --steps A:B names (A, B optional: from the first / to the last step)."""
    lo, sep, hi = window.partition(":")
    try:
        lo, hi = int(lo or 0), int(hi) if hi else scores.num_steps
        if not sep:
            raise ValueError
    except ValueError:
        raise CLIError(f"--steps {window!r}: give a window of steps A:B (steps A to B-1; A: or :B for open "
                       "ends), e.g. --steps 10:200") from None
    try:
        return scores.over_steps(lo, hi)
    except StoreError as err:
        raise CLIError(f"--steps {window!r}: {err}") from None


def _open(args):
    from .store import open_scores
    if not os.path.exists(args.store):
        raise CLIError(f"no store at {args.store!r}: check the path (the directory the run wrote, e.g. RUN.zarr)")
    window = getattr(args, "steps", None)
    try:
        scores = open_scores(args.store)
        if window is not None:
            return _over_steps(scores, window)
        if args.command not in ("info", "reduce"):
            scores.value  # noqa: B018  (raises if the totals are stale)
    except StaleTotalsError:
        raise CLIError(f"the totals of {args.store} are stale (the run did not close cleanly): run "
                       f"'shardshap reduce {args.store}' first") from None
    except StoreError as err:  # the store's own errors only: anything else is a bug, shown as one
        raise CLIError(f"{args.store} is not a readable shardshap store: {err}") from None
    return scores


def _manifest(args, scores):
    from .analysis import read_manifest
    from .analysis.manifest import default_path
    path = args.manifest or default_path(args.store)
    if args.manifest and not os.path.exists(path):
        raise CLIError(f"no manifest at {path!r}: pass --manifest the JSONL file the run wrote, or leave it out")
    try:
        return read_manifest(path, scores.layout.num_samples)
    except StoreError as err:
        raise CLIError(str(err)) from None


def _fmt(x) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def _table(title, header, rows, console):
    if console is not None:
        from rich.table import Table
        t = Table(title=title)
        for h in header:
            t.add_column(h)
        for r in rows:
            t.add_row(*[_fmt(x) for x in r])
        console.print(t)
        return
    print(title)
    cells = [[_fmt(x) for x in r] for r in [header] + rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    for r in cells:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print()


def _console():
    if sys.stdout.isatty():
        from rich.console import Console
        return Console()
    return None


def cmd_info(args):
    scores = _open(args)
    a = scores.attrs
    info = {"store": args.store, "format": f"{a.get('format')} v{a.get('format_version')}",
            "run_id": a.get("run_id"), "targets": scores.targets, "num_samples": a.get("num_samples"),
            "world_size": a.get("world_size"), "steps_committed": scores.num_steps,
            "totals_current": scores.totals_current, "sign_convention": a.get("sign_convention"),
            "metadata": a.get("metadata", {}), "config": a.get("config", {})}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    _table(f"shardshap store {args.store}", ["key", "value"],
           [[k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else v] for k, v in info.items()],
           _console())


def cmd_report(args):
    from .analysis import build_report
    scores = _open(args)
    rep = build_report(scores, _manifest(args, scores), top=args.k)
    if args.json:
        print(json.dumps(rep, indent=2))
        return
    con = _console()
    window = "" if rep["step_window"] is None else " (steps {}-{})".format(rep["step_window"][0],
                                                                        rep["step_window"][1] - 1)
    print(f"{rep['store']}: run {rep['run_id']}, estimator {rep['estimator']}, {rep['steps']} steps{window}, "
          f"{rep['samples_seen']} of {rep['num_samples']} samples seen")
    _table("per target", ["target", "mean value", "negative share"],
           [[t, d["mean"], f"{d['negative_share']:.1%}"] for t, d in rep["per_target"].items()], con)
    if "per_domain" in rep:
        _table("per domain (negative share of the sum over targets)",
               ["domain", "samples"] + [f"mean ({t})" for t in rep["targets"]] + ["negative share"],
               [[d, x["samples"], *x["mean"].values(), f"{x['negative_share']:.1%}"]
                for d, x in rep["per_domain"].items()], con)
    if "auroc_low_value_is_junk" in rep:
        _table("AUROC of flagging the 'junk' domain", ["signal", "AUROC"],
               [[f"low value ({t})", v] for t, v in rep["auroc_low_value_is_junk"].items()]
               + [["high training loss", rep["auroc_high_loss_is_junk"]]], con)
        print("In-Run values measure each sample's contribution to the target losses in this run; they are "
              "not a dedicated noise detector (the training loss is shown beside them).\n")
    for which in ("top", "bottom"):
        _table(f"{which} samples (value summed over targets)", ["id", "value", "steps", "loss", "domain", "text"],
               [[x["id"], x["value"], x["count"], x["loss"], x.get("domain", ""),
                 x.get("text", "").replace("\n", " ")[:60]] for x in rep[which]], con)


def _target_index(scores, name):
    if name is None:
        return None
    if name not in scores.targets:
        raise CLIError(f"--target {name!r} is not a target of this store; targets: {', '.join(scores.targets)}")
    return scores.targets.index(name)


def cmd_top(args):
    scores = _open(args)
    manifest = _manifest(args, scores)
    k = _target_index(scores, args.target)
    v = scores.value.sum(1) if k is None else scores.value[:, k]
    seen = np.flatnonzero(scores.count > 0)
    order = seen[np.argsort(v[seen], kind="stable")]
    order = order[:args.k] if args.bottom else order[::-1][:args.k]
    rows = [{"id": int(i), "value": float(v[i]), "steps": int(scores.count[i]),
             **({"domain": manifest.domain[i], "text": manifest.text.get(int(i), "")} if manifest else {})}
            for i in order]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    _table(f"{'bottom' if args.bottom else 'top'} {args.k} by value ({args.target or 'sum over targets'})",
           ["id", "value", "steps", "domain", "text"],
           [[r["id"], r["value"], r["steps"], r.get("domain", ""), r.get("text", "").replace("\n", " ")[:60]]
            for r in rows], _console())


def cmd_select(args):
    from .analysis import select_keep
    scores = _open(args)
    try:
        keep = select_keep(scores.value, scores.count, args.rule, _target_index(scores, args.target), args.fraction)
    except ConfigError as err:
        raise CLIError(str(err)) from None
    try:
        np.savetxt(args.output, keep, fmt="%d")
    except OSError as err:
        raise CLIError(f"cannot write {args.output!r} ({err.strerror or err}): pass -o a file in an existing, "
                       "writable directory") from None
    summary = {"kept": int(len(keep)), "dropped": int(len(scores.count) - len(keep)), "output": args.output,
               "rule": args.rule}
    print(json.dumps(summary) if args.json else
          f"kept {summary['kept']} samples, dropped {summary['dropped']} ({args.rule}); ids in {args.output}")


def cmd_plot(args):
    from .analysis.plots import write_plots
    scores = _open(args)
    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create the folder {args.output!r} ({err.strerror or err}): pass -o a new or "
                       "existing folder") from None
    paths = write_plots(scores, _manifest(args, scores), args.output)
    print(json.dumps(paths) if args.json else "\n".join(paths))


def cmd_reduce(args):
    from .store import reduce_store
    _open(args)
    summary = reduce_store(args.store, processes=args.processes)
    print(json.dumps(summary, default=str) if args.json else f"totals rebuilt: {summary}")


def cmd_verify(args):
    from .recipe.config import load_config
    from .recipe.verify import verify
    try:
        cfg = load_config(args.config, args.set)
    except (ConfigError, FileNotFoundError) as err:
        raise CLIError(str(err)) from None
    rows, info = verify(cfg, warm_steps=args.warm_steps, checks=args.checks, batch=args.batch, dtype=args.dtype,
                        permutations=args.permutations, progress=not args.json)
    if args.json:
        print(json.dumps({**info, "rows": [r.__dict__ for r in rows]}, indent=2))
        return
    print(f"{info['parameters']:,} parameters in {info['dtype']}, batch {info['batch']} sequences (players: "
          f"{info['players']}), oracle {info['oracle']}, "
          f"after {info['warm_steps']} warm-up steps. Pearson R of each estimator's values against the exact "
          "Shapley values of the same real step (1 = identical ranking and spacing); efficiency gap = how far "
          "the values' sum is from U(B) - U(empty).")
    _table("estimators vs the oracle", ["step", "estimator"] + [f"R ({t})" for t in info["targets"]]
           + ["max efficiency gap"],
           [[r.step, r.estimator, *[f"{x:.5f}" for x in r.pearson], f"{max(r.efficiency_gap):.2%}"] for r in rows],
           _console())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shardshap", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        p = sub.add_parser(name, help=help_)
        p.add_argument("store", help="path of the Zarr store (RUN.zarr)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--manifest", help="corpus manifest (default: STORE.manifest.jsonl)")
        if name in ("report", "top", "select", "plot"):
            p.add_argument("--steps", metavar="A:B", help="value the samples over steps A to B-1 only (totals "
                           "rebuilt from the step log; the stored totals are not changed), e.g. 10: to leave "
                           "out the first, cold steps")
        p.set_defaults(fn=fn)
        return p

    add("info", cmd_info, "metadata of a store")
    add("report", cmd_report, "summary report").add_argument("-k", type=int, default=5, help="top/bottom samples")
    p = add("top", cmd_top, "top (or bottom) samples by value")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--bottom", action="store_true")
    p.add_argument("--target", help="one target's values (default: the sum over targets)")
    p = add("select", cmd_select, "write the ids of the samples to keep")
    p.add_argument("--rule", required=True, choices=["drop-negative", "drop-lowest"])
    p.add_argument("--fraction", type=float, default=0.1, help="for drop-lowest")
    p.add_argument("--target", help="one target's values (default: the sum over targets)")
    p.add_argument("-o", "--output", required=True, help="text file, one id per line")
    add("plot", cmd_plot, "PNG plots").add_argument("-o", "--output", default="plots", help="output folder")
    add("reduce", cmd_reduce, "rebuild totals from the log").add_argument("--processes", type=int, default=None)
    p = sub.add_parser("verify", help="estimators vs exact Shapley values on a few real steps of a config's model")
    p.add_argument("--config", required=True, help="a launch/train.py config (YAML or JSON)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--warm-steps", type=int, default=12, help="plain AdamW steps before the first check")
    p.add_argument("--checks", type=int, default=2, help="steps compared with the oracle")
    p.add_argument("--batch", type=int, default=8, help="samples per checked step (<= 12: exact enumeration)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="float64 keeps rounding out of the comparison")
    p.add_argument("--permutations", type=int, default=400, help="Monte Carlo permutations when batch > 12")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_verify)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_flags(args)
        args.fn(args)
        return 0
    except CLIError as err:
        if args.debug:
            raise
        print(f"shardshap {args.command}: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except Exception as err:  # noqa: BLE001  (one line for users; --debug shows where)
        if args.debug:
            raise
        print(f"shardshap {args.command}: error: {type(err).__name__}: {err} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
