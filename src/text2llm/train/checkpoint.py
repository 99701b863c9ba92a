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
import random
import re
import shutil
from pathlib import Path

import torch

from text2llm.errors import UserError

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d+)$")


# ---- weights ---------------------------------------------------------------------------------


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to save: tied weights stored once, tensors contiguous and on CPU."""
    sd = model.state_dict()
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_weights(model: torch.nn.Module, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file(model_state(model), str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
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


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer, state: dict,
                    config_toml: str, tokenizer_dir: Path | None, keep_last: int = 2) -> Path:
    """Write ``checkpoints/step_{step:07d}`` atomically and apply retention. Returns its path."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(model, tmp / "model.safetensors", {"step": step})
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "config.toml").write_text(config_toml, encoding="utf-8")
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    state = {**state, "step": step, "rng": rng_state()}
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    if final.exists():  # re-saving the same step (e.g. a resumed run that ends where it started)
        shutil.rmtree(final)
    tmp.rename(final)
    _apply_retention(root, keep_last)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _apply_retention(root: Path, keep_last: int) -> None:
    ckpts = list_checkpoints(root.parent)
    best, best_loss = None, float("inf")
    for p in ckpts:
        loss = _read_state(p).get("val_loss")
        if loss is not None and loss < best_loss:
            best, best_loss = p, loss
    keep = set(ckpts[-keep_last:]) | ({best} if best else set())
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step_*"):  # leftovers of a crash
        shutil.rmtree(p, ignore_errors=True)


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
        ckpts = list_checkpoints(run)
        if ckpts:
            return ckpts[-1]
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
