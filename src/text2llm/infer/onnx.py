"""Export a checkpoint to ONNX: one graph that does both prefill and decode with a KV cache.

``text2llm export onnx CKPT --out DIR [--int8]`` writes::

    DIR/model.onnx            fp32 graph, weights inside (no external-data file)
    DIR/model.int8.onnx       (--int8) onnxruntime dynamic quantization: int8 weights of MatMuls
    DIR/tokenizer/            a copy of the checkpoint's tokenizer
    DIR/text2llm-onnx.json    model config, graph io names, files (read by text2llm.infer.ort_runtime)

The graph (inputs -> outputs), with B batch, T new tokens, P cached tokens (all dynamic)::

    input_ids        int64 (B, T)             new tokens (a whole prompt, or the one sampled token)
    attention_mask   int64 (B, P + T)         1 = real token, 0 = left padding (cached tokens first)
    past.{i}.key     float32 (B, K, P, Dh)    layer i's cached keys   (P = 0 for a prefill)
    past.{i}.value   float32 (B, K, P, Dh)
      -> logits      float32 (B, T, V)
         present.{i}.key / present.{i}.value  (B, K, P + T, Dh)   the past with the new tokens appended

Prefill is the same graph with an empty past (P = 0), so one file serves both steps, and the
decoding loop in :mod:`text2llm.infer.decoding` drives it exactly as it drives the PyTorch model:
same left padding, same mask, same positions (the new tokens sit at P ... P+T-1).

The export reuses the model's own blocks; only the KV cache differs: instead of writing into a
preallocated :class:`~text2llm.model.transformer.KVCache`, :class:`_ConcatCache` appends the new
keys/values to the ``past`` inputs, because a graph returns new tensors rather than mutating state.
We use the dynamo exporter (``torch.export``) with ``Dim.AUTO`` axes, so it works out that the
mask is ``P + T`` long, and save the weights inside the file (``external_data=False``). The model
repeats K/V heads itself, so SDPA has no ``enable_gqa``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from text2llm.errors import UserError

META_FILE = "text2llm-onnx.json"
FORMAT_VERSION = 1


class _ConcatCache:
    """Stands in for KVCache inside the exported graph: past (graph input) + new -> present (output)."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(past)  # type: ignore[list-item]

    def update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor):
        pk, pv = self.past[layer]
        k, v = torch.cat([pk, k_BKTD], dim=2), torch.cat([pv, v_BKTD], dim=2)  # B K P+T Dh
        self.present[layer] = (k, v)
        return k, v


class OnnxStep(nn.Module):
    """``model`` as a pure function of (new ids, mask, past) -> (logits, present): what gets exported."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past_flat: torch.Tensor):
        m = self.model
        T = input_ids.shape[1]
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        start = past[0][0].shape[2]  # P: tokens already cached
        x, rope = m.embed_positions(input_ids, start)  # B T D
        # (B, 1, T, P+T): causal, padding hidden, every query sees itself (same rule as the PyTorch engine)
        q_pos = torch.arange(start, start + T, device=input_ids.device)[:, None]
        k_pos = torch.arange(start + T, device=input_ids.device)[None, :]
        mask = ((k_pos <= q_pos)[None] & (attention_mask[:, None, :] > 0)) | (k_pos == q_pos)[None]
        cache = _ConcatCache(past)
        for block in m.blocks:
            x = block(x, rope, cache, mask[:, None])[0]
        logits = m.lm_head(m.norm(x))  # B T V
        return (logits, *[t for kv in cache.present for t in kv])


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", *past], ["logits", *present]


def export_onnx(ckpt, out_dir, int8: bool = False, overwrite: bool = False) -> Path:
    """Export the checkpoint (or a run dir's latest) to ``out_dir``; return ``out_dir``."""
    import text2llm
    from text2llm.train.checkpoint import resolve_checkpoint

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: output dir is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    ckpt_dir = resolve_checkpoint(ckpt)
    model, tok = text2llm.load(ckpt_dir)
    if not isinstance(model, nn.Module) or not hasattr(model, "blocks"):
        raise UserError(f"{ckpt_dir}: only a float text2llm checkpoint can be exported to ONNX "
                        "(export the float model and pass --int8 for an int8 ONNX model)")
    return export_model(model, out, tokenizer=tok, int8=int8, extra_meta={"checkpoint": str(ckpt_dir)})


def export_model(model, out_dir, tokenizer=None, int8: bool = False, extra_meta: dict | None = None) -> Path:
    """Export an in-memory model (and copy ``tokenizer`` beside it) into ``out_dir``."""
    import onnx

    out = Path(out_dir)
    model = model.float().eval()
    cfg = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    inputs, outputs = io_names(cfg.n_layer)
    B, T, P = 2, 3, 4  # example sizes (any; every axis below is dynamic)
    ex_ids = torch.randint(0, cfg.vocab_size, (B, T))
    ex_mask = torch.ones(B, P + T, dtype=torch.long)
    ex_past = [torch.zeros(B, cfg.kv_heads, P, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    auto = torch.export.Dim.AUTO  # torch.export works out the relations (mask length = P + T)
    shapes = ({0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in ex_past))
    path = out / "model.onnx"
    was_fast = bool(getattr(model, "fast", False))
    model.fast_inference()  # q/k/v and gate/up as one MatMul each in the graph too (fewer, larger kernels)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(OnnxStep(model), (ex_ids, ex_mask, *ex_past), input_names=inputs,
                                     output_names=outputs, dynamic_shapes=shapes, dynamo=True, verbose=False)
            prog.save(str(path), external_data=False)
    finally:
        model.fast_inference(was_fast)
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
