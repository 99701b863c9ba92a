"""Packed weights for inference: the Linear layers that read the same input run as one matmul.

Decoding one token at a time is dominated by the cost of each call, not by arithmetic, so under
``torch.no_grad`` a packed model stacks the q/k/v weights into one matrix and the SwiGLU gate/up
weights into another (:data:`LINEAR_PACKERS` says how, per Linear class; float weights are kept
transposed), and every other Linear (o_proj, down_proj, lm_head) runs through the same path::

    pack_weights(model)              # the generation engines do this
    with torch.no_grad():
        model(ids)                   # q/k/v in one matmul, gate/up in another
    pack_weights(model, on=False)    # the plain classes again; the stacked copies are freed

The stacks are cached on the module that owns the Linears (``_packed``, not a parameter or
buffer, so ``state_dict`` and checkpoints keep the separate q/k/v names); the price is a second
copy of those weights while the cache lives.

How: :func:`pack_weights` swaps the *class* of the model's modules for a subclass defined here
(as FSDP2's ``fully_shard`` does): ``Attention`` -> :class:`PackedAttention`, ``MLP`` ->
:class:`PackedMLP` (the experts of MoE layers too), ``Transformer`` -> :class:`PackedTransformer`.
The subclasses add no parameters, so parameters, ``state_dict`` keys and checkpoints are those of
the plain model, and with grad enabled (training) each runs the plain ``forward``. A layer whose
Linears have no packer keeps its class, and its own forward. Before each forward without grad,
:class:`PackedTransformer` drops the stacks if a weight changed since they were built
(:func:`drop_stale`), so an optimizer step or ``load_state_dict`` is followed.

``text2llm.compress.quantize`` registers its int8 Linear in :data:`LINEAR_PACKERS`;
:mod:`text2llm.infer.fast_step` reuses the stacks (:func:`packed_matmul`) for its decode step.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from text2llm.model.cache import KVCache
from text2llm.model.mlp import MLP
from text2llm.model.transformer import Attention, Transformer, apply_rope


class FloatPacker:
    """How :func:`packed_linear` stacks float ``nn.Linear`` layers: one (in, sum of outs) matrix,
    transposed and contiguous, and the biases concatenated. (For one row on the CPU, with the
    weights not in cache, this layout reads the wide MLP and head matrices faster than
    ``F.linear``'s (out, in) layout, and the small ones no slower.)"""

    # while tracing, the matmul takes (..., in) as it is: an exported ONNX MatMul then needs no
    # Reshape nodes around it (packers whose kernels want (N, in) rows leave this False)
    traced_any_rank = True

    @staticmethod
    def build(linears, tracing: bool = False):
        w_IO = torch.cat([m.weight if tracing else m.weight.detach() for m in linears]).t()
        w_IO = w_IO if tracing else w_IO.contiguous()
        b = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
        if b is not None and not tracing:
            b = b.detach()
        if tracing:
            return (lambda x: torch.matmul(x, w_IO) + b) if b is not None else (lambda x: torch.matmul(x, w_IO))
        return FloatMatmul(w_IO, b)


class FloatMatmul:
    """``x_NI @ w_IO (+ b)``; ``add_to(r_NO, x_NI)`` = ``r_NO + x_NI @ w_IO (+ b)`` in one ``addmm``
    (a residual add fused into the matmul, as the fast decode step uses it)."""

    __slots__ = ("w_IO", "b")

    def __init__(self, w_IO: torch.Tensor, b: torch.Tensor | None):
        self.w_IO, self.b = w_IO, b

    def __call__(self, x_NI: torch.Tensor) -> torch.Tensor:
        return torch.mm(x_NI, self.w_IO) if self.b is None else torch.addmm(self.b, x_NI, self.w_IO)

    def add_to(self, r_NO: torch.Tensor, x_NI: torch.Tensor) -> torch.Tensor:
        y = torch.addmm(r_NO, x_NI, self.w_IO)
        return y if self.b is None else y.add_(self.b)


# Linear class -> packer (``build(linears, tracing)`` -> the matmul of (N, in) rows).
# text2llm.compress.quantize registers its int8 Linear here.
LINEAR_PACKERS: dict[type, type] = {nn.Linear: FloatPacker}

QKV = ("q_proj", "k_proj", "v_proj")
_LINEARS = (*QKV, "o_proj", "gate_proj", "up_proj", "down_proj")  # of the layers that get packed


def packed_linear(x: torch.Tensor, owner: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
    """``torch.cat([owner.<name>(x) for name in names], -1)`` in one matmul (inference only): the
    stack of :func:`packed_matmul`. Under ``torch.export`` / ``torch.compile`` the stacking is
    traced into the graph instead, and nothing is cached."""
    if torch.compiler.is_compiling():
        linears = [getattr(owner, n) for n in names]
        packer = LINEAR_PACKERS[type(linears[0])]
        matmul = packer.build(linears, tracing=True)
        if getattr(packer, "traced_any_rank", False):
            return matmul(x)
    else:
        matmul = packed_matmul(owner, names)
    y_NO = matmul(x.reshape(-1, x.size(-1)))
    return y_NO.view(*x.shape[:-1], y_NO.size(-1))


def packed_matmul(owner: nn.Module, names: tuple[str, ...]):
    """The stacked matmul of :func:`packed_linear` (a callable on (N, in) rows), built on first use
    and cached on ``owner``."""
    cache = owner.__dict__.get("_packed")
    if cache is None:
        cache = owner.__dict__["_packed"] = {}
    matmul = cache.get(names)
    if matmul is None:
        linears = [getattr(owner, n) for n in names]
        matmul = cache[names] = LINEAR_PACKERS[type(linears[0])].build(linears)
    return matmul


def packable(module: nn.Module, names: tuple[str, ...] = _LINEARS) -> bool:
    """Whether every Linear of ``module`` among ``names`` has a packer."""
    return all(type(getattr(module, n)) in LINEAR_PACKERS for n in names if hasattr(module, n))


# ---- the packed classes ---------------------------------------------------------------------------


class PackedAttention(Attention):
    """:class:`~text2llm.model.transformer.Attention` without grad: q, k and v from one matmul,
    q and k rotated together; the attention itself is the plain layer's."""

    def forward(self, x_BTD, rope, cache: KVCache | None, attn_mask):
        if torch.is_grad_enabled() or hasattr(self, "q_norm"):  # (model.qk_norm: the plain layer's path)
            return super().forward(x_BTD, rope, cache, attn_mask)
        B, T, _ = x_BTD.shape
        H, K, Dh = self.n_head, self.n_kv, self.head_dim
        qkv = packed_linear(x_BTD, self, QKV).view(B, T, H + 2 * K, Dh).transpose(1, 2)  # B H+2K T Dh
        qk, v = qkv.split([H + K, K], dim=1)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k rotated together
        q, k = qk.split([H, K], dim=1)
        return packed_linear(self.attend(q, k, v, cache, attn_mask), self, ("o_proj",))


class PackedMLP(MLP):
    """:class:`~text2llm.model.mlp.MLP` without grad: gate and up from one matmul."""

    def forward(self, x_BTD):
        if torch.is_grad_enabled():
            return super().forward(x_BTD)
        if self.swiglu:
            gate, up = packed_linear(x_BTD, self, ("gate_proj", "up_proj")).chunk(2, dim=-1)
            return packed_linear(F.silu(gate) * up, self, ("down_proj",))
        up = packed_linear(x_BTD, self, ("up_proj",))
        h = F.relu(up).square() if self.activation == "relu2" else F.gelu(up, approximate="tanh")
        return packed_linear(h, self, ("down_proj",))


class PackedTransformer(Transformer):
    """:class:`~text2llm.model.transformer.Transformer` whose forward without grad first drops
    stale stacks (:func:`drop_stale`), and whose head runs packed where ``packed_head``
    (its Linear class has a packer)."""

    packed_head: bool
    _pack_params: list[nn.Parameter]  # watched by drop_stale
    _pack_key: list | None

    def forward(self, input_ids, cache: KVCache | None = None, attn_mask=None, last_only: bool = False):
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            drop_stale(self)
        return super().forward(input_ids, cache, attn_mask, last_only)

    def unembed(self, x_BTD):
        if self.packed_head and not torch.is_grad_enabled():
            return self.softcap(packed_linear(x_BTD, self, ("lm_head",)))
        return super().unembed(x_BTD)


_PACKED_CLASS = {Attention: PackedAttention, MLP: PackedMLP, Transformer: PackedTransformer}
_PLAIN_CLASS = {packed: plain for plain, packed in _PACKED_CLASS.items()}
_STATE = ("packed_head", "_pack_params", "_pack_key")  # what pack_weights adds to a PackedTransformer


def pack_weights(model: nn.Module, on: bool = True) -> nn.Module:
    """Turn packed weights on (or off) for ``model`` and return it: see the module docstring.
    Turning it on again rebuilds the stacks; turning it off restores the plain classes and frees
    the stacked copies. Pass the whole model: the check that follows weight changes lives in its
    :class:`PackedTransformer`. Modules of other classes (and of subclasses, e.g. FSDP's) are left
    as they are."""
    for m in model.modules():
        m.__dict__.pop("_packed", None)  # free (or rebuild) the stacked copies
        if type(m) in _PLAIN_CLASS:
            m.__class__ = _PLAIN_CLASS[type(m)]
            for name in _STATE:
                m.__dict__.pop(name, None)
        packed = _PACKED_CLASS.get(type(m)) if on else None
        if packed is PackedTransformer:
            m.__class__ = packed
            m.packed_head = packable(m, ("lm_head",))
            m._pack_params = list(m.parameters())
            m._pack_key = None
        elif packed is not None and packable(m):
            m.__class__ = packed
    return model


def drop_stale(model: PackedTransformer) -> None:
    """Drop every packed stack of ``model`` if a weight changed since they were built: updated in
    place (``_version``: an optimizer step, ``load_state_dict``) or moved (``data_ptr``: ``.to()``).
    One check per forward, instead of one per packed matmul."""
    # (tensors made under torch.inference_mode, e.g. a model loaded there, have no version
    # counter: for them only a move is seen)
    key = [(0 if p.is_inference() else p._version, p.data_ptr()) for p in model._pack_params]
    if key != model._pack_key:
        for m in model.modules():
            m.__dict__.pop("_packed", None)
        model._pack_key = key
