"""Corpus -> fixed-length training sequences with stable ids, and the per-rank sampler.

A sequence id is the index of a sequence in the built training set, a document id the index of a document
in the corpus: the same config and corpus give the same ids, which the store, the manifest and
`shardshap select` index lists all refer to (sequences, or documents with data.values_per: document)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..analysis.manifest import default_path as manifest_path
from ..analysis.manifest import write_manifest
from ..config import ConfigError
from ..packing import document_attention, next_token_ids, position_ids

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = TEXT_SUFFIXES + (".jsonl",)


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; 256 ends a document and pads."""
    vocab_size = 257
    eos_id = pad_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer folder (never downloaded)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer
        if not Path(path).exists():
            raise ConfigError(f"data.tokenizer: no folder {path!r}; use 'bytes' or a local tokenizer folder")
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else 0
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def make_tokenizer(name: str):
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)


# -------------------------------------------------------------------- documents
def _files(path: Path, where: str) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if not found:
            raise ConfigError(f"{where}: folder {str(path)!r} has no {'/'.join(SUFFIXES)} files")
        return found
    if not path.is_file():
        raise ConfigError(f"{where}: no file or folder {str(path)!r} (relative paths are relative to the "
                          "working directory)")
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"{where}: {str(path)!r} is not a {'/'.join(SUFFIXES)} file")
    return [path]


def read_documents(entries, where: str = "data.corpus") -> list[tuple[str, str]]:
    """[(text, domain)] in file order. JSONL rows are {"text": ..., "domain": ...} (domain optional: the
    entry's domain or the file name); a .txt/.md file is one document."""
    docs = []
    for i, entry in enumerate(entries):
        path, domain = (entry, None) if isinstance(entry, str) else (entry.path, entry.domain)
        for f in _files(Path(path), f"{where}[{i}]"):
            default = domain or f.stem
            if f.suffix.lower() != ".jsonl":
                docs.append((f.read_text(encoding="utf-8", errors="replace"), default))
                continue
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        text = row["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ConfigError(f"{f}:{n}: expected a JSON object with a 'text' key, e.g. "
                                          '{"text": "...", "domain": "code"}') from None
                    docs.append((str(text), str(row.get("domain") or default)))
    return docs


# -------------------------------------------------------------------- sequences
@dataclass
class Sequences:
    tokens: np.ndarray      # [S, T] int64
    length: np.ndarray      # [S] real tokens (the rest is padding)
    domain: np.ndarray      # [S] str: domain of the document that fills most of the sequence
    doc: np.ndarray         # [S] index of the first document in the sequence
    docs: np.ndarray        # [S, T] document of every token (-1: padding)

    def __len__(self) -> int:
        return len(self.length)

    def batch(self, ids, device="cpu", attention: str = "causal", dtype=torch.float32) -> tuple:
        """(input_ids, attention_mask) of the given sequence ids; attention 'document': (input_ids, a [b, 1, T, T]
        document-masked attention mask in `dtype`, position_ids restarting at each document)."""
        ids = np.asarray(ids)
        tok = torch.from_numpy(self.tokens[ids]).to(device)
        if attention == "document":
            docs = torch.from_numpy(self.docs[ids])
            return tok, document_attention(docs, dtype).to(device), position_ids(docs).to(device)
        mask = (torch.arange(self.tokens.shape[1]) < torch.from_numpy(self.length[ids])[:, None]).long()
        return tok, mask.to(device)

    def position_ids_of(self, ids) -> torch.Tensor:
        """[b, T-1]: the document of each next-token loss of the given sequences (-1: not counted)."""
        return next_token_ids(torch.from_numpy(self.docs[np.asarray(ids)]))

    def most_documents(self) -> int:
        """The most documents with a counted position in one sequence."""
        return max(len(np.unique(row[row >= 0])) for row in next_token_ids(torch.from_numpy(self.docs)).numpy())


