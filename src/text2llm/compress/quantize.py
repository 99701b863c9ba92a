"""int8 quantization of the Linear layers for CPU inference, saved without pickling.

Scheme (chosen by measurement, benchmarks/compress.py): *dynamic* int8 —
weights are int8 with one symmetric scale per output channel; each forward quantizes its
activations to int8 on the fly. Prefill runs fbgemm's int8 GEMM (``torch.ao`` ``quantize_dynamic``);
decode steps (a few rows) run the native int8 kernel of :mod:`text2llm.compress.native` (its path chosen from the CPU's flags)
where it builds, because fbgemm's fixed cost per call ate the gain on small models.
Weight-only int8 (``aten._weight_int8pack_mm``) and torchao's int8 paths were slower than fp32
here.

What is quantized::

    blocks[i].attn.{q,k,v,o}_proj, blocks[i].mlp.{gate,up,down}_proj, lm_head   int8 compute
    embed                       int8 on disk (one scale per row); dequantized to fp32 when loaded.
                                With tie_embeddings (the default) it is not stored at all: the
                                output head's int8 weights stand for it (quant.json "tied_to")
    norms, biases, RoPE tables  fp32

A quantized checkpoint dir holds::

    model.safetensors   fp32 tensors under their usual names; for every int8 Linear NAME:
                        NAME.weight_int8 (out, in) int8, NAME.weight_scale (out,) fp32,
                        NAME.bias (fp32, when the layer has one); embed.weight_int8 + embed.weight_scale
                        unless the embedding is tied to lm_head
    quant.json          format, scheme, and per layer: tensor names, shape, axis of the scales
    config.toml         the source checkpoint's config (the model shape)
    tokenizer/          a copy of the tokenizer

``text2llm.load`` (and so ``eval``, ``generate``) sees ``quant.json`` and calls :func:`load_quantized`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from text2llm.checkpoint import read_checkpoint_config
from text2llm.compress import native
from text2llm.compress.common import load_fp32, report_data
from text2llm.compress.report import compare, measure, retime, write_report
from text2llm.errors import UserError
from text2llm.files import check_output_dir, staged_output
from text2llm.infer.packing import LINEAR_PACKERS
from text2llm.model.transformer import Transformer
from text2llm.tokenizer import Tokenizer

FORMAT = "text2llm-int8"
VERSION = 2  # 2: a tied embedding is stored once, as the output head's int8 weights (1 still loads)


def _ao():
    """torch.ao quantization entry points (deprecated in favour of torchao, still working in torch 2.x)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    return quantize_dynamic, per_channel_dynamic_qconfig, DynLinear


def _engine() -> str:
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in engines:
            return name
    raise UserError("int8 quantization: this torch build has no quantized CPU engine (x86 / fbgemm / qnnpack)")


# Below this many weights, a Linear's int8 GEMM is slower than the fp32 matmul of its dequantized
# weights: each int8 call pays a fixed cost to quantize the activations and set up fbgemm, while
# an fp32 matrix of about a megabyte sits in the core's L2 cache and multiplies faster than that.
# (benchmarks/compress.py, case int8-kernels, times both per matrix.) This decides the rows that
# the native kernel does not take (prefill; every row where it is not available).
INT8_MIN_WEIGHTS = 1 << 18


class Int8Packer:
    """:func:`text2llm.infer.packing.packed_linear` for dynamic-int8 Linears: the int8 weights
    and per-channel scales of q/k/v (or gate/up) are concatenated into one matrix.

    * Decode rows (up to ``native.MAX_ROWS``) go to the native int8 kernel
      (:mod:`text2llm.compress.native`) where it can be built: int8 weights, activations quantized
      per row, no fixed cost worth the name.
    * Other rows, and every row where the kernel is not available, go to fbgemm through the
      quantized op directly (no module overhead); a stack smaller than :data:`INT8_MIN_WEIGHTS` is
      dequantized once and multiplied in fp32 instead: the same int8 weights, not the int8 kernel.
    """

    @staticmethod
    def build(linears, tracing: bool = False):
        ws = [m.weight() for m in linears]
        q = torch.cat([w.int_repr() for w in ws])
        scale = torch.cat([w.q_per_channel_scales() for w in ws]).double()
        zp = torch.cat([w.q_per_channel_zero_points() for w in ws]).long()
        biases = [m.bias() for m in linears]
        bias = torch.cat(biases).float() if biases[0] is not None else None
        if q.numel() < INT8_MIN_WEIGHTS:
            w_IO = ((q.float() - zp[:, None].float()) * scale[:, None].float()).t().contiguous()
            torch_mm = (lambda x: torch.addmm(bias, x, w_IO)) if bias is not None else (lambda x: torch.mm(x, w_IO))
        else:
            packed = torch.ops.quantized.linear_prepack(torch._make_per_channel_quantized_tensor(q, scale, zp, 0), bias)
            torch_mm = lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)  # noqa: E731  (as DynLinear.forward calls it)
        lib = None if tracing else native.load()
        if lib is None or bool(zp.any()):  # (the kernel takes symmetric weights, as quantize_model makes them)
            return torch_mm
        return native.Int8Gemv(lib, q, scale.float(), bias, fallback=torch_mm)


