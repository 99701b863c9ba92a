"""The KV cache: keys and values of the tokens decoded so far, preallocated, passed to ``forward``.

Shape legend as in ``transformer.py``: B batch, K key/value heads, T new tokens, S keys returned
for attention, Dh head dim.
"""

from __future__ import annotations

import torch

from text2llm.model.config import ModelConfig


class KVCache:
    """Preallocated keys and values for incremental decoding.

    ``k[layer]``/``v[layer]`` are (B, K, max_len, Dh). ``pos`` counts the tokens already stored;
    the model writes the new tokens of each layer at ``pos`` and advances ``pos`` once per forward.

    A windowed layer whose window W (``cfg.layer_window``) is shorter than ``max_len`` keeps only its
    last W positions, in a ring buffer (B, K, W, Dh): position p lives in slot p % W
    (``ring[layer] = W``; 0 for a full buffer), so its memory is O(W) and it never fills up.
    ``ring=False`` gives every layer a full buffer instead (the band mask then does the windowing):
    what the compiled decode steps use, whose buffers are fixed graph inputs.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, ring: bool = True):
        self.max_len = max_len or cfg.max_seq_len
        windows = [cfg.layer_window(i) for i in range(cfg.n_layer)]
        self.ring = [w if ring and 0 < w < self.max_len else 0 for w in windows]
        shapes = [(batch_size, cfg.kv_heads, w or self.max_len, cfg.head_dim) for w in self.ring]
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.pos = 0

    @classmethod
    def over(cls, k: list[torch.Tensor], v: list[torch.Tensor]) -> "KVCache":
        """A cache over the caller's full buffers (B, K, max_len, Dh) per layer; nothing allocated."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_len = list(k), list(v), k[0].size(2)
        cache.ring, cache.pos = [0] * len(cache.k), 0
        return cache

    def update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor, attn_mask=None):
        """Store the new keys/values of one layer; return the keys/values to attend to (B, K, S, Dh)
        and ``attn_mask`` (as ``forward`` got it: over positions 0 .. pos+T-1) cut to those keys."""
        if self.ring[layer]:
            return self._ring_update(layer, k_BKTD, v_BKTD, attn_mask)
        T = k_BKTD.size(2)
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens > max_len {self.max_len}")
        k, v = self.k[layer], self.v[layer]
        k.narrow(2, self.pos, T).copy_(k_BKTD)  # (narrow: one op, cheaper than k[:, :, a:b] = ...)
        v.narrow(2, self.pos, T).copy_(v_BKTD)
        return k.narrow(2, 0, self.pos + T), v.narrow(2, 0, self.pos + T), attn_mask

    def _ring_update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor, attn_mask):
        """One new token: written into its slot, then every filled slot is attended to. All of them
        lie within the window, their order does not matter to attention (RoPE is already in the
        keys), and the mask's columns move to the slots of their positions. Several new tokens:
        the cached positions the first of them can see, in order, then the new ones (attention
        applies the band); the last W of them are stored."""
        W, pos, T = self.ring[layer], self.pos, k_BKTD.size(2)
        k_buf, v_buf = self.k[layer], self.v[layer]
        if T == 1:
            k_buf.select(2, pos % W).copy_(k_BKTD[:, :, 0])
            v_buf.select(2, pos % W).copy_(v_BKTD[:, :, 0])
            S = min(pos + 1, W)
            return k_buf.narrow(2, 0, S), v_buf.narrow(2, 0, S), ring_mask(attn_mask, pos, W)
        seen = min(pos, W - 1)  # cached positions pos-seen .. pos-1 are within the first new token's window
        if seen == 0:  # a prompt at position 0: nothing cached to put in front
            k, v = k_BKTD, v_BKTD
        else:
            old = torch.arange(pos - seen, pos, device=k_buf.device) % W
            k = torch.cat([k_buf.index_select(2, old), k_BKTD], dim=2)  # B K seen+T Dh, in position order
            v = torch.cat([v_buf.index_select(2, old), v_BKTD], dim=2)
        keep = min(T, W)
        slots = torch.arange(pos + T - keep, pos + T, device=k_buf.device) % W
        k_buf.index_copy_(2, slots, k_BKTD[:, :, T - keep :])
        v_buf.index_copy_(2, slots, v_BKTD[:, :, T - keep :])
        return k, v, None if attn_mask is None else attn_mask[..., -(seen + T) :]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0


def ring_mask(attn_mask: torch.Tensor | None, pos: int, W: int) -> torch.Tensor | None:
    """The mask (..., pos + 1) of one query at ``pos`` over positions 0..pos, moved to the ring
    slots (..., min(pos + 1, W)) of a window W: positions pos-W+1+i sit in slots (pos+1+i) % W."""
    if attn_mask is None or pos < W:
        return attn_mask
    return attn_mask[..., -W:].roll((pos + 1) % W, dims=-1)
