"""The checkpoint format every stage reads: find a checkpoint, read its config and state, weights in and out.

A checkpoint dir (``RUN/checkpoints/step_0000100/``, or any dir a command wrote with the same
files) holds::

    model.safetensors   the unwrapped model's weights (a tied lm_head is stored once, as embed)
    config.toml         the fully resolved config (model shape included)
    state.json          step, tokens seen, val loss, ... (training adds loader and RNG state)
    tokenizer/          a copy of the tokenizer, so the dir alone can evaluate, generate, export
    optimizer.pt        (training checkpoints only) optimizer state, tensors only
    quant.json          (int8 checkpoints only, text2llm.compress.quantize) instead of float weights

This module is the *format*, and the one way to build the float model a checkpoint holds
(:func:`load_model`); writing a training checkpoint atomically, with its optimizer,
RNG and loader state and retention, is :mod:`text2llm.train.checkpoint`, and turning any dir
into something that generates is :mod:`text2llm.artifacts`. Nothing here is loaded with pickle.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save, save_file

from text2llm.config import load_config
from text2llm.errors import UserError
from text2llm.model.transformer import Transformer
from text2llm.tokenizer import Tokenizer

CKPT_DIR = "checkpoints"
WEIGHTS = "model.safetensors"
QUANT_META = "quant.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


# ---- finding checkpoints ---------------------------------------------------------------------


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run dir, oldest first (temporary dirs of a crash are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def is_checkpoint_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / WEIGHTS).is_file() or (p / QUANT_META).is_file()


def is_int8(ckpt: str | Path) -> bool:
    return (Path(ckpt) / QUANT_META).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir itself, or the latest checkpoint of a run dir (or of ``RUN/train`` from ``text2llm run``)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such checkpoint or run dir")
    if is_checkpoint_dir(p):
        return p
    for run in (p, p / "train"):
        for ckpt in reversed(list_checkpoints(run)):  # newest complete one
            if (ckpt / WEIGHTS).is_file() and state_or_empty(ckpt):
                return ckpt
    raise UserError(f"{p}: not a checkpoint dir (no {WEIGHTS}) and holds no checkpoints/step_*")


def read_state(ckpt: str | Path) -> dict:
    """A checkpoint's state.json (step, tokens seen, loader and RNG states, ...)."""
    path = Path(ckpt) / "state.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read checkpoint state ({e})") from None


def state_or_empty(ckpt: Path) -> dict:
    """state.json, or {} when it is missing or damaged (a checkpoint being written, or a crash's leftover)."""
    try:
        return json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The kept checkpoint with the lowest val loss, if any recorded one."""
    scored = [(s["val_loss"], p) for p in list_checkpoints(run_dir)
              if (s := state_or_empty(p)).get("val_loss") is not None]
    return min(scored)[1] if scored else None


def read_checkpoint_config(ckpt: str | Path):
    """The checkpoint's :class:`text2llm.config.Config` (from its config.toml)."""
    return load_config(Path(ckpt) / "config.toml")


def tokenizer_dir(ckpt: str | Path) -> Path | None:
    tok = Path(ckpt) / "tokenizer"
    return tok if tok.is_dir() else None


def load_tokenizer(ckpt: str | Path) -> Tokenizer:
    """The checkpoint's own copy of its tokenizer (``CKPT/tokenizer``)."""
    return Tokenizer.load(Path(ckpt) / "tokenizer")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Path]:
    """``(float Transformer in eval mode, the checkpoint dir)`` from a checkpoint or run dir.

    Float checkpoints only: an int8 dir (``quant.json``) is a one-line error; the loader of every
    kind of dir, int8 included, is :func:`text2llm.load` (:mod:`text2llm.artifacts`).
    """
    ckpt = resolve_checkpoint(path)
    if is_int8(ckpt):
        raise UserError(f"{ckpt}: an int8 checkpoint; this needs the float checkpoint it was quantized from")
    model = Transformer(read_checkpoint_config(ckpt).model)
    load_weights(model, ckpt / WEIGHTS)
    return model.to(device).eval(), ckpt


# ---- weights ---------------------------------------------------------------------------------


def model_state(model: torch.nn.Module | dict, tie_embeddings: bool | None = None) -> dict[str, torch.Tensor]:
    """The state dict to save: tied weights stored once, tensors contiguous and on CPU.

    ``model`` is the unwrapped module or an already gathered full state dict (FSDP2);
    ``tie_embeddings`` defaults to the module's ``cfg.tie_embeddings``.
    """
    if isinstance(model, dict):
        sd = dict(model)
    else:
        sd = model.state_dict()
        if tie_embeddings is None:
            tie_embeddings = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    if tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_weights(model: torch.nn.Module | dict, path: Path, metadata: dict | None = None,
                 tie_embeddings: bool | None = None) -> None:
    save_file(model_state(model, tie_embeddings), str(path),
              metadata={k: str(v) for k, v in (metadata or {}).items()})


def save_weights_streamed(path: Path, tensors: dict[str, tuple[torch.Size, torch.dtype]],
                          read: Callable[[str], torch.Tensor], metadata: dict | None = None) -> None:
    """The file :func:`save_weights` writes, byte for byte, holding one tensor in memory at a time.

    ``tensors``: name -> (shape, dtype) of every tensor to store; ``read(name)`` returns one of
    them (e.g. from a sharded checkpoint's files). The header is laid out as safetensors lays it
    out (its order comes from safetensors itself, serializing empty tensors of the same names and
    dtypes); the data follows in that order.
    """
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    probe = save({name: torch.empty(0, dtype=dtype) for name, (_, dtype) in tensors.items()}, metadata=metadata)
    n = struct.unpack("<Q", probe[:8])[0]
    header = json.loads(probe[8 : 8 + n])  # {"__metadata__": ..., name: {dtype, shape, data_offsets}} in file order
    offset = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape, dtype = tensors[name]
        size = shape.numel() * dtype.itemsize
        entry["shape"], entry["data_offsets"] = list(shape), [offset, offset + size]
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to a multiple of 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in header:
            if name != "__metadata__":
                t = read(name).detach().to("cpu").contiguous()
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into ``model``; a one-line :class:`UserError` when they do not fit it."""
    sd = load_file(str(path))
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise UserError(f"{path}: weights do not match the model config ({str(e).splitlines()[-1].strip()})") from None
    allowed_missing = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise UserError(f"{path}: weights do not match the model (missing {sorted(set(missing) - allowed_missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]})")


def write_checkpoint_dir(out: Path, model: torch.nn.Module, cfg, tokenizer_src: Path | None, state: dict,
                         metadata: dict | None = None) -> Path:
    """A checkpoint dir every command loads: model.safetensors + config.toml + state.json + tokenizer/.

    For the stages that produce a model outside training (pruning, ``import hf``); ``out`` is
    normally a staging dir (:func:`text2llm.files.staged_output`). ``metadata``: the safetensors
    header's (default: the state's step).
    """
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / WEIGHTS, metadata if metadata is not None else {"step": state.get("step", 0)})
    (out / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    (out / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    if tokenizer_src is not None and not (out / "tokenizer").exists():
        shutil.copytree(tokenizer_src, out / "tokenizer")
    return out