def build_sequences(docs, tokenizer, seq_len: int, packing: str = "pad", truncate: bool = False,
                    doc_ids=None) -> Sequences:
    """`docs` [(text, domain)] as sequences; `doc_ids`: the id of each document (default 0, 1, ...)."""
    doc_ids = range(len(docs)) if doc_ids is None else [int(i) for i in doc_ids]
    rows, lengths, domains, first, owners = [], [], [], [], []
    if packing == "pad":
        for d, (text, dom) in zip(doc_ids, docs):
            ids = tokenizer.encode(text)
            chunks = [ids[:seq_len]] if truncate else [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
            for c in chunks:
                if len(c) < 2:  # nothing to predict
                    continue
                rows.append(c + [tokenizer.pad_id] * (seq_len - len(c)))
                lengths.append(len(c))
                domains.append(dom)
                first.append(d)
                owners.append([d] * len(c) + [-1] * (seq_len - len(c)))
    else:  # pack: one stream, documents separated by EOS, cut into full sequences (the tail is dropped)
        stream, owner = [], []
        domain_of = {}
        for d, (text, dom) in zip(doc_ids, docs):
            domain_of[d] = dom
            ids = tokenizer.encode(text) + [tokenizer.eos_id]
            stream += ids
            owner += [d] * len(ids)
        owner = np.asarray(owner)
        for s in range(0, len(stream) - seq_len + 1, seq_len):
            rows.append(stream[s:s + seq_len])
            lengths.append(seq_len)
            o = owner[s:s + seq_len]
            doms = np.array([domain_of[k] for k in o])
            values, counts = np.unique(doms, return_counts=True)
            domains.append(values[np.argmax(counts)])
            first.append(int(o[0]))
            owners.append(o)
    if not rows:
        raise ConfigError(f"the corpus gives no sequence of >= 2 tokens (packing={packing}, seq_len={seq_len})")
    return Sequences(np.asarray(rows, dtype=np.int64), np.asarray(lengths, dtype=np.int64),
                     np.asarray(domains, dtype=str), np.asarray(first, dtype=np.int64),
                     np.asarray(owners, dtype=np.int64).reshape(len(rows), seq_len))


def read_keep(path: str, num_samples: int) -> np.ndarray:
    """Sorted ids from a `shardshap select` list (one id per line)."""
    if not Path(path).is_file():
        raise ConfigError(f"data.keep: no file {path!r}; write one with `shardshap select STORE --rule ... -o FILE`")
    try:
        keep = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except ValueError as err:
        raise ConfigError(f"data.keep: {path} is not a list of integer ids, one per line ({err})") from None
    bad = keep[(keep < 0) | (keep >= num_samples)]
    if len(bad):
        raise ConfigError(f"data.keep: ids {bad[:5].tolist()} are outside this training set [0, {num_samples}); "
                          "was the list selected from a run on another corpus or seq_len?")
    return np.unique(keep)


@dataclass
class Data:
    train: Sequences
    texts: list                # snippet per training sequence (manifest)
    val: dict                  # name -> Sequences (first val_sequences)
    pool: np.ndarray           # ids the sampler draws from (all, or data.keep)
    tokenizer: object
    documents: list            # [(text, domain)] of the corpus, in document id order


def build_data(cfg) -> Data:
    """Everything the trainer reads, from a RecipeConfig's data section."""
    d = cfg.data
    tok = make_tokenizer(d.tokenizer)
    documents = read_documents(d.corpus)
    per_document = d.values_per == "document"
    # data.keep lists documents when values are per document: the sequences are built from those alone
    kept = read_keep(d.keep, len(documents)) if d.keep and per_document else np.arange(len(documents))
    train = build_sequences([documents[i] for i in kept], tok, d.seq_len, d.packing, d.truncate, kept)
    val = {}
    for name, files in d.validation.items():
        files = [files] if isinstance(files, str) else files
        seqs = build_sequences(read_documents(files, f"data.validation.{name}"), tok, d.seq_len, d.packing,
                               d.truncate)
        n = min(d.val_sequences, len(seqs))
        val[name] = Sequences(seqs.tokens[:n], seqs.length[:n], seqs.domain[:n], seqs.doc[:n], seqs.docs[:n])
    texts = [tok.decode(train.tokens[i, :train.length[i]]) for i in range(len(train))]
    pool = read_keep(d.keep, len(train)) if d.keep and not per_document else np.arange(len(train))
    return Data(train, texts, val, pool, tok, documents)


def write_corpus_manifest(store: str, data: Data, per_document: bool = False) -> str:
    """`<store>.manifest.jsonl`: id, domain and a snippet of every training sequence, or of every document
    (read by `shardshap report`)."""
    path = manifest_path(store)
    if per_document:
        write_manifest(path, range(len(data.documents)), [dom for _, dom in data.documents],
                       [text for text, _ in data.documents])
    else:
        write_manifest(path, range(len(data.train)), data.train.domain, data.texts)
    return path


# -------------------------------------------------------------------- sampler
class Sampler:
    """Global batches of `global_batch` distinct ids per optimizer step, drawn epoch by epoch from a seeded
    permutation of the pool (the epoch's tail that does not fill a batch is skipped, so no step repeats an
    id). Stateless: step s always gives the same batch, so resuming needs only the step number."""

    def __init__(self, pool: np.ndarray, micro_batch: int, grad_accum: int, world_size: int, seed: int):
        self.pool = np.asarray(pool, dtype=np.int64)
        self.micro, self.accum, self.world, self.seed = micro_batch, grad_accum, world_size, seed
        self.global_batch = micro_batch * grad_accum * world_size
        if len(self.pool) < self.global_batch:
            raise ConfigError(f"the training set has {len(self.pool)} sequences but one optimizer step needs "
                              f"{self.global_batch} (micro_batch x grad_accum x ranks); lower train.micro_batch "
                              "or add data")
        self.steps_per_epoch = len(self.pool) // self.global_batch

    def global_ids(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.pool)
        return perm[k * self.global_batch:(k + 1) * self.global_batch]

    def local_ids(self, step: int, rank: int) -> list[np.ndarray]:
        """This rank's share of step's global batch, as grad_accum micro-batches of micro_batch ids."""
        per_rank = self.micro * self.accum
        mine = self.global_ids(step)[rank * per_rank:(rank + 1) * per_rank]
        return [mine[j * self.micro:(j + 1) * self.micro] for j in range(self.accum)]
