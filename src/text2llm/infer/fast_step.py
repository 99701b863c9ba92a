"""The eager decode step, written for speed: one new token per row through the model, the same
arithmetic as ``Transformer.forward``, in far fewer PyTorch calls.

Why it pays: a small model decoding one token at a time on a CPU spends most of each step not on
arithmetic but on *calling* PyTorch. Every op costs microseconds of dispatch whatever its size,
every ``nn.Module`` call more, and ``forward`` for one token goes through the embedding, per block
two norms, the attention and MLP modules, RoPE's chunk/cat/mul, the cache's bookkeeping and the
residual adds. :class:`FastDecodeStep` collects, once per generation, each layer's tensors and
packed matmuls (those of :func:`~text2llm.infer.packing.pack_weights`: no extra copy of the
weights) into a flat list, and runs the step as one loop::

    x = embed[ids]                                  (+ pos_embed[pos] with learned positions)
    per layer:
        h = norm(x)                                 RMSNorm as x * rsqrt(|x|^2 / D + eps) * g
        qkv = h W_qkv                               one matmul for q, k and v
        q, k = rope(q, k)                           on views of qkv, q and k heads together
        cache.k[pos], cache.v[pos] = k, v           written in place, no concatenation (a windowed
                                                    layer's ring buffer: at slot pos % window)
        y = attention(q, cache.k[:pos+1], ...)      GQA: each K/V head's query heads are its queries
                                                    (a windowed layer: its last window keys only)
        x = x + y W_o                               the residual add fused into the matmul (addmm)
        h = norm(x)
        x = x + (silu(h W_gate) * h W_up) W_down    gate and up in one matmul; addmm again
    logits = norm(x) W_head

Two tricks beyond packing. The RMS factor comes from ``linalg.vector_norm``: one reduction kernel
and one op fewer than ``x.pow(2).mean(-1)``; for one short row the whole norm was cheaper this way
than through ``F.rms_norm`` or ``pow``/``mean`` (a one-off timing on the CPU). Grouped-query
attention needs no repeated keys and values: with one new token, the G query heads that share a
K/V head can be handed to the attention kernel as G *query positions* of that head (no causal mask
is needed, since each of them sees every cached key), so q is viewed as (B, K, G, Dh) against the
cache's (B, K, S, Dh).

Measured (``benchmarks/generate.py``, case ``step``; 2-core CPU): see the README's generate table.

An int8 model's packed matmuls (the native kernel, :mod:`text2llm.compress.native`) take the
RMSNorm in front of them as well (``with_rmsnorm``): the kernel reads each row once to quantize
it, and applies the norm on the way, so the step calls no norm at all (9 fewer times 5 ops for the
demo model).

It serves dense models whose Linears have a packer (float and int8): models with MoE layers, and
FSDP-sharded ones, decode through ``forward``. Prefill (many tokens) always runs ``forward``.
The logits equal ``forward``'s to float rounding (``tests/test_generate.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from text2llm.infer.packing import PackedAttention, PackedMLP, PackedTransformer, drop_stale, packed_matmul
from text2llm.model.mlp import MLP
from text2llm.model.cache import KVCache, ring_mask
from text2llm.model.transformer import RMSNorm, rope_tables


def _norm(m: nn.Module):
    """``m(x)`` for (B, D) rows, in as few calls as possible."""
    if isinstance(m, RMSNorm):
        eps, g = torch.tensor(m.eps, dtype=m.weight.dtype, device=m.weight.device), m.weight.detach()
        inv_d = 1.0 / g.numel()

        def rms(x):  # x * rsqrt(mean(x^2) + eps) * g, with mean(x^2) = |x|^2 / D
            n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            return torch.mul(x, torch.addcmul(eps, n, n, value=inv_d).rsqrt_()).mul_(g)

        return rms
    if isinstance(m, nn.LayerNorm):
        w = None if m.weight is None else m.weight.detach()
        b = None if m.bias is None else m.bias.detach()
        return lambda x: F.layer_norm(x, m.normalized_shape, w, b, m.eps)
    return None


def _normed(norm_module: nn.Module, matmul):
    """``(norm, matmul)`` for ``matmul(norm(x))``, or None for a norm the step does not cover: where
    the matmul can apply an RMSNorm itself as it reads its input (the native int8 kernel,
    ``with_rmsnorm``), the norm moves into it and ``norm`` becomes None (no call)."""
    fuse = getattr(matmul, "with_rmsnorm", None)
    if fuse is not None and isinstance(norm_module, RMSNorm):
        return None, fuse(norm_module.weight, norm_module.eps)
    norm = _norm(norm_module)
    return None if norm is None else (norm, matmul)


def _mlp_in(mlp: MLP, gate_up=None):
    """``h -> silu(h W_gate) * h W_up`` (gate and up one packed matmul, or ``gate_up`` when given),
    or ``gelu(h W_up)``: the MLP up to its down projection."""
    if mlp.swiglu:
        gate_up = gate_up if gate_up is not None else packed_matmul(mlp, ("gate_proj", "up_proj"))

        def swiglu(h):
            gate, up = gate_up(h).chunk(2, dim=-1)
            return F.silu(gate).mul_(up)

        return swiglu
    up = gate_up if gate_up is not None else packed_matmul(mlp, ("up_proj",))
    if mlp.activation == "relu2":
        return lambda h: F.relu(up(h)).square()
    return lambda h: F.gelu(up(h), approximate="tanh")


def _add_to(matmul):
    """``(r, x) -> r + matmul(x)``: one ``addmm`` where the packer offers it."""
    add = getattr(matmul, "add_to", None)
    return add if add is not None else (lambda r, x: matmul(x).add_(r))


class FastDecodeStep:
    """``step(ids_B, pos, cache, attn_mask=None) -> logits (B, V)``: the decode step of ``model``
    for one new token per row at position ``pos``, writing its keys and values into ``cache``
    (a :class:`~text2llm.model.cache.KVCache`) and advancing ``cache.pos``.

    Build it with :meth:`build` after ``pack_weights(model)``, and again whenever the weights
    may have changed (the engines build it at every prefill); ``build`` returns None for a model it
    does not cover.
    """

    def __init__(self, model, layers: list, final_norm, head):
        self.layers, self.final_norm, self.head = layers, final_norm, head
        cfg = model.cfg
        self.H, self.K, self.Dh, self.max_seq_len = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.max_seq_len
        self.windows = [cfg.layer_window(i) for i in range(cfg.n_layer)]  # 0 = a full layer
        self.window = cfg.attention_window  # every windowed layer's (one size for all)
        self.first_windowed = next((i for i, w in enumerate(self.windows) if w), None)
        self.unbounded, self.rope_theta = cfg.unbounded_context, cfg.rope_theta
        self.embed = model.embed.weight.detach()
        self.pos_embed = model.pos_embed.weight.detach() if cfg.positions == "learned" else None
        if cfg.positions == "rope":
            self.cos, self.sin = model.rope_cos.to(self.embed.dtype), model.rope_sin.to(self.embed.dtype)

    @classmethod
    def build(cls, model) -> "FastDecodeStep | None":
        if not (isinstance(model, PackedTransformer) and model.packed_head) or model.cfg.qk_norm:
            return None  # (model.qk_norm: decoded through forward)
        drop_stale(model)  # first: drop packed stacks built from weights changed since
        layers = []
        for block in model.blocks:
            attn, mlp = block.attn, block.mlp
            if not (isinstance(attn, PackedAttention) and isinstance(mlp, PackedMLP)):
                return None  # an MoE layer, or Linears without a packer
            first = _normed(block.attn_norm, packed_matmul(attn, ("q_proj", "k_proj", "v_proj")))
            second = _normed(block.mlp_norm, packed_matmul(mlp, ("gate_proj", "up_proj") if mlp.swiglu else ("up_proj",)))
            if first is None or second is None:
                return None
            (norm1, qkv), (norm2, up) = first, second
            layers.append((norm1, qkv, _add_to(packed_matmul(attn, ("o_proj",))), norm2, _mlp_in(mlp, up),
                           _add_to(packed_matmul(mlp, ("down_proj",)))))
        last = _normed(model.norm, packed_matmul(model, ("lm_head",)))
        if last is not None and model.cfg.logit_softcap:
            head = last[1]
            last = (last[0], lambda x: model.softcap(head(x)))
        return None if last is None else cls(model, layers, *last)

    def __call__(self, ids_B: torch.Tensor, pos: int, cache: KVCache,
                 attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        H, K, Dh = self.H, self.K, self.Dh
        B, S = ids_B.size(0), pos + 1
        if (S > self.max_seq_len and not self.unbounded) or (S > cache.max_len and not all(cache.ring)):
            raise ValueError(f"KV cache full: {pos} + 1 tokens > max_len {min(cache.max_len, self.max_seq_len)}")
        x = F.embedding(ids_B, self.embed)  # B D
        if self.pos_embed is not None:
            x = x + self.pos_embed[pos]
        elif pos < self.cos.size(0):
            cos, sin, half = self.cos[pos], self.sin[pos], Dh // 2
        else:  # past max_seq_len (every layer windowed): this position's row
            cos, sin = (t[0].to(self.embed.dtype) for t in rope_tables(Dh, S, self.rope_theta, pos, x.device, True))
            half = Dh // 2
        HK = (H + K) * Dh
        # where each layer writes and what it attends to (write at slot; attend to n keys from
        # first), decided once per step: every full layer alike, every windowed layer alike
        full = windowed = (pos, 0, S, attn_mask)
        if self.first_windowed is not None:
            ring, W = cache.ring[self.first_windowed], self.window
            if ring:  # every filled slot is within the window (see KVCache)
                windowed = (pos % ring, 0, min(S, ring), ring_mask(attn_mask, pos, ring))
            elif S > W:  # a full buffer: the window's keys are its last ones
                windowed = (pos, S - W, W, None if attn_mask is None else attn_mask[..., S - W:])
        for i, (norm1, qkv_mm, o_add, norm2, mlp_in, down_add) in enumerate(self.layers):
            qkv = qkv_mm(x if norm1 is None else norm1(x))  # B (H+2K)*Dh  (norm None: the matmul applies it)
            qk = qkv[:, :HK].view(B, H + K, Dh)
            if self.pos_embed is None:  # RoPE: qk * cos + rotate_half(qk) * sin
                rotated = torch.cat([qk[..., half:].neg(), qk[..., :half]], dim=-1)
                qk = torch.addcmul(qk * cos, rotated, sin)
            k_cache, v_cache = cache.k[i], cache.v[i]  # B K max_len Dh (a ring layer: B K window Dh)
            slot, first, n, mask = windowed if self.windows[i] else full
            k_cache.select(2, slot).copy_(qk[:, H:])
            v_cache.select(2, slot).copy_(qkv[:, HK:].view(B, K, Dh))
            q = qk[:, :H].reshape(B, K, H // K, Dh)  # the query heads of each K/V head as its queries
            y = F.scaled_dot_product_attention(q, k_cache.narrow(2, first, n), v_cache.narrow(2, first, n),
                                               attn_mask=mask)
            x = o_add(x, y.reshape(B, H * Dh))
            x = down_add(x, mlp_in(x if norm2 is None else norm2(x)))
        cache.pos = S
        return self.head(x if self.final_norm is None else self.final_norm(x))
