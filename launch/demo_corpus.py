"""The quickstart's corpus, built from files present on every Python installation.

- `code`: 4-line chunks of the standard library's *.py files (comment and string-only lines dropped);
- `prose`: docstrings of the standard library's modules, classes and functions;
- `junk`: generated and labelled as such: random printable characters, shuffled docstring characters,
  repeated fragments (`#@!#@!...`).

Writes OUT/train.jsonl ({"text", "domain"} per line, `per_domain` samples per domain) and the held-out
validation sets OUT/val_code.jsonl and OUT/val_prose.jsonl (`val` each).

    python launch/demo_corpus.py --out runs/quickstart/data [--per-domain 400] [--val 8]
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import sysconfig
from pathlib import Path

T = 64  # junk length in characters (the demo's seq_len)


def build_corpus(per_domain: int, seed: int = 0):
    """(code, prose, junk): lists of texts; code and prose from the stdlib, junk generated."""
    rng = random.Random(seed)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    code, prose = [], []
    for f in files:
        try:
            src = f.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)) else None
            if doc and len(doc) >= 48:
                prose.append(doc)
        lines = [ln for ln in src.splitlines() if ln.strip() and not ln.strip().startswith(("#", '"', "'"))]
        for i in range(0, len(lines) - 4, 6):
            code.append("\n".join(lines[i:i + 4]))
    rng.shuffle(code)
    rng.shuffle(prose)
    alphabet = [chr(c) for c in range(33, 127)]
    junk = []
    for j in range(per_domain):
        kind = j % 3
        if kind == 0:
            junk.append("".join(rng.choice(alphabet) for _ in range(T)))
        elif kind == 1:
            s = list(rng.choice(prose)[:T])
            rng.shuffle(s)
            junk.append("".join(s))
        else:
            junk.append((rng.choice(["xq", "zz9 ", "#@!", "qwe rty "]) * T)[:T])
    return code, prose, junk


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for text, domain in rows:
            f.write(json.dumps({"text": text, "domain": domain}) + "\n")


def write_demo_corpus(out: str, per_domain: int = 400, val: int = 8, seed: int = 0) -> dict:
    """Writes the three JSONL files; returns {name: path}."""
    code, prose, junk = build_corpus(per_domain, seed)
    n = per_domain
    if min(len(code), len(prose)) < n + val:
        raise SystemExit(f"this Python's stdlib gives {len(code)} code and {len(prose)} prose samples; "
                         f"lower --per-domain (needs {n + val} each)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "val_code": out / "val_code.jsonl", "val_prose": out / "val_prose.jsonl"}
    write_jsonl(paths["train"], [(t, "code") for t in code[:n]] + [(t, "prose") for t in prose[:n]]
                + [(t, "junk") for t in junk[:n]])
    write_jsonl(paths["val_code"], [(t, "code") for t in code[n:n + val]])
    write_jsonl(paths["val_prose"], [(t, "prose") for t in prose[n:n + val]])
    return {k: str(v) for k, v in paths.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quickstart/data")
    ap.add_argument("--per-domain", type=int, default=400, help="training samples per domain")
    ap.add_argument("--val", type=int, default=8, help="held-out samples per validation set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    paths = write_demo_corpus(args.out, args.per_domain, args.val, args.seed)
    print(f"demo corpus: {3 * args.per_domain} training samples in {paths['train']}; validation sets "
          f"{paths['val_code']}, {paths['val_prose']}")


if __name__ == "__main__":
    main()
