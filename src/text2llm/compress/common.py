"""Helpers shared by the compression commands: load an fp32 checkpoint, prepare the out dir,
find token shards for the report, write a plain checkpoint dir."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from text2llm.errors import UserError


@dataclass
class Source:
    """An fp32 checkpoint and everything needed to rebuild or re-save it."""

    ckpt: Path
    cfg: object  # text2llm.config.Config
    config_toml: str
    model: torch.nn.Module
    tokenizer_dir: Path | None

    def fresh_model(self) -> torch.nn.Module:
        """A new copy of the model with the checkpoint's weights (the original stays untouched)."""
        from text2llm.model.transformer import Transformer
        from text2llm.train.checkpoint import load_weights

        model = Transformer(self.cfg.model)
        load_weights(model, self.ckpt / "model.safetensors")
        return model.eval()


def load_fp32(path: str | Path) -> Source:
    """The float checkpoint behind ``path`` (a checkpoint dir or a run dir); refuses int8 input."""
    from text2llm.train.checkpoint import read_checkpoint_config, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    if (ckpt / "quant.json").is_file():
        raise UserError(f"{ckpt}: already an int8 checkpoint; compress the float checkpoint it came from")
    cfg = read_checkpoint_config(ckpt)
    tok = ckpt / "tokenizer"
    src = Source(ckpt=ckpt, cfg=cfg, config_toml=(ckpt / "config.toml").read_text(encoding="utf-8"), model=None,
                 tokenizer_dir=tok if tok.is_dir() else None)
    src.model = src.fresh_model()
    return src


def prepare_out(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: output dir is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_data_dir(ckpt: Path) -> Path | None:
    """The token shards a checkpoint was trained on (``RUN/run.json`` beside ``RUN/checkpoints/``)."""
    for run in (ckpt.parent.parent, ckpt):
        info = run / "run.json"
        if info.is_file():
            try:
                data = Path(json.loads(info.read_text(encoding="utf-8"))["data"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            if (data / "meta.json").is_file():
                return data
    return None


def report_data(ckpt: Path, data: str | Path | None) -> Path | None:
    """``--data`` if given (checked), else the checkpoint's own training data if it still exists."""
    if data is not None:
        data = Path(data)
        if not (data / "meta.json").is_file():
            raise UserError(f"{data}: not a token shards dir (no meta.json); give the output of `text2llm pack`")
        return data
    found = run_data_dir(ckpt)
    if found is None:
        print(f"note: no --data and no training data recorded for {ckpt}; the report has no val loss / bits-per-byte")
    return found


def save_plain_checkpoint(model: torch.nn.Module, cfg, out: Path, tokenizer_dir: Path | None, state: dict) -> Path:
    """A checkpoint dir that every command loads: model.safetensors + config.toml + state.json + tokenizer/."""
    from text2llm.train.checkpoint import save_weights

    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "model.safetensors", {"step": state.get("step", 0)})
    (out / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    (out / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    if tokenizer_dir is not None and not (out / "tokenizer").exists():
        shutil.copytree(tokenizer_dir, out / "tokenizer")
    return out
