"""Token shards -> (input, target) batches.

The shards of a split are memory-mapped and seen as one long token stream. A batch is ``B``
windows of ``T + 1`` tokens: inputs are the first ``T``, targets the last ``T`` (shifted by one).

* ``random`` mode samples window starts uniformly (what pretraining uses);
  ``sequential`` mode walks the stream in order (what evaluation uses).
* Rank-aware: with ``world_size`` processes, the stream is cut into ``world_size`` contiguous
  parts and rank ``r`` reads only part ``r``, so ranks never read the same tokens.
* Resumable: ``state_dict()`` is a small JSON-able dict (RNG state, position); a loader restored
  from it yields exactly the batches an uninterrupted one would have yielded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from text2llm.errors import UserError
from text2llm.pack import read_meta


class TokenLoader:
    def __init__(self, tokens_dir: str | Path, split: str, batch_size: int, seq_len: int,
                 mode: Literal["random", "sequential"] = "random", seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.meta = read_meta(tokens_dir)
        info = self.meta["splits"].get(split)
        if not info or info["tokens"] == 0:
            raise UserError(f"{tokens_dir}: split '{split}' holds no tokens")
        dtype = np.dtype(self.meta["dtype"])
        arrays = [np.memmap(Path(tokens_dir) / f, dtype=dtype, mode="r") for f in info["shards"]]
        self.tokens = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        n = len(self.tokens)
        # this rank's contiguous part of the stream
        self.lo, self.hi = n * rank // world_size, n * (rank + 1) // world_size
        if self.hi - self.lo < seq_len + 1:
            raise UserError(
                f"{tokens_dir}: split '{split}' has {self.hi - self.lo} tokens per rank, fewer than "
                f"seq_len + 1 = {seq_len + 1}; use a shorter train.seq_len or more data"
            )
        self.split, self.B, self.T, self.mode = split, batch_size, seq_len, mode
        self.seed, self.rank = seed, rank
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))
        self.pos = self.lo  # next window start in sequential mode
        self.batches = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.T
        if self.mode == "random":
            starts = self.rng.integers(self.lo, self.hi - T, size=self.B)
        else:
            starts = []
            for _ in range(self.B):
                if self.pos + T + 1 > self.hi:
                    self.pos = self.lo  # wrap around
                starts.append(self.pos)
                self.pos += T
        windows = np.stack([np.asarray(self.tokens[s : s + T + 1], dtype=np.int64) for s in starts])
        self.batches += 1
        xy = torch.from_numpy(windows)
        return xy[:, :-1], xy[:, 1:]

    def num_windows(self) -> int:
        """Non-overlapping windows of T tokens in this rank's part (for a full sequential pass)."""
        return (self.hi - self.lo - 1) // self.T

    # ---- exact resume ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "pos": int(self.pos), "batches": self.batches,
                "seed": self.seed, "rank": self.rank, "split": self.split, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.pos = int(state["pos"])
        self.batches = int(state["batches"])
