"""Sliding-window (banded) causal attention, computed sparsely: work grows with T x window, not T^2.

A query at position q sees the keys at positions k with ``q - window < k <= q``: itself and the
``window - 1`` tokens before it (what transformers' Mistral calls ``sliding_window``). Stacked
layers widen what a token can reach: after n windowed layers, information has travelled up to
n x (window - 1) positions (GPT-3's "locally banded" layers; Mistral; Gemma's local layers).

Shape legend as in ``transformer.py`` (B, H, T, S, Dh), plus n blocks of W = window queries, each
seeing L = 2W keys.

Three ways to compute the same thing (:func:`pick_path` chooses; ``docs/attention.md`` has the
measurements behind the rule):

    dense   SDPA over every key with the band as a bool mask: T x S work. The reference, and the
            choice for short sequences and for a few queries after a cached prefix (decoding).
    blocks  queries in blocks of W attend to their own block and the previous one (2W keys) through
            SDPA with a small (W, 2W) band mask per block: T x 2W work. The CPU path.
    flex    FlexAttention with a block mask (CUDA only, when ``torch.compile`` works there): skips
            the key blocks outside the band inside the kernel.

Keys are the S positions ending at the last query (T <= S: a prefix may sit in a KV cache).
``attn_mask`` (optional, broadcastable to (B, H, T, S), True = may attend; a float mask is added)
is combined with the band, e.g. a document mask (which is causal itself) or left padding.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# where the blocks beat the band-masked dense SDPA on the CPU: T >= 3 windows and T >= 512
# (benchmarks/attention.py --cases paths; docs/attention.md has the table)
BLOCKS_MIN_WINDOWS = 3
BLOCKS_MIN_T = 512


def band_mask(T: int, S: int, window: int, device=None) -> torch.Tensor:
    """Bool (T, S), True = may attend: causal and within the window, for T queries that are the last
    T of S positions."""
    q_T1 = torch.arange(S - T, S, device=device)[:, None]
    k_1S = torch.arange(S, device=device)[None, :]
    return (k_1S <= q_T1) & (k_1S > q_T1 - window)


def pick_path(T: int, S: int, window: int, device: torch.device, dropout_p: float = 0.0) -> str:
    """"dense", "blocks" or "flex" for T queries over S keys (see the module docstring)."""
    if T != S or window >= T:
        return "dense"
    if device.type == "cuda" and not dropout_p and flex_available():  # (FlexAttention has no dropout)
        return "flex"
    return "blocks" if T >= BLOCKS_MIN_WINDOWS * window and T >= BLOCKS_MIN_T else "dense"


def windowed_attention(q_BHTD, k_BHSD, v_BHSD, window: int, attn_mask=None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh) + band + mask) v -> (B, H, T, Dh), by the path :func:`pick_path` picks."""
    T, S = q_BHTD.size(2), k_BHSD.size(2)
    float_mask = attn_mask is not None and attn_mask.dtype != torch.bool
    symbolic = isinstance(T, torch.SymInt) or isinstance(S, torch.SymInt)  # a graph for every length: no branches
    path = "dense" if float_mask or symbolic else pick_path(T, S, window, q_BHTD.device, dropout_p)
    if path == "flex":
        return flex_band_attention(q_BHTD, k_BHSD, v_BHSD, window, attn_mask)
    if path == "blocks":
        return block_attention(q_BHTD, k_BHSD, v_BHSD, window, attn_mask, dropout_p)
    return dense_band_attention(q_BHTD, k_BHSD, v_BHSD, window, attn_mask, dropout_p)


def dense_band_attention(q_BHTD, k_BHSD, v_BHSD, window: int, attn_mask=None, dropout_p: float = 0.0):
    """One SDPA over all S keys with the band (and ``attn_mask``) as its mask: T x S work."""
    band_TS = band_mask(q_BHTD.size(2), k_BHSD.size(2), window, q_BHTD.device)
    if attn_mask is None:
        mask = band_TS
    elif attn_mask.dtype == torch.bool:
        mask = attn_mask & band_TS
    else:
        mask = attn_mask.masked_fill(~band_TS, float("-inf"))
    return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=mask, dropout_p=dropout_p)


def block_attention(q_BHTD, k_BHTD, v_BHTD, window: int, attn_mask=None, dropout_p: float = 0.0):
    """The band by blocks of W = window queries: block i (positions iW .. iW+W-1) attends to keys
    (i-1)W .. iW+W-1, its own block and the one before, which hold every key its queries may see.
    One SDPA call over the n blocks as a batch, with a (W, 2W) band mask per block: the query at
    row r of a block sees key j of its 2W iff r < j <= r + W. T is padded up to n W (the padded
    queries' rows are dropped); block 0's previous block is padding, which its mask hides.
    ``attn_mask``: bool, broadcastable to (B, H, T, T), e.g. a document mask.

    Layout: without a mask of its own per row, the SDPA batch is (B H) and its "heads" are the n
    blocks, so one (n, W, 2W) mask serves every row and head. With one (a document mask), the
    batch is (B n) and the heads are the heads: each (W, 2W) block of the mask then serves all H
    heads, instead of being copied H times."""
    B, H, T, Dh = q_BHTD.shape
    W = window
    n = -(-T // W)
    pad = n * W - T
    r_W1 = torch.arange(W, device=q_BHTD.device)[:, None]
    j_12W = torch.arange(2 * W, device=q_BHTD.device)[None, :]
    band_nWL = ((j_12W > r_W1) & (j_12W <= r_W1 + W)).expand(n, W, 2 * W).clone()
    band_nWL[0, :, :W] = False  # block 0: nothing before it
    m = None if attn_mask is None else attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    per_row = m is not None and m.size(0) > 1 and m.size(1) == 1  # B' H' T T
    q = F.pad(q_BHTD, (0, 0, 0, pad)).view(B, H, n, W, Dh)
    k, v = (_key_blocks(t, W, pad) for t in (k_BHTD, v_BHTD))  # B H n 2W Dh
    if per_row:
        q, k, v = (t.transpose(1, 2).reshape(B * n, H, -1, Dh) for t in (q, k, v))  # (B n) H W|2W Dh
        mask = (_mask_blocks(m[:, 0], W, n) & band_nWL).reshape(B * n, 1, W, 2 * W)
    else:
        q, k, v = (t.reshape(B * H, n, -1, Dh) for t in (q, k, v))  # (B H) n W|2W Dh
        mask = band_nWL[None]  # 1 n W 2W
        if m is not None:
            mask = _mask_blocks(m, W, n) & band_nWL  # B' H' n W 2W
            mask = mask[0] if mask.shape[:2] == (1, 1) else mask.expand(B, H, n, W, 2 * W).reshape(B * H, n, W, 2 * W)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if per_row:
        y = y.view(B, n, H, W, Dh).transpose(1, 2)
    return y.reshape(B, H, n * W, Dh)[:, :, :T]


def _key_blocks(x_BHTD: torch.Tensor, W: int, pad: int) -> torch.Tensor:
    """(B, H, T, Dh) -> (B, H, n, 2W, Dh): for each block of W positions, the W before it and its own."""
    B, H, _, Dh = x_BHTD.shape
    x = F.pad(x_BHTD, (0, 0, W, pad)).view(B, H, -1, W, Dh)  # B H n+1 W Dh: a zero block in front
    return torch.cat([x[:, :, :-1], x[:, :, 1:]], dim=3)


def _mask_blocks(m_BHTT: torch.Tensor, W: int, n: int) -> torch.Tensor:
    """(..., T, T) -> (..., n, W, 2W) with [i, r, j] = m[iW + r, (i-1)W + j] (True outside: the band
    mask covers those). A strided view of the padded mask: the diagonal of its column windows."""
    T = m_BHTT.size(-1)
    pad = n * W - T
    m = F.pad(m_BHTT, (W, pad, 0, pad), value=True)  # ... nW (n+1)W
    windows = m.unfold(-1, 2 * W, W)  # ... nW n 2W: column window c = columns cW .. cW+2W-1
    windows = windows.reshape(*m.shape[:-2], n, W, n, 2 * W)
    return torch.diagonal(windows, dim1=-4, dim2=-2).movedim(-1, -3)  # row block i with window i


# ---- FlexAttention (CUDA) ------------------------------------------------------------------------


@functools.cache
def _compiled_flex():
    """``torch.compile(flex_attention)``, or None where it cannot compile (then the blocks path runs).
    Only asked on CUDA; compiled once per process."""
    if not torch.cuda.is_available():
        return None
    try:
        fn = torch.compile(flex_attention, dynamic=False)
        q = torch.randn(1, 1, 256, 64, device="cuda")
        fn(q, q, q, block_mask=create_block_mask(_band_mod(128), None, None, 256, 256, device="cuda"))
        return fn
    except Exception:  # noqa: BLE001 - any compile failure means: use the other path
        return None


def flex_available() -> bool:
    """Whether the flex path can run here (CUDA, and FlexAttention compiles)."""
    return _compiled_flex() is not None


def _band_mod(window: int):
    def band(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

    return band


def flex_band_attention(q_BHTD, k_BHTD, v_BHTD, window: int, attn_mask=None) -> torch.Tensor:
    """FlexAttention over the band (and a bool ``attn_mask`` of (B', 1, T, T)): only the key blocks
    that the band touches are computed."""
    B, H, T, _ = q_BHTD.shape
    if attn_mask is None:
        block_mask = _band_block_mask(T, window, str(q_BHTD.device))
    else:
        band = _band_mod(window)
        m = attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        mb = B if m.size(0) > 1 else None

        def mask_mod(b, h, q_idx, kv_idx):
            return band(b, h, q_idx, kv_idx) & m[b if mb else 0, 0, q_idx, kv_idx]

        block_mask = create_block_mask(mask_mod, mb, None, T, T, device=q_BHTD.device)
    return _compiled_flex()(q_BHTD, k_BHTD, v_BHTD, block_mask=block_mask)


@functools.lru_cache(maxsize=16)
def _band_block_mask(T: int, window: int, device: str):
    """The band's block mask, built once per (length, window): the same for every batch and head."""
    return create_block_mask(_band_mod(window), None, None, T, T, device=device)
