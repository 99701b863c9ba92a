"""Training checkpoints: what resuming needs beyond the format, written atomically.

The format itself (the files of a checkpoint dir, finding one, reading its config, weights in
and out) is :mod:`text2llm.checkpoint`, which every stage reads. Training adds::

    optimizer.pt        optimizer state (tensors and numbers only; loaded with weights_only=True)
    state.json          + loader state, RNG states (as JSON), grad scaler, world size, config hash

A checkpoint is written to ``.tmp-step_...`` and renamed when complete, so a crash mid-write
never leaves a half checkpoint under a real name. Retention keeps the last K and the best one.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path

import torch

from text2llm.checkpoint import CKPT_DIR, list_checkpoints, save_weights, state_or_empty
from text2llm.files import fsync_path


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


# ---- save, with retention ----------------------------------------------------------------------


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
            fsync_path(f)
    fsync_path(tmp)
    old = root / f".old-step_{step:07d}"
    if final.exists():  # re-saving the same step (e.g. a resumed run that ends where it started)
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync_path(root)
    shutil.rmtree(old, ignore_errors=True)
    _apply_retention(root, keep_last, keep_best)
    return final


def _apply_retention(root: Path, keep_last: int, keep_best: bool = True) -> None:
    ckpts = list_checkpoints(root.parent)
    best, best_loss = None, float("inf")
    for p in ckpts:
        loss = state_or_empty(p).get("val_loss")
        if keep_best and loss is not None and loss < best_loss:
            best, best_loss = p, loss
    keep = set(ckpts[-keep_last:]) | ({best} if best else set())
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for pattern in (".tmp-step_*", ".old-step_*"):  # leftovers of a crash
        for p in root.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)
