"""Any dir text2llm writes -> something that generates: the one place that tells the kinds apart.

| dir (what marks it)                                   | ``load``            | ``open_engine``                       |
|-------------------------------------------------------|---------------------|---------------------------------------|
| float checkpoint or run dir (``model.safetensors``)   | Transformer         | TorchEngine (``compile=`` optional)   |
| int8 checkpoint (``quant.json``, compress quantize)   | int8 Transformer    | TorchEngine                           |
| AOT export (``text2llm-aot.json``, export aot)        | its checkpoint      | TorchEngine over the compiled step    |
| ONNX export (``text2llm-onnx.json``, export onnx)     | (error: no torch)   | OrtEngine (torch is never imported)   |
| imported Hugging Face dir (``text2llm import hf``)    | a float checkpoint  | TorchEngine                           |

``text2llm.load``, ``eval``, ``generate`` and ``serve`` all come through here; a new format
(GGUF, ...) plugs in once, in :func:`open_engine` and :func:`load`. The ONNX Runtime path
imports neither torch nor ``text2llm.model``, so everything that does is imported inside the
branches that need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from text2llm.errors import UserError
from text2llm.infer import ort_runtime

ENGINES = ("auto", "torch", "onnx")


@dataclass
class Served:
    """An engine (the decoding interface of :mod:`text2llm.infer.decoding`) and what goes with it."""

    engine: object
    tokenizer: object
    name: str  # the model's name for /v1/models: the dir's name
    kind: str  # "torch", "torch, compiled", "torch, compiled ahead of time", "onnxruntime"
    learned_positions: bool  # left padding shifts learned positions (see infer.decoding)
    tp: int = 1  # tensor-parallel processes that decode together (each holds a slice of every weight)


def load(path: str | Path, device: str = "cpu"):
    """``(model in eval mode, tokenizer)`` from a float or int8 checkpoint, a run dir (its latest
    checkpoint) or an AOT export dir (the checkpoint it carries)."""
    from text2llm.checkpoint import is_int8, load_model, load_tokenizer, resolve_checkpoint
    from text2llm.compress.quantize import load_quantized

    if ort_runtime.is_export_dir(path):
        raise UserError(f"{path}: an ONNX export runs with onnxruntime, not as a PyTorch model "
                        "(`text2llm generate DIR` / `serve DIR` run it; load the checkpoint it came from)")
    ckpt = resolve_checkpoint(path)
    if is_int8(ckpt):
        return load_quantized(ckpt)
    model, ckpt = load_model(ckpt, device)
    return model, load_tokenizer(ckpt)


def open_engine(path: str | Path, engine: str = "auto", compile: bool = False, tp: int = 1) -> Served:
    """The engine that serves ``path``; ``engine`` = auto (by what the dir holds) | torch | onnx.

    ``compile``: decode through ``torch.compile`` (PyTorch checkpoints only; an AOT dir is
    compiled already). ``tp`` > 1: a float checkpoint split over the ``tp`` processes torchrun
    started (tensor parallel; each holds a slice of every weight). An explicit engine that does
    not fit the dir is a one-line error.
    """
    if engine not in ENGINES:
        raise UserError(f"--engine: {engine!r} is not one of {', '.join(ENGINES)}")
    p = Path(path)
    name = p.resolve().name
    if engine == "onnx" or (engine == "auto" and ort_runtime.is_export_dir(p)):
        if compile:
            raise UserError(f"{p}: --compile applies to PyTorch checkpoints, not to an ONNX export (onnxruntime)")
        e = ort_runtime.OrtEngine.load(p)  # a one-line error if p is not an export dir
        return Served(e, ort_runtime.load_tokenizer(p), name, "onnxruntime", e.learned_positions)

    from text2llm.infer.aot import is_aot_dir
    from text2llm.infer.generate import TorchEngine
    from text2llm.model.transformer import Transformer

    if ort_runtime.is_export_dir(p):
        raise UserError(f"{p}: an ONNX export dir; run it with --engine onnx (or without --engine)")
    aot = p if is_aot_dir(p) else None
    if aot is not None and compile:
        raise UserError(f"{p}: an AOT export is compiled already (drop --compile)")
    model, tok = load(p)
    kind = "torch, compiled ahead of time" if aot else "torch, compiled" if compile else "torch"
    kv_heads = None
    if tp > 1:
        from text2llm.train.parallelize import shard_for_inference

        if aot is not None or compile or type(model) is not Transformer:
            raise UserError(f"{p}: --tp runs a float checkpoint eagerly (no int8, AOT or --compile)")
        model, kv_heads = shard_for_inference(model, tp)
        kind = f"torch, tensor parallel over {tp} processes"
    e = TorchEngine(model, compile=compile, aot_dir=aot, kv_heads=kv_heads)
    return Served(e, tok, name, kind, model.cfg.positions == "learned", tp)
