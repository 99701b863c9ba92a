"""Checkpoints: atomic, self-describing, never pickled.

``RUN/checkpoints/step_0000100/`` holds::

    model.safetensors   the unwrapped model's weights (a tied lm_head is stored once, as embed)
    optimizer.pt        optimizer state (tensors and numbers only; loaded with weights_only=True)
    state.json          step, tokens seen, loader state, RNG states, val loss, config hash
    config.toml         the fully resolved config (model shape included)
    tokenizer/          a copy of the tokenizer, so the dir alone can evaluate, generate, export

A checkpoint is written to ``.tmp-step_...`` and renamed when complete, so a crash mid-write
never leaves a half checkpoint under a real name. Retention keeps the last K and the best one.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from text2llm.errors import UserError

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d+)$")


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
    from safetensors.torch import save_file

    save_file(model_state(model, tie_embeddings), str(path),
              metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise UserError(f"{path}: weights do not match the model config ({str(e).splitlines()[-1].strip()})") from None
    allowed_missing = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise UserError(f"{path}: weights do not match the model (missing {sorted(set(missing) - allowed_missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]})")


# ---- RNG state as JSON -------------------------------------------------------------------------


def rng_state() -> dict:
    state = {
        "python": _b64(json.dumps(random.getstate()).encode()),
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    py = json.loads(base64.b64decode(state["python"]))
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


# ---- save / find / load -----------------------------------------------------------------------


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module | dict, optimizer, state: dict,
                    config_toml: str, tokenizer_dir: Path | None, keep_last: int = 2, keep_best: bool = True,
                    tie_embeddings: bool | None = None) -> Path:
    """Write ``checkpoints/step_{step:07d}`` atomically and apply retention. Returns its path.

    ``model`` is the unwrapped module or a full state dict; ``optimizer`` an optimizer, its state
    dict, or None. Files go to ``.tmp-step_...`` (state.json last), are fsynced, and the dir is
    renamed into place; a process killed at any moment leaves either the old set of checkpoints or
    the new one, never a half checkpoint under a real name.
    """
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(model, tmp / "model.safetensors", {"step": step}, tie_embeddings)
    if optimizer is not None:
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "config.toml").write_text(config_toml, encoding="utf-8")
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    state = {**state, "step": step}
    state.setdefault("rng", rng_state())
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    for f in tmp.iterdir():
        if f.is_file():
            _fsync(f)
    _fsync(tmp)
    old = root / f".old-step_{step:07d}"
    if final.exists():  # re-saving the same step (e.g. a resumed run that ends where it started)
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _fsync(root)
    shutil.rmtree(old, ignore_errors=True)
    _apply_retention(root, keep_last, keep_best)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run dir, oldest first (temporary dirs of a crash are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _apply_retention(root: Path, keep_last: int, keep_best: bool = True) -> None:
    ckpts = list_checkpoints(root.parent)
    best, best_loss = None, float("inf")
    for p in ckpts:
        loss = _read_state(p).get("val_loss")
        if keep_best and loss is not None and loss < best_loss:
            best, best_loss = p, loss
    keep = set(ckpts[-keep_last:]) | ({best} if best else set())
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for pattern in (".tmp-step_*", ".old-step_*"):  # leftovers of a crash
        for p in root.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def best_checkpoint(run_dir: Path) -> Path | None:
    """The kept checkpoint with the lowest val loss, if any recorded one."""
    scored = [(s["val_loss"], p) for p in list_checkpoints(run_dir)
              if (s := _read_state(p)).get("val_loss") is not None]
    return min(scored)[1] if scored else None


def read_state(ckpt: Path) -> dict:
    """A checkpoint's state.json (step, tokens seen, loader and RNG states, ...)."""
    path = Path(ckpt) / "state.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read checkpoint state ({e})") from None


def _read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir itself, or the latest checkpoint of a run dir (or of ``RUN/train`` from ``text2llm run``)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such checkpoint or run dir")
    if (p / "model.safetensors").is_file() or (p / "quant.json").is_file():
        return p
    for run in (p, p / "train"):
        for ckpt in reversed(list_checkpoints(run)):  # newest complete one
            if (ckpt / "model.safetensors").is_file() and _read_state(ckpt):
                return ckpt
    raise UserError(f"{p}: not a checkpoint dir (no model.safetensors) and holds no checkpoints/step_*")


def read_checkpoint_config(ckpt: Path):
    from text2llm.config import load_config

    return load_config(ckpt / "config.toml")


def load_for_inference(path: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer) from a checkpoint or run dir."""
    from text2llm.model.transformer import Transformer
    from text2llm.tokenizer import Tokenizer

    ckpt = resolve_checkpoint(path)
    if (ckpt / "quant.json").is_file():
        from text2llm.compress.quantize import load_quantized

        return load_quantized(ckpt)
    cfg = read_checkpoint_config(ckpt)
    model = Transformer(cfg.model)
    load_weights(model, ckpt / "model.safetensors")
    model.to(device).eval()
    return model, Tokenizer.load(ckpt / "tokenizer")
