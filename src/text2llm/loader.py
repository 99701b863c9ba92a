"""Token shards -> (input, target) batches.

The shards of a split are memory-mapped (never read whole into memory). What a batch holds
depends on the ``mode`` in ``meta.json`` (see :mod:`text2llm.pack`):

* packed: the shards are one long token stream; a batch is ``B`` windows of ``T + 1`` tokens,
  inputs the first ``T``, targets the last ``T`` (shifted by one). Windows cross document
  boundaries; :func:`document_attention_mask` keeps attention inside each document.
* padded: the shards are rows of ``row_len = seq_len + 1`` tokens, one document (or one window of
  a long document) per row; inputs are ``row[:T]`` and targets ``row[1:T+1]`` with every target
  that is padding set to ``IGNORE_INDEX`` (the ignore index, from :mod:`text2llm.loss`), so the
  loss skips exactly the padding. A loader ``seq_len`` below the packed one crops rows; above it
  is an error.

Positions ``lo``, ``hi``, ``pos`` count tokens in packed mode and rows in padded mode.

* ``random`` mode samples window starts (rows) uniformly with replacement, from an RNG seeded by
  (seed, rank) -- what pretraining uses; ``sequential`` mode walks them in order and wraps
  around -- what evaluation uses.
* ``bos`` mode (packed shards; ``train.loader = "bos"``): every row starts at a document start
  (its BOS), and documents are packed into rows best-fit, as nanochat's loader does: documents
  enter a buffer of up to ``BOS_BUFFER_DOCS`` in a shuffled order (a new permutation each epoch);
  each row starts with the *oldest* buffered document, then takes, while it has room, the longest
  buffered document that fits whole, and when none fits it is filled with the start of the shortest
  one (the rest of that document is dropped). The oldest-first start is our change to nanochat's
  pure best-fit: with documents about a row long (TinyStories at T = 256) pure best-fit prefers
  the row-long ones at every row start and the mid-length ones pile up in the buffer unserved;
  oldest-first serves every document within
  ``BOS_BUFFER_DOCS`` rows of entering. Every document enters the buffer once per epoch and leaves
  it in some row, so an epoch covers every document's start; a document longer than a row
  contributes its first ``T + 1`` tokens.
* Rank-aware: with ``world_size`` processes the stream (or the rows) is cut into ``world_size``
  contiguous parts and rank ``r`` reads only part ``r``, so ranks never read the same tokens.
* Resumable: ``state_dict()`` is a small JSON-able dict (RNG state, position, batch count); a
  loader restored from it yields exactly the batches an uninterrupted one would have yielded.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from text2llm.errors import UserError
from text2llm.loss import IGNORE_INDEX
from text2llm.pack import read_meta

BOS_BUFFER_DOCS = 1000  # documents the best-fit packer chooses from (nanochat's buffer size)


class TokenLoader:
    def __init__(self, tokens_dir: str | Path, split: str, batch_size: int, seq_len: int,
                 mode: Literal["random", "sequential", "bos"] = "random", seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if mode not in ("random", "sequential", "bos"):
            raise ValueError(f"mode must be 'random', 'sequential' or 'bos', not {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.meta = read_meta(tokens_dir)
        info = self.meta["splits"].get(split)
        if not info or info["tokens"] == 0:
            raise UserError(f"{tokens_dir}: split '{split}' holds no tokens")
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self._shards = [np.memmap(Path(tokens_dir) / f, dtype=dtype, mode="r") for f in info["shards"]]
        self._starts = np.cumsum([0] + [len(a) for a in self._shards])  # stream offset of each shard
        self.padded = self.meta.get("mode", "packed") == "padded"
        self.pad_id = int(self.meta.get("pad_id", 0))
        self.split, self.B, self.T, self.mode = split, batch_size, seq_len, mode
        self.seed, self.rank, self.world_size = seed, rank, world_size
        n_tokens = int(self._starts[-1])
        if self.padded:
            self.row_len = int(self.meta["row_len"])
            if seq_len > self.row_len - 1:
                raise UserError(
                    f"{tokens_dir}: rows were packed for seq_len {self.row_len - 1} (pack.seq_len), shorter than "
                    f"the requested {seq_len}; repack with pack.seq_len={seq_len} or lower train.seq_len"
                )
            n, unit, need = n_tokens // self.row_len, "rows", 1
        else:
            n, unit, need = n_tokens, "tokens", seq_len + 1
        # this rank's contiguous part of the stream (of the rows in padded mode)
        self.lo, self.hi = n * rank // world_size, n * (rank + 1) // world_size
        if self.hi - self.lo < need:
            raise UserError(
                f"{tokens_dir}: split '{split}' has {self.hi - self.lo} {unit} per rank, fewer than {need}; "
                f"use a shorter train.seq_len, fewer ranks or more data"
            )
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))
        self.pos = self.lo  # next window start (row) in sequential mode
        self.batches = 0
        if mode == "bos":
            self._init_documents(tokens_dir)

    # ---- bos mode: best-fit packing of whole documents ----------------------------------------

    def _init_documents(self, tokens_dir) -> None:
        """Document starts (BOS positions) of the split, this rank's contiguous part of them, and an
        empty buffer; the first epoch's order is drawn on the first batch."""
        if self.padded:
            raise UserError(f"{tokens_dir}: train.loader = 'bos' needs packed shards (pack.mode = 'packed'); "
                            "padded rows already start at a document")
        bos = self.meta.get("bos_id")
        if bos is None:
            raise UserError(f"{tokens_dir}: meta.json has no bos_id; train.loader = 'bos' needs documents that start with BOS")
        starts = np.concatenate([np.flatnonzero(np.asarray(a) == bos) + int(o) for a, o in zip(self._shards, self._starts)])
        if starts.size == 0:
            raise UserError(f"{tokens_dir}: split '{self.split}' holds no BOS token (id {bos}); "
                            "train.loader = 'bos' needs documents that start with BOS")
        ends = np.append(starts[1:], self._starts[-1])
        n = starts.size
        d_lo, d_hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        if d_hi <= d_lo:
            raise UserError(f"{tokens_dir}: split '{self.split}' has {n} documents, fewer than the {self.world_size} "
                            "data-parallel slots; use train.loader = 'random' or more data")
        self._doc_start = starts[d_lo:d_hi]
        self._doc_len = np.minimum(ends[d_lo:d_hi] - self._doc_start, self.T + 1)  # a longer one: its first T+1
        self._buffer: list[int] = []  # document indices (into this rank's part)
        self._epoch_rng: dict | None = None  # RNG state that draws the current epoch's order
        self._order = np.empty(0, dtype=np.int64)
        self._order_pos = 0

    def _next_document(self) -> int:
        if self._order_pos >= self._order.size:  # a new epoch: a new order
            self._epoch_rng = self.rng.bit_generator.state
            self._order = self.rng.permutation(self._doc_start.size)
            self._order_pos = 0
        d = int(self._order[self._order_pos])
        self._order_pos += 1
        return d

    def _bos_row(self) -> np.ndarray:
        """One row of T + 1 tokens: whole documents best-fit, then the start of the shortest one."""
        room, parts = self.T + 1, []
        cap = min(BOS_BUFFER_DOCS, self._doc_start.size)
        while room > 0:
            while len(self._buffer) < cap:
                self._buffer.append(self._next_document())
            if room == self.T + 1:
                i = 0  # the oldest (the buffer is in arrival order)
            else:
                lens = self._doc_len[self._buffer]
                fits = np.flatnonzero(lens <= room)
                i = int(fits[np.argmax(lens[fits])]) if fits.size else int(np.argmin(lens))  # first of equals
            d = self._buffer.pop(i)
            take = min(int(self._doc_len[d]), room)
            parts.append(self._read(int(self._doc_start[d]), take))
            room -= take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _read(self, start: int, n: int) -> np.ndarray:
        """Tokens ``[start, start + n)`` of the split's stream, across shard boundaries."""
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts, need = [], n
        while need > 0:
            off = start - int(self._starts[k])
            piece = self._shards[k][off : off + need]
            parts.append(piece)
            need -= len(piece)
            start += len(piece)
            k += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _next_starts(self) -> list[int]:
        if self.mode == "random":
            span = 1 if self.padded else self.T + 1  # a packed window needs T + 1 tokens
            return [int(s) for s in self.rng.integers(self.lo, self.hi - span + 1, size=self.B)]
        step = 1 if self.padded else self.T
        starts = []
        for _ in range(self.B):
            if self.pos + (1 if self.padded else self.T + 1) > self.hi:
                self.pos = self.lo  # wrap around
            starts.append(self.pos)
            self.pos += step
        return starts

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.T
        if self.mode == "bos":
            rows = [self._bos_row() for _ in range(self.B)]
            xy_BT1 = torch.from_numpy(np.stack(rows).astype(np.int64))
            self.batches += 1
            return xy_BT1[:, :-1], xy_BT1[:, 1:].clone()
        starts = self._next_starts()
        if self.padded:
            rows = [self._read(s * self.row_len, T + 1) for s in starts]
        else:
            rows = [self._read(s, T + 1) for s in starts]
        xy_BT1 = torch.from_numpy(np.stack(rows).astype(np.int64))
        x_BT, y_BT = xy_BT1[:, :-1], xy_BT1[:, 1:].clone()
        if self.padded:
            y_BT[y_BT == self.pad_id] = IGNORE_INDEX
        self.batches += 1
        return x_BT, y_BT

    def num_windows(self) -> int:
        """Windows (rows) a full sequential pass over this rank's part reads."""
        if self.padded:
            return self.hi - self.lo
        return (self.hi - self.lo - 1) // self.T

    # ---- exact resume ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"rng": self.rng.bit_generator.state, "pos": int(self.pos), "batches": self.batches,
                 "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "split": self.split,
                 "mode": self.mode, "seq_len": self.T, "batch_size": self.B}
        if self.mode == "bos":  # the epoch's order is drawn again from the RNG state that drew it
            state["bos"] = {"epoch_rng": self._epoch_rng, "order_pos": self._order_pos, "buffer": list(self._buffer)}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict`. Resuming with another world size,
        rank or split cannot reproduce the old batches: the RNG is then kept fresh (warning)."""
        same = all(state.get(k, v) == v for k, v in
                   (("rank", self.rank), ("world_size", self.world_size), ("split", self.split)))
        if not same:
            warnings.warn(f"loader state from rank {state.get('rank')}/{state.get('world_size')} split "
                          f"{state.get('split')!r} restored into rank {self.rank}/{self.world_size} split "
                          f"{self.split!r}: data order will differ from the original run", stacklevel=2)
            self.batches = int(state.get("batches", 0))
            return
        bos = state.get("bos") if self.mode == "bos" else None
        if bos is not None and bos["epoch_rng"] is not None:
            self.rng.bit_generator.state = bos["epoch_rng"]
            self._epoch_rng, self._order = bos["epoch_rng"], self.rng.permutation(self._doc_start.size)
            self._order_pos, self._buffer = int(bos["order_pos"]), [int(d) for d in bos["buffer"]]
        self.rng.bit_generator.state = state["rng"]
        pos = int(state["pos"])
        self.pos = pos if self.lo <= pos < self.hi else self.lo
        self.batches = int(state["batches"])


def document_attention_mask(x_BT: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Causal mask that also stops attention across documents: ``(B, 1, T, T)`` bool, True = may attend.

    A document starts at each BOS; position ``i`` may attend to ``j <= i`` only when no BOS lies
    in ``(j, i]``. Tokens before the first BOS of a window form one document of their own.
    """
    doc_BT = torch.cumsum((x_BT == bos_id).to(torch.int32), dim=1)  # document index of each position
    T = x_BT.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=x_BT.device).tril()
    same_BTT = doc_BT[:, :, None] == doc_BT[:, None, :]
    return (same_BTT & causal_TT)[:, None, :, :]
