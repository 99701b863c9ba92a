"""The decode step compiled ahead of time (AOTInductor): compile once, load in every process.

``generate --compile`` compiles the decode step with ``torch.compile`` in every new process
(tens of seconds on a small CPU). ``text2llm export aot CKPT --out DIR`` compiles it once into a
shared library, and ``generate DIR`` / ``serve DIR`` load that instead, in a few seconds
(benchmarks/generate.py ``aot_load`` measures both)::

    DIR/model.safetensors, config.toml, tokenizer/   a copy of the checkpoint (the prompt runs eagerly)
    DIR/decode_step.pt2                              the compiled step, weights frozen inside
    DIR/text2llm-aot.json                            what it was built for: torch version, device, batch limit

The compiled program is :class:`DecodeStep`: one new token per row, the attention mask of that
position (B, 1, 1, S), and the KV-cache buffers, which it writes in place at position S - 1 (the
same :class:`~text2llm.model.cache.KVCache` code as the eager step, over the buffers; windowed
layers get full buffers too, and the band as part of their mask: no ring buffer in a graph). The
batch (up to ``max_batch``) and S (up to ``max_seq_len - 1``) are symbolic: one program serves
every batch, prompt length, padding and position. Rows beyond ``max_batch`` decode eagerly.
A package runs only with the torch version and device type it was built with; the runtime says
so in one line otherwise (export again).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from text2llm.checkpoint import is_int8, load_model, resolve_checkpoint
from text2llm.errors import UserError
from text2llm.files import check_output_dir, read_metadata, staged_output
from text2llm.model.cache import KVCache

META_FILE = "text2llm-aot.json"
PACKAGE = "decode_step.pt2"
FORMAT_VERSION = 1


class DecodeStep(nn.Module):
    """``(ids (B, 1), attn_mask (B, 1, 1, S), *k buffers, *v buffers) -> logits (B, V)``: the
    token at position S - 1 through the model, its keys/values written into the buffers."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids_B1: torch.Tensor, mask_B11S: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        n = len(kv) // 2
        cache = KVCache.over(kv[:n], kv[n:])  # a view over the caller's buffers, nothing allocated
        return self.model.decode_step(ids_B1, mask_B11S.size(-1) - 1, cache, mask_B11S)


def is_aot_dir(path) -> bool:
    return (Path(path) / META_FILE).is_file()


def export_aot(ckpt, out_dir, max_batch: int = 64, overwrite: bool = False) -> Path:
    """Compile the decode step of the checkpoint (or a run dir's latest) into ``out_dir``, with a
    copy of the checkpoint beside it."""
    check_output_dir(out_dir, overwrite)
    if max_batch < 1:
        raise UserError(f"--max-batch: must be >= 1, got {max_batch}")
    src = resolve_checkpoint(ckpt)
    if is_int8(src):
        raise UserError(f"{src}: an int8 checkpoint cannot be compiled ahead of time (export the float one)")
    model, _ = load_model(src)
    with staged_output(out_dir, overwrite) as tmp:
        for name in ("model.safetensors", "config.toml"):
            shutil.copy2(src / name, tmp / name)
        if (src / "tokenizer").is_dir():
            shutil.copytree(src / "tokenizer", tmp / "tokenizer")
        compile_step(model, tmp, max_batch, {"checkpoint": str(src)})
    return Path(out_dir)


def compile_step(model, out_dir, max_batch: int = 64, extra_meta: dict | None = None) -> Path:
    """Compile ``model``'s decode step into ``out_dir`` (``decode_step.pt2`` + ``text2llm-aot.json``)."""
    cfg = model.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    B, S = min(2, max_batch), 3  # example sizes; both axes are symbolic
    kv = [torch.zeros(B, cfg.kv_heads, cfg.max_seq_len, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    example = (torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, 1, S, dtype=torch.bool), *kv)
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch > 1 else None
    seen = torch.export.Dim("seen", min=1, max=cfg.max_seq_len - 1)  # (the full length guards a check)
    shapes = ({0: batch}, {0: batch, 3: seen}, tuple({0: batch} for _ in kv))
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(DecodeStep(model.eval()), example, dynamic_shapes=shapes)
        torch._inductor.aoti_compile_and_package(program, package_path=str(out / PACKAGE))
    meta = {
        "format_version": FORMAT_VERSION, "torch": torch.__version__, "device": "cpu",
        "max_batch": max_batch, "max_seq_len": cfg.max_seq_len,
        "compile_seconds": round(time.perf_counter() - t0, 1), **(extra_meta or {}),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


def load_step(aot_dir):
    """``(compiled step, meta)`` of an export dir; a clear error if this process cannot run it."""
    d = Path(aot_dir)
    meta = read_metadata(d / META_FILE, f"{d}: not an AOT export dir (no {META_FILE})")
    if meta.get("torch") != torch.__version__:
        raise UserError(f"{d}: compiled with torch {meta.get('torch')}, this is torch {torch.__version__}; "
                        "export it again with `text2llm export aot`")
    if not (d / PACKAGE).is_file():
        raise UserError(f"{d}: {PACKAGE} is missing; export it again with `text2llm export aot`")
    return torch._inductor.aoti_load_package(str(d / PACKAGE)), meta
