"""The corpus manifest: one JSON object per line, {"id": int, "domain": str, "text": str} (text optional).

A training script writes it next to the store (`<store>.manifest.jsonl`) so that reports can name
domains and show snippets; sample ids are the store's ids."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import StoreError


@dataclass
class Manifest:
    domain: np.ndarray            # [num_samples] str ('' where unknown)
    text: dict[int, str]          # snippets by id

    @property
    def domains(self) -> list[str]:
        return sorted(d for d in set(self.domain.tolist()) if d)


def default_path(store_path: str) -> str:
    return os.fspath(store_path).rstrip("/") + ".manifest.jsonl"


def write_manifest(path: str, ids, domains, texts=None, snippet: int = 160) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for j, (i, d) in enumerate(zip(ids, domains)):
            row = {"id": int(i), "domain": str(d)}
            if texts is not None:
                row["text"] = str(texts[j])[:snippet]
            f.write(json.dumps(row) + "\n")


def read_manifest(path: str, num_samples: int) -> Optional[Manifest]:
    """None if there is no manifest; a clear error naming the line if it is malformed."""
    if not path or not os.path.exists(path):
        return None
    if not os.path.isfile(path):
        raise StoreError(f"{path}: the manifest is not a file; pass the JSONL file the run wrote")
    domain = np.full(num_samples, "", dtype=object)
    text = {}
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):  # streamed: a manifest may have a billion rows
                if line.strip():
                    _read_row(path, n, line, num_samples, domain, text)
    except UnicodeDecodeError:
        raise StoreError(f"{path}: the manifest is not UTF-8 text; pass the JSONL manifest the run wrote") from None
    return Manifest(domain.astype(str), text)


def _read_row(path, n, line, num_samples, domain, text):
    try:
        row = json.loads(line)
        i = int(row["id"])
    except (ValueError, KeyError, TypeError) as err:
        raise StoreError(f"{path}:{n}: not a manifest row ({err}); expected "
                         '{"id": int, "domain": str, "text": str}') from None
    if not 0 <= i < num_samples:
        raise StoreError(f"{path}:{n}: id {i} outside the store's [0, {num_samples})")
    domain[i] = str(row.get("domain", ""))
    if "text" in row:
        text[i] = row["text"]
