"""Compression: int8 quantization, pruning and distillation, each a checkpoint -> checkpoint transform.

    text2llm compress quantize CKPT --out DIR            -> int8 checkpoint (quantize.py; native/: the int8 kernel)
    text2llm compress prune CKPT --out DIR --method ...  -> smaller / sparser plain checkpoint (prune.py)
    text2llm compress distill --teacher CKPT --student CONFIG --out DIR  -> a trained student run (distill.py)

Each ends with a before/after table and writes it to ``DIR/report.json`` (report.py). From Python:
``text2llm.compress.quantize.quantize_checkpoint``, ``...prune.prune_checkpoint``,
``...distill.distill_checkpoint``.
"""
