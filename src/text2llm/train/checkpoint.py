"""Training checkpoints: what resuming needs beyond the format, written atomically.

The format itself (the files of a checkpoint dir, finding one, reading its config, weights in
and out) is :mod:`text2llm.checkpoint`, which every stage reads. Training adds::

    optimizer.pt        optimizer state (tensors and numbers only; loaded with weights_only=True)
    state.json          + loader state, RNG states (as JSON), grad scaler, world size, config hash

or, from a layout that shards the model (FSDP2, ``train.tp``, ``train.pp``; :func:`save_sharded_checkpoint`)::

    dcp/                model + optimizer state as ``torch.distributed.checkpoint`` wrote it: one
                        file per process holding that process's shards, and .metadata (where each
                        chunk of each tensor lives); read back on any layout (DCP reshards)
    model.safetensors   written by rank 0 from dcp/, one tensor at a time (:func:`consolidate`)
    state.json          as above

A checkpoint is written to ``.tmp-step_...`` and renamed when complete, so a crash mid-write
never leaves a half checkpoint under a real name. Retention keeps the last K and the best one.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as tdist

from text2llm.checkpoint import CKPT_DIR, WEIGHTS, list_checkpoints, save_weights, save_weights_streamed, state_or_empty
from text2llm.files import fsync_path
from text2llm.train import distributed as D

DCP_DIR = "dcp"


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

    ``model`` is the unwrapped module or a full state dict; ``optimizer`` an optimizer or None.
    Files go to ``.tmp-step_...`` (state.json last), are fsynced, and the dir is
    renamed into place; a process killed at any moment leaves either the old set of checkpoints or
    the new one, never a half checkpoint under a real name.
    """
    root, tmp = _staging_dir(run_dir, step)
    save_weights(model, tmp / WEIGHTS, {"step": step}, tie_embeddings)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    return _commit(root, tmp, step, state, config_toml, tokenizer_dir, keep_last, keep_best)


def save_sharded_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer, state: dict | None,
                            config_toml: str, tokenizer_dir: Path | None, env: D.DistEnv, keep_last: int = 2,
                            keep_best: bool = True, tie_embeddings: bool = False) -> Path | None:
    """The same checkpoint from a sharded layout; every rank calls it, and no rank gathers the model.

    Each process writes its own shards of the model and the optimizer into ``.tmp-step_.../dcp``
    (``dcp.save`` of :func:`sharded_state`); after a barrier rank 0 writes ``model.safetensors``
    from those files (:func:`consolidate`), then the rest as :func:`save_checkpoint` does, and
    renames the dir into place. ``state`` is rank 0's; returns the path on rank 0, None elsewhere.
    """
    import torch.distributed.checkpoint as dcp

    root = tmp = None
    if env.is_main:
        root, tmp = _staging_dir(run_dir, step)
    tmp = Path(D.broadcast_object(str(tmp) if tmp else None, env))
    sd = sharded_state(model, optimizer)
    sd["optimizer"] = {k: v for k, v in sd["optimizer"].items() if not _group_names(k)}
    dcp.save(sd, checkpoint_id=tmp / DCP_DIR)
    D.barrier(env)  # every process's shards are on disk
    if not env.is_main:
        return None
    consolidate(tmp / DCP_DIR, tmp / WEIGHTS, {"step": step}, tie_embeddings)
    return _commit(root, tmp, step, state, config_toml, tokenizer_dir, keep_last, keep_best)


def _staging_dir(run_dir: Path, step: int) -> tuple[Path, Path]:
    """``(checkpoints dir, an empty .tmp-step_... in it)``."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return root, tmp


def _commit(root: Path, tmp: Path, step: int, state: dict, config_toml: str, tokenizer_dir: Path | None,
            keep_last: int, keep_best: bool) -> Path:
    """Finish ``tmp`` (config, tokenizer, state.json last), fsync it, rename it to ``step_...``, apply retention."""
    final = root / f"step_{step:07d}"
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


# ---- sharded state: torch.distributed.checkpoint -----------------------------------------------


def has_sharded_state(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_DIR / ".metadata").is_file()


def sharded_state(model: torch.nn.Module, optimizer) -> dict:
    """``{"model": ..., "optimizer": ...}``: what this process holds of both, under the full model's
    parameter names (DTensor shards under FSDP2 / tp, a stage's part under pp, plain tensors on
    one process). The optimizer state is flattened to one key per parameter and field
    (``state.NAME.exp_avg``, ``param_groups.NAME.lr``): pipeline stages hold different groups'
    parameters, and nested per-process group lists would overwrite each other in DCP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer, options=flat)}


def _group_names(key: str) -> bool:
    """A flattened group's ``names`` list (:func:`text2llm.train.optim.param_groups`): not saved, and
    kept from the loading process's own groups, which a different layout splits differently."""
    return key.startswith("param_groups.") and key.endswith(".names")


def load_sharded_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer) -> None:
    """Every rank: load ``CKPT/dcp`` into this process's part of ``model`` and ``optimizer``, whatever
    layout wrote it (``dcp.load`` reads the chunks each local shard needs: resharding)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    sd = sharded_state(model, optimizer)
    names = {k: v for k, v in sd["optimizer"].items() if _group_names(k)}
    sd["optimizer"] = {k: v for k, v in sd["optimizer"].items() if not _group_names(k)}
    with _quiet_single_process():  # (one process: no group, nothing to coordinate)
        dcp.load(sd, checkpoint_id=Path(ckpt) / DCP_DIR, no_dist=not tdist.is_initialized())
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, optimizer, {**sd["optimizer"], **names},
                             options=StateDictOptions(flatten_optimizer_state_dict=True))


def consolidate(dcp_dir: Path, out: Path, metadata: dict, tie_embeddings: bool) -> None:
    """``model.safetensors`` from the model entries of a DCP checkpoint, on one process, without
    collectives: one full tensor at a time is assembled from its chunks (``dcp.load`` of a
    one-tensor state dict reads only that tensor's byte ranges of the shard files) and appended to
    the file. Peak memory: the largest tensor plus its largest saved chunk, not the model. The file
    is the one :func:`text2llm.checkpoint.save_weights` writes from the gathered model, byte for byte
    (a tied head stored once)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = dcp.FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata
    tensors = {key[len("model."):]: (m.size, m.properties.dtype) for key, m in entries.items()
               if key.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    if tie_embeddings:
        tensors.pop("lm_head.weight", None)

    def read(name: str) -> torch.Tensor:
        size, dtype = tensors[name]
        t = torch.empty(size, dtype=dtype)
        with _quiet_single_process():
            dcp.load({"model": {name: t}}, checkpoint_id=dcp_dir, no_dist=True)
        return t

    save_weights_streamed(out, tensors, read, metadata)


@contextmanager
def _quiet_single_process():
    """Without DCP's warning that a load without a process group is meant for one process (it is)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield
