"""A decoder-only Transformer, Llama-style: RoPE, RMSNorm, grouped-query attention, SwiGLU MLPs
(``mlp.py``), optional Mixture-of-Experts layers (``moe.py``). With the default config it computes
exactly what transformers' LlamaForCausalLM computes (MixtralForCausalLM with experts); see
``interop/hf.py``.

Shape legend (used in names and comments):
    B batch, T new tokens in this call, S tokens attended to (cache + new), D d_model,
    H query heads, K key/value heads, Dh head dim, V vocab size, F MLP hidden size.

Data flow of one forward pass::

    ids_BT -> embed -> [ Block ] x n_layer -> norm -> lm_head -> logits_BTV
    Block:  x = x + Attention(norm(x));  x = x + MLP(norm(x))     (MLP or MoE)

Inference state (the KV cache) lives in a :class:`~text2llm.model.cache.KVCache` object that the
caller creates and passes to ``forward``; layers never allocate or keep caches themselves.

Attention masks: without ``attn_mask`` attention is causal. An ``attn_mask`` *replaces* the causal
mask: bool, True = may attend, broadcastable to (B, 1, T, S) (a float mask is added to the scores).
Build one with :func:`causal_mask` (padding, e.g. left-padded batched generation; HF's
``attention_mask`` of 1 = token, 0 = pad is its ``key_padding_BS``) or :func:`document_mask`
(several documents in one row that must not see each other).

Sparse attention: with ``model.attention_window`` the layers that ``model.window_pattern`` marks S
attend only to the last ``window`` tokens (the band is combined with any ``attn_mask``), computed
by blocks (``attention.py``), and keep only those tokens in the KV cache (a ring buffer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from text2llm.model.attention import windowed_attention
from text2llm.model.cache import KVCache
from text2llm.model.config import ModelConfig
from text2llm.model.mlp import MLP
from text2llm.model.moe import MoE


@dataclass
class ModelOutput:
    """What ``Transformer.forward`` returns. ``logits`` is (B, T, V)."""

    logits: torch.Tensor
    aux_loss: torch.Tensor | None = None  # MoE load-balancing + z-loss, already weighted (None if dense)
    expert_load: torch.Tensor | None = None  # int64 (n_moe_layers, n_experts): assignments per expert; rows sum to B*T*top_k
    expert_dropped: torch.Tensor | None = None  # int64 (n_moe_layers, n_experts): of those, dropped by the capacity limit


# ---- building blocks ------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight  (Zhang & Sennrich 2019); no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm == x * rsqrt(mean(x^2) + eps) * weight, in one fused kernel instead of one per op
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, max_len: int, theta: float, start: int = 0,
                device: torch.device | str | None = None, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len - start, Dh) of positions start..max_len-1 for rotary embeddings
    (Su et al. 2021). Each frequency appears twice, once for the first half of the head dim and once
    for the second (the Llama / HF layout). ``exact``: angles in float64, then rounded, for the rows
    past the model's table (a windowed model decoding beyond max_seq_len): a float32 angle
    position x frequency loses precision as the position grows (its spacing at 10^6 is 0.06 rad)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    dtype = torch.float64 if exact else torch.float32
    angles = torch.outer(torch.arange(start, max_len, dtype=dtype, device=device), inv_freq.to(dtype))
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head dim by their position's angles:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written as x * cos + rotate_half(x) * sin."""
    x1, x2 = x_BHTD.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    if cos_TD.dtype != x_BHTD.dtype:
        cos_TD, sin_TD = cos_TD.to(x_BHTD.dtype), sin_TD.to(x_BHTD.dtype)
    return x_BHTD * cos_TD + rotated * sin_TD


