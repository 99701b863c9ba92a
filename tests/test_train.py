"""The trainer on tiny synthetic token shards: loss falls, schedules, parameter groups, clipping,
accumulation == one big batch, exact resume, non-finite steps, run-dir refusal, metrics and plots.

``make_tokens`` (also used by the checkpoint and distributed tests) writes a token dir in the
format of ``text2llm pack`` without a tokenizer: documents follow a simple rule (each token is a
fixed function of the previous one, with a little noise), so a 2-layer model learns it in steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

VOCAB = 64


def make_tokens(root: Path, n_train: int = 12_000, n_val: int = 2_000, seed: int = 0, mode: str = "packed",
                seq_len: int = 32) -> Path:
    """A token dir (meta.json + train/val .bin) of synthetic documents BOS ... EOS (pad = 0)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        out, docs = [], 0
        while sum(map(len, out)) < n:
            length = int(rng.integers(8, 40))
            t = int(rng.integers(3, VOCAB))
            doc = [1]
            for _ in range(length):
                doc.append(t)
                t = (t * 5 + 7) % (VOCAB - 3) + 3 if rng.random() > 0.1 else int(rng.integers(3, VOCAB))
            doc.append(2)
            if mode == "padded":
                doc = (doc + [0] * seq_len)[:seq_len + 1]
            out.append(doc)
            docs += 1
        arr = np.array([t for d in out for t in d], dtype=np.uint16)
        arr.tofile(root / f"{split}-00000.bin")
        splits[split] = {"shards": [f"{split}-00000.bin"], "tokens": int(arr.size), "bytes": int(arr.size) * 3,
                         "documents": docs}
    meta = {"format": "text2llm-tokens/1", "mode": mode, "dtype": "uint16", "vocab_size": VOCAB, "bos_id": 1,
            "eos_id": 2, "pad_id": 0, "tokenizer_fingerprint": "synthetic", "tokenizer_dir": str(root / "no-tokenizer"),
            "splits": splits}
    (root / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def tiny_config(**train):
    """A ~30k-parameter model and a short run; ``train`` overrides [train] keys."""
    from text2llm.config import load_config

    base = {"max_steps": 8, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
            "eval_every": 0, "eval_batches": 2, "log_every": 1, "checkpoint_every": 0, "threads": 1,
            "tensorboard": False, "plot": False, "peak_flops": 1e11, "samples": 0}
    base.update(train)
    over = [f"model.{k}={v}" for k, v in {"d_model": 32, "n_layer": 2, "n_head": 4, "max_seq_len": 32}.items()]
    over += [f"train.{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
             for k, v in base.items()]
    return load_config(None, over)


def losses(run_dir: Path) -> dict[int, float]:
    from text2llm.report import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_tokens(tmp_path_factory.mktemp("tok") / "tokens")


# ---- end to end ------------------------------------------------------------------------------


def test_loss_falls_and_run_dir_is_complete(tokens, tmp_path):
    from text2llm.report import read_metrics
    from text2llm.train.trainer import train

    cfg = tiny_config(max_steps=40, eval_every=20, log_every=5, checkpoint_every=20, plot=True, lr=1e-2)
    r = train(cfg, tokens, tmp_path / "run", progress=False)
    recs = read_metrics(tmp_path / "run")
    train_recs = [x for x in recs if "loss" in x]
    assert [x["step"] for x in train_recs] == [5, 10, 15, 20, 25, 30, 35, 40]
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "mem_mib", "tokens_seen"):
        assert key in train_recs[0], key
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] - 0.5
    assert r.val_loss is not None and r.val_loss < math.log(VOCAB) - 0.5
    assert [x["step"] for x in recs if "val_loss" in x] == [20, 40]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "config.toml").is_file()
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step_0000020", "step_0000040"]
    assert r.last_checkpoint.name == "step_0000040" and r.step == 40
    state = json.loads((r.last_checkpoint / "state.json").read_text())
    for key in ("step", "tokens_seen", "loaders", "rng", "config_hash", "val_loss", "world_size"):
        assert key in state, key
    assert r.train_tokens_per_s > 0 and r.params > 0 and r.mfu > 0


def test_existing_run_dir_is_refused_without_resume_or_overwrite(tokens, tmp_path):
    from text2llm.errors import UserError
    from text2llm.train.trainer import train

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        train(tiny_config(max_steps=1), tokens, tmp_path / "run", progress=False)
    train(tiny_config(max_steps=1), tokens, tmp_path / "run", overwrite=True, progress=False)
    assert not (tmp_path / "run" / "something").exists()
