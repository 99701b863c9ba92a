"""Compression: int8 quantization, pruning and distillation, each a checkpoint -> checkpoint transform.

    text2llm compress quantize CKPT --out DIR            -> int8 checkpoint (quantize.py)
    text2llm compress prune CKPT --out DIR --method ...  -> smaller / sparser plain checkpoint (prune.py)
    text2llm compress distill --teacher CKPT --student CONFIG --out DIR  -> a trained student run (distill.py)

Each ends with a before/after table and writes it to ``DIR/report.json`` (report.py).
"""

from __future__ import annotations

__all__ = ["quantize_checkpoint", "prune_checkpoint", "distill_checkpoint", "cli_entry"]


def quantize_checkpoint(*args, **kwargs):
    from text2llm.compress.quantize import quantize_checkpoint as f

    return f(*args, **kwargs)


def prune_checkpoint(*args, **kwargs):
    from text2llm.compress.prune import prune_checkpoint as f

    return f(*args, **kwargs)


def distill_checkpoint(*args, **kwargs):
    from text2llm.compress.distill import distill_checkpoint as f

    return f(*args, **kwargs)


def cli_entry(args) -> int:
    """Dispatch ``text2llm compress METHOD`` (``args.cverb``) to the stage functions."""
    from text2llm.errors import UserError

    verb = getattr(args, "cverb", None)
    progress = not getattr(args, "quiet", False)
    if verb == "quantize":
        quantize_checkpoint(args.ckpt, args.out, data=args.data, overwrite=args.overwrite)
    elif verb == "prune":
        prune_checkpoint(args.ckpt, args.out, method=args.method, sparsity=args.sparsity, scope=args.scope,
                         finetune_steps=args.finetune_steps, data=args.data, overwrite=args.overwrite,
                         progress=progress)
    elif verb == "distill":
        distill_checkpoint(args.teacher, args.student, args.out, overrides=list(args.overrides or []), data=args.data,
                           alpha=args.alpha, temperature=args.temperature, overwrite=args.overwrite,
                           progress=progress, init=getattr(args, "init", "teacher"))
    else:
        raise UserError("compress: give a METHOD: quantize, prune or distill")
    return 0