def causal_mask(T: int, start: int = 0, key_padding_BS: torch.Tensor | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Bool mask (T, S) or (B, 1, T, S), True = may attend, for T queries at ``start..start+T-1``
    over S = start+T keys. ``key_padding_BS`` (B, S; True/1 = real token, False/0 = padding) also
    hides padded keys; a padded query still sees itself, so its (unused) row never becomes NaN."""
    if key_padding_BS is not None:
        device = key_padding_BS.device
    S = start + T
    q_pos_T1 = torch.arange(start, S, device=device)[:, None]
    mask_TS = torch.arange(S, device=device)[None, :] <= q_pos_T1
    if key_padding_BS is None:
        return mask_TS
    keep_BS = key_padding_BS.bool()
    mask_BTS = mask_TS[None] & keep_BS[:, None, :]
    mask_BTS |= torch.arange(S, device=device)[None, None, :] == q_pos_T1[None]  # the diagonal
    return mask_BTS[:, None]  # B 1 T S


def document_mask(doc_ids_BT: torch.Tensor) -> torch.Tensor:
    """Bool (B, 1, T, T): causal, and a token attends only within its own document.
    ``doc_ids_BT`` numbers the documents of each row, e.g. ``cumsum(ids == bos)``."""
    T = doc_ids_BT.size(1)
    same_BTT = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    return (same_BTT & causal_mask(T, device=doc_ids_BT.device))[:, None]


def attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=None, dropout_p: float = 0.0, window: int = 0) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh) + mask) v, by PyTorch's fused kernel
    (``F.scaled_dot_product_attention``). Without a mask: causal when T > 1 (a whole sequence),
    none when T == 1 (one new token sees every cached key). ``window`` > 0: a sliding window
    (:mod:`text2llm.model.attention`, computed sparsely) wherever it cuts keys off, S > window
    (and always when S is symbolic, in a graph that serves every length); otherwise it changes nothing."""
    T, S = q_BHTD.size(2), k_BHSD.size(2)
    if window and (isinstance(S, torch.SymInt) or S > window):
        return windowed_attention(q_BHTD, k_BHSD, v_BHSD, window, attn_mask, dropout_p)
    return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=attn_mask,
                                          is_causal=attn_mask is None and T > 1, dropout_p=dropout_p)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads and an optional KV cache:
    x_BTD -> q (B, H, T, Dh), k and v (B, K, T, Dh) -> RoPE on q, k -> attention -> o_proj.
    ``window`` > 0 (``cfg.layer_window``): each token sees only itself and the window-1 before it."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.window = cfg.layer_window(layer_idx)
        if cfg.qk_norm:  # per head: normalises over Dh, one gain vector shared by all heads (Qwen3's q_norm / k_norm)
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x_BTD, rope, cache: KVCache | None, attn_mask):
        B, T, _ = x_BTD.shape
        Dh = self.head_dim  # (views by -1: under tensor parallelism a process holds H/tp and K/tp heads)
        q = self.q_proj(x_BTD).view(B, T, -1, Dh).transpose(1, 2)  # B H T Dh
        k = self.k_proj(x_BTD).view(B, T, -1, Dh).transpose(1, 2)  # B K T Dh
        v = self.v_proj(x_BTD).view(B, T, -1, Dh).transpose(1, 2)  # B K T Dh
        if hasattr(self, "q_norm"):  # model.qk_norm: before RoPE, as Qwen3
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.o_proj(self.attend(q, k, v, cache, attn_mask))

    def attend(self, q_BHTD, k_BKTD, v_BKTD, cache: KVCache | None, attn_mask) -> torch.Tensor:
        """The heads' attention, from rotated q/k and v to the merged heads (B, T, H Dh): stores the
        new keys/values in the cache and attends over all of them."""
        B, H, T, Dh = q_BHTD.shape
        K = k_BKTD.size(1)  # (the KV heads of this rank's slice under tensor parallelism)
        k, v = k_BKTD, v_BKTD
        if cache is not None:  # (a windowed layer's ring buffer also cuts the mask to the keys it returns)
            k, v, attn_mask = cache.update(self.layer_idx, k_BKTD, v_BKTD, attn_mask)  # B K S Dh
        if K != H:  # GQA: each K/V head serves n_head/n_kv query heads
            k = k.repeat_interleave(H // K, dim=1)  # B H S Dh
            v = v.repeat_interleave(H // K, dim=1)
        y = attention(q_BHTD, k, v, attn_mask, self.dropout if self.training else 0.0, self.window)  # B H T Dh
        return y.transpose(1, 2).reshape(B, T, H * Dh)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).
    ``mlp`` is an :class:`~text2llm.model.mlp.MLP`, or a :class:`~text2llm.model.moe.MoE` in MoE layers; then
    ``forward`` also returns the router's :class:`~text2llm.model.moe.RouterStats`."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = make_norm(cfg)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD, rope, cache, attn_mask):
        drop = self.drop if self.training else (lambda y: y)  # (skip the no-op call when decoding)
        x_BTD = x_BTD + drop(self.attn(self.attn_norm(x_BTD), rope, cache, attn_mask))
        if not self.is_moe:
            return x_BTD + drop(self.mlp(self.mlp_norm(x_BTD))), None
        y_BTD, stats = self.mlp(self.mlp_norm(x_BTD))
        return x_BTD + drop(y_BTD), stats


# ---- the model --------------------------------------------------------------------------------


class Transformer(nn.Module):
    """Decoder-only language model. ``forward(ids_BT) -> ModelOutput(logits_BTV)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if cfg.positions == "rope":
            cos, sin = self.rope_buffers()
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def rope_buffers(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE (cos, sin) tables for positions 0..max_seq_len-1 (computed, never saved: a
        model built on the meta device gets them from here once its weights are materialised)."""
        return rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device=device)

    def init_weights(self) -> None:
        """All initialisation in one place (GPT-2 / nanoGPT scheme, "scaled residual init"):

        | tensor                                          | init                                  |
        |-------------------------------------------------|---------------------------------------|
        | token / position embeddings, q/k/v, MLP in      | normal(0, init_std)                   |
        | residual outputs (attn o_proj, MLP down_proj,   | normal(0, init_std / sqrt(2 n_layer)) |
        |   every expert's down_proj)                     |   (zeros with zero_init_output)       |
        | MoE router                                      | normal(0, init_std)                   |
        | lm_head (when untied)                           | normal(0, init_std)                   |
        | biases                                          | zeros                                 |
        | norm weights (and LayerNorm biases)             | ones (zeros)                          |

        Each block adds two branches to the residual stream; scaling their output projections by
        1/sqrt(2 n_layer) keeps the stream's variance roughly constant with depth.
        """
        for name, p in self.named_parameters():
            self.init_param(name, p)

    @torch.no_grad()
    def init_param(self, name: str, t: torch.Tensor) -> None:
        """Fill ``t`` in place as parameter ``name`` is initialised (the table of :meth:`init_weights`,
        drawing from the global RNG). ``t`` may be the parameter, or a full-size tensor standing in
        for one that is sharded across processes (:func:`text2llm.train.distributed.materialize`)."""
        std, resid_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)
        if name.endswith("bias"):
            nn.init.zeros_(t)
        elif "norm" in name:
            nn.init.ones_(t)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            if self.cfg.zero_init_output:
                nn.init.zeros_(t)
            else:
                nn.init.normal_(t, 0.0, resid_std)
        elif t.dim() >= 2:
            nn.init.normal_(t, 0.0, std)

    def embed_positions(self, input_ids: torch.Tensor, start: int):
        """Token embeddings of ``input_ids`` (B, T) sitting at positions start..start+T-1, and the
        RoPE (cos, sin) rows for those positions (None with learned positions, which are added here)."""
        T = input_ids.shape[1]
        x = self.embed(input_ids)  # B T D
        if self.cfg.positions == "rope":
            n = self.rope_cos.size(0)
            if start + T > n:  # past max_seq_len (every layer windowed): the rows past the table, computed here
                cos, sin = rope_tables(self.cfg.head_dim, start + T, self.cfg.rope_theta, max(start, n), x.device, True)
                return x, (torch.cat([self.rope_cos[start:], cos]), torch.cat([self.rope_sin[start:], sin]))
            return x, (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        return x + self.pos_embed(torch.arange(start, start + T, device=input_ids.device)), None

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None, last_only: bool = False) -> ModelOutput:
        """Logits for every position of ``input_ids`` (B, T).

        With a ``cache``, ``input_ids`` are the *new* tokens; they sit at positions
        ``cache.pos ... cache.pos+T-1`` and attend to everything cached before them.
        ``attn_mask`` (optional, bool, broadcastable to (B, 1, T, S), True = may attend) replaces
        the causal mask, e.g. :func:`causal_mask` with padding or :func:`document_mask`.
        MoE models also return the (weighted) router losses and per-expert load counts.
        ``last_only``: logits of the last position only, (B, 1, V): what generation needs; it skips
        the head's matmul for the other T-1 positions of a prompt.
        """
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len and not self.cfg.unbounded_context:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len {self.cfg.max_seq_len}"
                             + self.context_note())
        x, rope = self.embed_positions(input_ids, start)
        x = self.drop(x)
        if cache is not None and start > 0 and T > 1 and attn_mask is None:
            attn_mask = causal_mask(T, start, device=input_ids.device)  # a chunk after a cached prefix
        stats = []
        for block in self.blocks:
            x, s = block(x, rope, cache, attn_mask)
            if s is not None:
                stats.append(s)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        logits = self.unembed(self.norm(x))  # B T V (B 1 V with last_only)
        if not stats:
            return ModelOutput(logits=logits)
        return ModelOutput(
            logits=logits,
            aux_loss=torch.stack([s.aux_loss for s in stats]).sum(),
            expert_load=torch.stack([s.load_E for s in stats]),
            expert_dropped=torch.stack([s.dropped_E for s in stats]),
        )

    def unembed(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Final hidden states -> logits (B, T, V): the ``lm_head`` projection (tied to the token
        embedding when ``cfg.tie_embeddings``), soft-capped to (-cap, cap) by cap * tanh(logits / cap)
        with ``cfg.logit_softcap``. A method of its own so that a subclass can change how the head is
        computed without repeating ``forward``."""
        return self.softcap(self.lm_head(x_BTD))

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """``cfg.logit_softcap`` applied to head outputs (unchanged when 0): every path that computes
        the head itself (packed, ONNX, pipeline stages, the fast decode step) calls this."""
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def decode_step(self, ids_B1: torch.Tensor, pos: int, cache: KVCache,
                    attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) of one new token per row at position ``pos``: ``forward`` with the cache
        position as an *argument*, the function that ``torch.compile(..., dynamic=True)`` compiles
        for decoding. As an argument, ``pos`` becomes a symbolic size in the compiled program (the
        cache's filled length, ``pos + 1``), so one program serves every step, every batch size
        and every cache length; read from ``cache.pos`` inside, it would be a constant and every
        step would compile anew. ``attn_mask``: as in ``forward`` (B, 1, 1, pos + 1), or None.
        Advances ``cache.pos`` to ``pos + 1``.
        """
        cache.pos = pos
        return self.forward(ids_B1, cache=cache, attn_mask=attn_mask, last_only=True).logits[:, 0]

    # ---- helpers --------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False, active_only: bool = False) -> int:
        """Unique parameters (a tied head counts once); optionally without the embeddings.
        ``active_only``: count only the ``moe_top_k`` experts a token uses in each MoE layer."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
            if self.cfg.positions == "learned":
                n -= self.pos_embed.weight.numel()
        if active_only and self.cfg.n_experts:
            per_expert = sum(p.numel() for p in self.blocks[self.cfg.moe_layers[0]].mlp.experts[0].parameters())
            n -= len(self.cfg.moe_layers) * (self.cfg.n_experts - self.cfg.moe_top_k) * per_expert
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B style:
        6 * (active matmul parameters) + 12 * n_layer * d_model * seq_len for attention scores/values
        (a windowed layer counts its window instead of seq_len, when shorter).
        For MoE only the top-k experts (and the router) a token passes through count."""
        cfg = self.cfg
        matmul_params = self.num_params(non_embedding=True, active_only=True)  # includes an untied lm_head
        if cfg.tie_embeddings:
            matmul_params += cfg.vocab_size * cfg.d_model  # the tied head is still a matmul
        keys = sum(min(seq_len, cfg.layer_window(i) or seq_len) for i in range(cfg.n_layer))  # a window caps the keys
        return 6.0 * matmul_params + 12.0 * cfg.d_model * keys

    def context_note(self) -> str:
        """Why a windowed model cannot run past ``max_seq_len`` (for error messages); "" for a dense one.
        (An all-windowed RoPE model can: ``cfg.unbounded_context``.)"""
        cfg = self.cfg
        if cfg.attention_window and cfg.positions == "learned":
            return " (learned positions have no embedding past it, window or not)"
        if cfg.attention_window:
            return f" (window_pattern {cfg.window_pattern!r} has full layers, which would see unseen distances)"
        return ""