def register_packer() -> None:
    LINEAR_PACKERS[_ao()[2]] = Int8Packer


def quantize_model(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) with a dynamic-int8 Linear; return it.

    The model keeps its interface: ``model(ids, cache=KVCache(...)).logits``.
    """
    quantize_dynamic, qconfig, _ = _ao()
    torch.backends.quantized.engine = _engine()
    register_packer()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)


def _int8_linears(model: nn.Module) -> dict[str, nn.Module]:
    _, _, DynLinear = _ao()
    return {name: m for name, m in model.named_modules() if isinstance(m, DynLinear)}


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: w ~= q * scale[:, None]."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).float()
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantized_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for safetensors, the ``layers`` section of quant.json) of a quantized model."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, mod in _int8_linears(model).items():
        w = mod.weight()  # a per-channel quantized tensor
        if w.qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric):
            raise ValueError(f"{name}: expected per-channel int8 weights, got {w.qscheme()}")
        tensors[f"{name}.weight_int8"] = w.int_repr().contiguous()
        tensors[f"{name}.weight_scale"] = w.q_per_channel_scales().float().contiguous()
        zp = w.q_per_channel_zero_points()
        if zp.abs().max() > 0:
            tensors[f"{name}.weight_zero_point"] = zp.to(torch.int32).contiguous()
        entry = {"weight": f"{name}.weight_int8", "scale": f"{name}.weight_scale", "axis": int(w.q_per_channel_axis()),
                 "shape": list(w.shape), "bias": None}
        if zp.abs().max() > 0:
            entry["zero_point"] = f"{name}.weight_zero_point"
        b = mod.bias()
        if b is not None:
            tensors[f"{name}.bias"] = b.detach().float().contiguous()
            entry["bias"] = f"{name}.bias"
        layers[name] = entry
    int8_prefixes = tuple(f"{name}." for name in layers)
    for key, t in model.state_dict().items():  # the float rest: embeddings, norms
        if key.startswith(int8_prefixes) or not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        tensors[key] = t.detach().contiguous()
    return tensors, layers


def _dequantize(tensors: dict, entry: dict) -> torch.Tensor:
    """fp32 (out, in) weights of one int8 layer entry of quant.json."""
    q = tensors[entry["weight"]].float()
    if entry.get("zero_point"):
        q = q - tensors[entry["zero_point"]].float()[:, None]
    return q * tensors[entry["scale"]].float()[:, None]


def _is_tied_head(emb: torch.Tensor, tensors: dict, head: dict | None) -> bool:
    """Is the fp32 embedding the output head's weight (tie_embeddings), so that the head's int8
    weights can stand for both? (Equal within half a quantization step, row by row.)"""
    if head is None or list(emb.shape) != head["shape"]:
        return False
    step = tensors[head["scale"]].float()[:, None]
    return bool(((emb - _dequantize(tensors, head)).abs() <= 0.5001 * step + 1e-7).all())


def save_quantized(model: nn.Module, out_dir: Path, config_toml: str, tokenizer_dir: Path | None,
                   source: str | None = None, int8_embedding: bool = True) -> Path:
    """Write a quantized model as safetensors + quant.json + config.toml (+ tokenizer/)."""
    tensors, layers = quantized_state(model)
    embedding = None
    if int8_embedding and "embed.weight" in tensors:
        emb = tensors.pop("embed.weight").float()
        if _is_tied_head(emb, tensors, layers.get("lm_head")):
            embedding = {"tied_to": "lm_head", "axis": 0, "shape": list(emb.shape),
                         "note": "tie_embeddings: the output head's int8 weights and scales, dequantized to fp32 when loaded"}
        else:
            q, scale = _quantize_rows(emb)
            tensors["embed.weight_int8"], tensors["embed.weight_scale"] = q, scale
            embedding = {"weight": "embed.weight_int8", "scale": "embed.weight_scale", "axis": 0,
                         "shape": list(q.shape), "note": "int8 on disk, dequantized to fp32 when loaded"}
    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": VERSION,
            "scheme": "dynamic int8: int8 weights, symmetric per output channel; activations quantized per call",
            "torch_backend": "torch.ao quantize_dynamic (" + torch.backends.quantized.engine + ")",
            "weights_file": "model.safetensors", "layers": layers, "embedding": embedding, "source": source}
    (out_dir / "quant.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    (out_dir / "config.toml").write_text(config_toml, encoding="utf-8")
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        shutil.copytree(tokenizer_dir, out_dir / "tokenizer", dirs_exist_ok=True)
    return out_dir


def load_quantized(ckpt_dir: str | Path, with_tokenizer: bool = True):
    """(int8 model in eval mode, tokenizer) from a dir written by :func:`save_quantized`."""
    ckpt = Path(ckpt_dir)
    try:
        meta = json.loads((ckpt / "quant.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt / 'quant.json'}: cannot read ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise UserError(f"{ckpt / 'quant.json'}: not a {FORMAT} v{VERSION} description (format {meta.get('format')!r}, "
                        f"version {meta.get('version')})")
    cfg = read_checkpoint_config(ckpt)
    tensors = load_file(str(ckpt / meta.get("weights_file", "model.safetensors")))
    emb = meta.get("embedding")
    if emb and emb.get("tied_to"):
        if emb["tied_to"] not in meta["layers"]:
            raise UserError(f"{ckpt / 'quant.json'}: the embedding is tied to {emb['tied_to']!r}, which is not an int8 layer")
        tensors["embed.weight"] = _dequantize(tensors, meta["layers"][emb["tied_to"]])
    elif emb:
        tensors["embed.weight"] = tensors.pop(emb["weight"]).float() * tensors.pop(emb["scale"])[:, None]

    model = Transformer(cfg.model).eval()
    int8_keys = {e[f] for e in meta["layers"].values() for f in ("weight", "scale", "zero_point", "bias") if e.get(f)}
    float_sd = {k: v for k, v in tensors.items() if k not in int8_keys}
    missing, unexpected = model.load_state_dict(float_sd, strict=False)
    quantized_weights = {f"{name}.weight" for name in meta["layers"]} | {f"{name}.bias" for name in meta["layers"]}
    missing = set(missing) - quantized_weights - {"lm_head.weight"}
    if missing or unexpected:
        raise UserError(f"{ckpt}: int8 weights do not match config.toml (missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]})")
    quantize_model(model)
    linears = _int8_linears(model)
    if set(linears) != set(meta["layers"]):
        raise UserError(f"{ckpt / 'quant.json'}: layers {sorted(set(meta['layers']) ^ set(linears))[:5]} do not match "
                        f"the model built from config.toml")
    for name, entry in meta["layers"].items():
        q = tensors[entry["weight"]]
        scale = tensors[entry["scale"]].double()
        zp = tensors[entry["zero_point"]].long() if entry.get("zero_point") else torch.zeros(q.size(0), dtype=torch.long)
        w = torch._make_per_channel_quantized_tensor(q, scale, zp, entry.get("axis", 0))
        bias = tensors[entry["bias"]] if entry.get("bias") else None
        linears[name].set_weight_bias(w, bias)
    model.int8_tied_embedding = bool(emb and emb.get("tied_to"))  # (report.count_params counts it once)
    tok = Tokenizer.load(ckpt / "tokenizer") if with_tokenizer and (ckpt / "tokenizer").is_dir() else None
    return model, tok


def quantize_checkpoint(ckpt: str | Path, out: str | Path, data: str | Path | None = None, overwrite: bool = False,
                        report: bool = True, latency_kwargs: dict | None = None) -> dict:
    """``text2llm compress quantize``: fp32 checkpoint -> int8 checkpoint dir + report.json."""
    check_output_dir(out, overwrite)
    src = load_fp32(ckpt)
    data = report_data(src.ckpt, data)
    with staged_output(out, overwrite) as tmp:
        qmodel = quantize_model(src.fresh_model())
        save_quantized(qmodel, tmp, src.config_toml, src.tokenizer_dir, source=str(src.ckpt))
        qmodel, _ = load_quantized(tmp, with_tokenizer=False)  # measure what was saved, not what is in memory
        rep = {}
        if report:
            before = measure(src.model, src.ckpt, data, timing=False)
            after = measure(qmodel, tmp, data, timing=False)
            retime([before, after], [src.model, qmodel], latency_kwargs)
            rep = compare({"before": before, "after": after})
        rep.update(method="quantize", settings={"scheme": "dynamic int8, per-channel weights", "source": str(src.ckpt),
                                                "decode_kernel": native.describe(),
                                                "data": str(data) if data else None})
        if report:
            write_report(rep, tmp, f"int8 quantization: {src.ckpt} -> {out}", final_dir=out)
    return rep
