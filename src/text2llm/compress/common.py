"""Helpers shared by the compression commands: load an fp32 checkpoint and find token shards for the report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from text2llm.checkpoint import is_int8, load_model, read_checkpoint_config, resolve_checkpoint, tokenizer_dir
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
        return load_model(self.ckpt)[0]


def load_fp32(path: str | Path) -> Source:
    """The float checkpoint behind ``path`` (a checkpoint dir or a run dir); refuses int8 input."""
    ckpt = resolve_checkpoint(path)
    if is_int8(ckpt):
        raise UserError(f"{ckpt}: already an int8 checkpoint; compress the float checkpoint it came from")
    model, ckpt = load_model(ckpt)
    return Source(ckpt=ckpt, cfg=read_checkpoint_config(ckpt), config_toml=(ckpt / "config.toml").read_text(encoding="utf-8"),
                  model=model, tokenizer_dir=tokenizer_dir(ckpt))


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
