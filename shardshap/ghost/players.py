"""The players of one step's game: which row of the step's values each sample, or each token, feeds.

Sample ids (1-D, one per sample): one player per sample, rows in batch order.

Per-position ids (shaped like train_loss's output, e.g. `[b, T-1]` next-token losses): one player per
distinct id (a document), rows in order of first appearance over the step's micro-batches; -1 marks
positions that do not count. A token's activations belong to the player of the next counted position
at or after it in its row, the first loss its output reaches under causal attention. With
document-masked attention every gradient that reaches a token comes from its own document's positions,
so the split is exact; with attention across documents it is an approximation (docs/training.md).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..errors import AttributionError, BatchShapeError

TOKEN_CHUNK_NUMBERS = 1 << 24  # per-token results taken at once (64 MiB in fp32) before they are summed


def next_counted(positions: torch.Tensor) -> torch.Tensor:
    """[b, L]: the id of the next position at or after each one (in its row) whose id is not -1, or -1."""
    b, L = positions.shape
    where = torch.where(positions >= 0, torch.arange(L).expand(b, L), torch.full((b, L), L))
    nxt = where.flip(1).cummin(1).values.flip(1)  # index of the next counted position (L: none)
    padded = torch.cat([positions, torch.full((b, 1), -1, dtype=positions.dtype)], 1)
    return padded.gather(1, nxt)


class MicroPlayers:
    """One micro-batch's players: `rows` [m] (their rows in the step's values) and, for per-position ids,
    each position's local player (0..m-1, -1: not counted)."""

    def __init__(self, rows: torch.Tensor, local: Optional[torch.Tensor] = None):
        self.rows = rows
        self.local = local                   # [b, L] local player per position, or None (one per sample)
        self._tokens: dict[tuple, torch.Tensor] = {}

    @property
    def m(self) -> int:
        return len(self.rows)

    @property
    def per_position(self) -> bool:
        return self.local is not None

    def token_players(self, T: int, device) -> torch.Tensor:
        """[b * T]: each token's local player, `m` for tokens that feed none (a module sees T = L or L + 1
        positions: the loss of the last token, when there is none, counts as -1)."""
        key = (T, str(device))
        if key not in self._tokens:
            b, L = self.local.shape
            if T not in (L, L + 1):
                raise BatchShapeError(
                    f"per-position sample_ids have {L} positions per row, but a module sees {T} tokens; an "
                    "attributed module must take [batch, tokens, ...] with tokens = the positions of train_loss's "
                    "output (or one more: next-token losses), or be excluded with Config(exclude=[...])")
            local = torch.cat([self.local, torch.full((b, T - L), -1, dtype=self.local.dtype)], 1)
            tok = next_counted(local).reshape(-1)
            self._tokens[key] = torch.where(tok >= 0, tok, self.m).to(device)
        return self._tokens[key]

    def over_tokens(self, fn: Callable, a: torch.Tensor, e: torch.Tensor,
                    per_token: int) -> dict[str, torch.Tensor]:
        """`fn(a, e) -> {name: [samples, ...]}` with every token as a sample of its own, summed into this
        micro-batch's players: {name: [m, ...]}. `per_token`: numbers `fn` makes per token (chunks tokens)."""
        if a.dim() < 2 or e.dim() < 2:
            raise BatchShapeError(f"per-position sample_ids need modules that take [batch, tokens, ...]; one takes "
                                  f"an input of shape {tuple(a.shape)}: exclude it with Config(exclude=[...])")
        b, T = a.shape[:2]
        players = self.token_players(T, e.device)
        a_tok = a.reshape(b * T, 1, *a.shape[2:])
        e_tok = e.reshape(b * T, 1, *e.shape[2:])
        chunk = max(1, TOKEN_CHUNK_NUMBERS // max(1, per_token))
        out: dict[str, torch.Tensor] = {}
        for lo in range(0, b * T, chunk):
            for name, v in fn(a_tok[lo:lo + chunk], e_tok[lo:lo + chunk]).items():
                if name not in out:
                    out[name] = v.new_zeros(self.m + 1, *v.shape[1:])
                out[name].index_add_(0, players[lo:lo + chunk], v)
        return {name: v[:self.m] for name, v in out.items()}

    def padded(self, T: int, chosen: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(index [c, Lmax] into the flattened b * T tokens, valid [c, Lmax] bool) of the local players
        `chosen`: their tokens side by side, padded (per-sample gradients of a few players at a time)."""
        tok = self.token_players(T, "cpu")
        groups = [torch.nonzero(tok == j).flatten() for j in chosen]
        width = max(1, max(len(g) for g in groups))
        index = torch.zeros(len(chosen), width, dtype=torch.int64)
        valid = torch.zeros(len(chosen), width, dtype=torch.bool)
        for i, g in enumerate(groups):
            index[i, :len(g)], valid[i, :len(g)] = g, True
        return index, valid


class Players:
    """The step's players, built micro-batch by micro-batch (`add`), and how their values are merged."""

    def __init__(self):
        self._row: dict[int, int] = {}  # player id -> row (per-position ids)
        self._ids: list[torch.Tensor] = []
        self.n = 0
        self.micro: list[MicroPlayers] = []
        self.counted: list[torch.Tensor] = []  # per micro-batch: [m] counted positions of each local player

    @property
    def ids(self) -> torch.Tensor:
        """[n] the players' ids, in row order."""
        return torch.cat(self._ids) if self._ids else torch.zeros(0, dtype=torch.int64)

    @property
    def per_position(self) -> bool:
        return bool(self.micro) and self.micro[0].per_position

    def add(self, ids: torch.Tensor) -> MicroPlayers:
        """A micro-batch's ids: 1-D (one player per sample) or per position (-1: not counted)."""
        if self.micro and (ids.dim() > 1) != self.per_position:
            raise AttributionError("sample_ids must be per sample (1-D) in every micro-batch of a step, or per "
                                   "position in every one, not a mix")
        if ids.dim() == 1:
            rows = torch.arange(self.n, self.n + len(ids))
            self._ids.append(ids)
            self.n += len(ids)
            mp = MicroPlayers(rows)
            self.counted.append(torch.ones(len(ids), dtype=torch.int64))
        else:
            if bool((ids < -1).any()):
                raise AttributionError("per-position sample_ids must be ids >= 0, or -1 for positions that do not "
                                       f"count; got {ids[ids < -1][:5].tolist()}")
            distinct, local = torch.unique(ids[ids >= 0], return_inverse=True)  # (none: a micro-batch of padding)
            local_map = torch.full(ids.shape, -1, dtype=torch.int64)
            local_map[ids >= 0] = local
            fresh = [int(i) for i in distinct.tolist() if int(i) not in self._row]
            for i in fresh:
                self._row[i] = self.n
                self.n += 1
            if fresh:
                self._ids.append(torch.tensor(fresh, dtype=torch.int64))
            rows = torch.tensor([self._row[int(i)] for i in distinct.tolist()], dtype=torch.int64)
            mp = MicroPlayers(rows, local_map)
            self.counted.append(torch.bincount(local, minlength=len(distinct)))
        self.micro.append(mp)
        return mp

    def merge(self, parts: list[Optional[torch.Tensor]], tail: tuple, dtype, device) -> torch.Tensor:
        """[n, *tail]: each micro-batch's [m, *tail] values added into the players' rows (None: zeros)."""
        if not self.per_position:  # the micro-batches' rows follow each other: no scatter
            parts = [torch.zeros(mp.m, *tail, dtype=dtype, device=device) if part is None else part.to(dtype)
                     for mp, part in zip(self.micro, parts)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        out = torch.zeros(self.n, *tail, dtype=dtype, device=device)
        for mp, part in zip(self.micro, parts):
            if part is not None:
                out.index_add_(0, mp.rows.to(device), part.to(dtype))
        return out

    def counted_positions(self) -> torch.Tensor:
        """[n] counted positions of each player over the step (1 per sample for sample ids)."""
        out = torch.zeros(self.n, dtype=torch.int64)
        for mp, c in zip(self.micro, self.counted):
            out.index_add_(0, mp.rows, c)
        return out
