"""Export a checkpoint to ONNX: one graph that does both prefill and decode with a KV cache.

``text2llm export onnx CKPT --out DIR [--int8]`` writes::

    DIR/model.onnx            fp32 graph, weights inside (no external-data file)
    DIR/model.int8.onnx       (--int8) onnxruntime dynamic quantization: int8 weights of MatMuls
    DIR/tokenizer/            a copy of the checkpoint's tokenizer
    DIR/text2llm-onnx.json    model config, graph io names, files (read by text2llm.infer.ort_runtime)

The graph (inputs -> outputs), with B batch, T new tokens, P cached tokens, M >= P + T the cache
capacity (all dynamic)::

    input_ids        int64 (B, T)             new tokens (a whole prompt, or the one sampled token)
    attention_mask   int64 (B, P + T)         1 = real token, 0 = left padding (cached tokens first)
    past.{i}.key     float32 (B, K, M, Dh)    layer i's key buffer: positions 0..P-1 hold the cache
    past.{i}.value   float32 (B, K, M, Dh)
      -> logits      float32 (B, 1, V)         the next-token logits: the last position's only
         present.{i}.key / present.{i}.value  (B, K, M, Dh)   the buffer with the new tokens at P..P+T-1

The cache is a preallocated buffer, as in PyTorch's :class:`~text2llm.model.cache.KVCache`:
the caller allocates zeros of capacity M (prompt + new tokens) once and binds the *same* memory as
``past`` and ``present`` (onnxruntime's IOBinding); each call then writes only its T new keys and
values into the buffer. (Fed plain arrays instead, ``present`` is a new array, a copy of the buffer
with the new tokens written: correct, but every step then copies the whole cache.) P is not an
input: it is the mask's length minus T. Prefill is the same graph with P = 0, so one file serves
both steps, and the decoding loop in :mod:`text2llm.infer.decoding` drives it exactly as it drives
the PyTorch model: same left padding, same mask, same positions (the new tokens sit at P ... P+T-1).
A call with T > 1 after a prefill (a prompt in chunks) needs B = 1.

The export reuses the model's own blocks (embedding, norms, projections, MLP or MoE), with packed
weights (:func:`~text2llm.infer.packing.pack_weights`: q/k/v and gate/up one MatMul each) and, for
the duration of the export, two layer classes swapped for the export's own (:func:`onnx_layers`):
:class:`OnnxRMSNorm` writes the norm as the pattern onnxruntime fuses into one node, and
:class:`OnnxAttention` hands the work from the packed q/k/v projection to the attention output to
onnxruntime's fused ``com.microsoft.GroupQueryAttention`` op (:meth:`_BufferCache.attend`): it
rotates q and k (RoPE, from the model's own tables; the op needs a head dim that is a multiple of
16, else the graph rotates them first), writes the new keys/values into the buffer at P..P+T-1,
groups the query heads over the K key/value heads (no repeated K/V) and applies the causal mask;
the padding goes in as an additive bias. A windowed layer's node gets the window as its
``local_window_size``; its buffer stays a full one (the op has no ring buffer), so ONNX decoding
saves the attention work of a window, not its cache memory. (Version 1 of this format concatenated ``past`` and the
new tokens into a new ``present`` at every step, so each step copied the whole cache;
:mod:`text2llm.infer.ort_runtime` asks for a fresh export of a version-1 dir.)
We use the dynamo exporter (``torch.export``) with ``Dim.AUTO`` axes and save the weights inside
the file (``external_data=False``).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from text2llm.checkpoint import is_int8, load_model, load_tokenizer, resolve_checkpoint, tokenizer_dir
from text2llm.errors import UserError
from text2llm.files import check_output_dir, staged_output
from text2llm.infer.packing import QKV, PackedTransformer, pack_weights, packable, packed_linear
from text2llm.model.transformer import Attention, RMSNorm, apply_rope

META_FILE = "text2llm-onnx.json"
FORMAT_VERSION = 2


class _BufferCache:
    """Stands in for KVCache inside the exported graph: ``attend`` runs onnxruntime's
    GroupQueryAttention over the ``past`` buffers (graph inputs) and keeps its ``present`` outputs."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor, T: int,
                 rope: tuple[torch.Tensor, torch.Tensor] | None):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(past)  # type: ignore[list-item]
        B, S = attention_mask.shape
        start = S - T
        # the op's bookkeeping: per row, the index of the last token (seqlens_k), and P + T; the
        # rotary positions it derives from them are ours: P .. P+T-1, left padding included
        self.total = torch.tensor(S, dtype=torch.int32)
        self.seqlens = (self.total - 1).expand(B)
        # padding as an additive bias (B, 1, T, S); the op adds the causal mask. A query still
        # sees itself, so a padded query's (unused) row matches the PyTorch engine's.
        q_pos = torch.arange(start, S, device=attention_mask.device)[:, None]
        k_pos = torch.arange(S, device=attention_mask.device)[None, :]
        allow = (attention_mask[:, None, :] > 0) | (k_pos == q_pos)[None]  # B T S
        self.bias = torch.where(allow, 0.0, torch.finfo(torch.float32).min)[:, None]
        # RoPE: done by the op where it can (head dim a multiple of 16), from our tables cut to
        # the (max_len, Dh / 2) it wants (ours hold each frequency twice); else by the model's
        # apply_rope on the rows of positions P..P+T-1, before the op
        self.fused_rope = rope is not None and rope[0].size(1) % 16 == 0
        self.rope = None if rope is None else \
            tuple(t[:, : t.size(1) // 2] for t in rope) if self.fused_rope else tuple(t[start:S] for t in rope)

    def attend(self, layer: int, qkv_BTE: torch.Tensor, H: int, K: int, window: int = 0) -> torch.Tensor:
        """q, k, v packed as one (B, T, (H + 2K) Dh) tensor -> attention output (B, T, H Dh).
        ``window`` > 0: a sliding window, the op's ``local_window_size``, which counts the keys a
        query sees as we do, itself included (checked against PyTorch: tests/test_attention.py)."""
        B, T, E = qkv_BTE.shape
        Dh = E // (H + 2 * K)
        pk, pv = self.past[layer]
        cos = sin = None
        if self.fused_rope:
            cos, sin = self.rope
        elif self.rope is not None:  # q and k rotated here, the op gets them as they are
            qk, v = qkv_BTE.view(B, T, H + 2 * K, Dh).transpose(1, 2).split([H + K, K], dim=1)
            qkv_BTE = torch.cat([apply_rope(qk, *self.rope), v], dim=1).transpose(1, 2).reshape(B, T, E)
        y, present_k, present_v = torch.onnx.ops.symbolic_multi_out(
            "com.microsoft::GroupQueryAttention",
            [qkv_BTE, None, None, pk, pv, self.seqlens, self.total, cos, sin, None, self.bias],
            {"num_heads": H, "kv_num_heads": K, "do_rotary": int(self.fused_rope), "rotary_interleaved": 0,
             "local_window_size": window if window else -1},
            dtypes=[qkv_BTE.dtype, pk.dtype, pv.dtype], shapes=[(B, T, H * Dh), pk.shape, pv.shape], version=1,
        )
        self.present[layer] = (present_k, present_v)
        return y  # B T (H Dh)


class OnnxRMSNorm(RMSNorm):
    """RMSNorm written as the pattern onnxruntime fuses into one SimplifiedLayerNormalization node
    (``F.rms_norm`` exports as Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul: seven nodes, and
    a decode step is dominated by the per-node cost)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class OnnxAttention(Attention):
    """Attention in the exported graph: q, k and v projected together (one MatMul where the Linears
    have a packer), then ``cache.attend`` (:class:`_BufferCache`) does RoPE, the cache write, GQA
    attention and padding in one GroupQueryAttention node."""

    def forward(self, x_BTD, rope, cache: _BufferCache, attn_mask):
        packed = packable(self)
        qkv_BTE = packed_linear(x_BTD, self, QKV) if packed else \
            torch.cat([self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)], dim=-1)
        if hasattr(self, "q_norm"):  # model.qk_norm: each head's q and k normalised before the node's RoPE
            B, T, _ = qkv_BTE.shape
            H, K, Dh = self.n_head, self.n_kv, self.head_dim
            q, k, v = qkv_BTE.split([H * Dh, K * Dh, K * Dh], dim=-1)
            q = self.q_norm(q.reshape(B, T, H, Dh)).reshape(B, T, H * Dh)
            k = self.k_norm(k.reshape(B, T, K, Dh)).reshape(B, T, K * Dh)
            qkv_BTE = torch.cat([q, k, v], dim=-1)
        y_BTD = cache.attend(self.layer_idx, qkv_BTE, self.n_head, self.n_kv, self.window)  # B T (H Dh)
        return packed_linear(y_BTD, self, ("o_proj",)) if packed else self.o_proj(y_BTD)


@contextlib.contextmanager
def onnx_layers(model: nn.Module):
    """Inside: every RMSNorm of ``model`` an :class:`OnnxRMSNorm`, every Attention an
    :class:`OnnxAttention` (the same parameters; only the class changes). After, even on error,
    each module has its own class again."""
    swapped = []
    try:
        for m in model.modules():
            cls = OnnxRMSNorm if isinstance(m, RMSNorm) else OnnxAttention if isinstance(m, Attention) else None
            if cls is not None:
                swapped.append((m, type(m)))
                m.__class__ = cls
        yield model
    finally:
        for m, cls in swapped:
            m.__class__ = cls


class OnnxStep(nn.Module):
    """``model`` as a pure function of (new ids, mask, past buffers) -> (logits, present buffers): what gets exported."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past_flat: torch.Tensor):
        m = self.model
        T = input_ids.shape[1]
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        start = attention_mask.shape[1] - T  # P: tokens already cached
        x, _ = m.embed_positions(input_ids, start)  # B T D
        rope = (m.rope_cos, m.rope_sin) if m.cfg.positions == "rope" else None  # whole tables: the op indexes them
        cache = _BufferCache(past, attention_mask, T, rope)
        for block in m.blocks:
            x = block(x, rope, cache, None)[0]
        # only the last position: what generation needs (left padding keeps it a real token); the
        # head is ~30% of the demo model's prefill FLOPs, so the other T-1 rows are not computed
        logits = m.softcap(m.lm_head(m.norm(x[:, -1:])))  # B 1 V
        return (logits, *[t for kv in cache.present for t in kv])


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", *past], ["logits", *present]


def export_onnx(ckpt, out_dir, int8: bool = False, overwrite: bool = False) -> Path:
    """Export the checkpoint (or a run dir's latest) to ``out_dir``; return ``out_dir``."""
    check_output_dir(out_dir, overwrite)
    ckpt_dir = resolve_checkpoint(ckpt)
    if is_int8(ckpt_dir):
        raise UserError(f"{ckpt_dir}: only a float text2llm checkpoint can be exported to ONNX "
                        "(export the float model and pass --int8 for an int8 ONNX model)")
    model, _ = load_model(ckpt_dir)
    tok = load_tokenizer(ckpt_dir) if tokenizer_dir(ckpt_dir) else None
    with staged_output(out_dir, overwrite) as tmp:
        export_model(model, tmp, tokenizer=tok, int8=int8, extra_meta={"checkpoint": str(ckpt_dir)})
    return Path(out_dir)


def export_model(model, out_dir, tokenizer=None, int8: bool = False, extra_meta: dict | None = None) -> Path:
    """Export an in-memory model (and copy ``tokenizer`` beside it) into ``out_dir``."""
    import onnx

    out = Path(out_dir)
    model = model.float().eval()
    cfg = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    inputs, outputs = io_names(cfg.n_layer)
    B, T, P, M = 2, 3, 4, 9  # example sizes (any; every axis below is dynamic)
    ex_ids = torch.randint(0, cfg.vocab_size, (B, T))
    ex_mask = torch.ones(B, P + T, dtype=torch.long)
    ex_past = [torch.zeros(B, cfg.kv_heads, M, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    auto = torch.export.Dim.AUTO  # torch.export works out the relations (the same B everywhere)
    shapes = ({0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in ex_past))
    path = out / "model.onnx"
    was_packed = isinstance(model, PackedTransformer)
    pack_weights(model)  # q/k/v and gate/up as one MatMul each in the graph too (fewer, larger kernels)
    try:
        with onnx_layers(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(OnnxStep(model), (ex_ids, ex_mask, *ex_past), input_names=inputs,
                                     output_names=outputs, dynamic_shapes=shapes, dynamo=True, verbose=False)
            prog.save(str(path), external_data=False)
    finally:
        pack_weights(model, on=was_packed)
    onnx.checker.check_model(str(path), full_check=True)
    opset = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    files = {"fp32": path.name}
    if int8:
        files["int8"] = quantize_int8(path, out / "model.int8.onnx").name
    if tokenizer is not None:
        tokenizer.save(out / "tokenizer")
    meta = {
        "format_version": FORMAT_VERSION,
        "model": cfg.model_dump(mode="json"),
        "n_layer": cfg.n_layer, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len, "positions": cfg.positions,
        "inputs": inputs, "outputs": outputs, "files": files, "tokenizer": "tokenizer" if tokenizer is not None else None,
        "kv_cache": "one zeroed buffer (B, kv_heads, capacity, head_dim) per past input, bound as that past "
                    "and as the matching present output (the same memory); a call writes its T new tokens "
                    "at P..P+T-1, where P = attention_mask length - T",
        "opset": opset, **(extra_meta or {}),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


def quantize_int8(src: Path, dst: Path) -> Path:
    """onnxruntime dynamic quantization: int8 MatMul weights, activations quantized on the fly."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # quiet its "consider pre-processing" advice
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    finally:
        root.setLevel(level)
    onnx.checker.check_model(str(dst))
    return dst
