"""Shared fixtures: tiny corpora cut from the bundled TinyStories sample, tiny configs.

Every test is seeded and uses models of a few thousand parameters, so the whole suite runs on a
2-core CPU in minutes. ``HF_HUB_OFFLINE=1`` is set for every test: nothing may come from a hub.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "text2llm" / "assets" / "tinystories"
SHARED_DATA = REPO.parent / "shared" / "data"

# A tiny but real pipeline: small vocab, 2-layer model, a few dozen steps.
TINY_OVERRIDES = [
    "tokenizer.vocab_size=512",
    "model.d_model=64", "model.n_layer=2", "model.n_head=4", "model.max_seq_len=64",
    "train.seq_len=64", "train.batch_size=8", "train.max_steps=40", "train.warmup_steps=5",
    "train.lr=3e-3", "train.min_lr=3e-4", "train.eval_every=20", "train.eval_batches=4", "train.log_every=5",
    "train.threads=1", "pack.val_fraction=0.05", "generate.max_new_tokens=20",
]


def tiny_stories(n: int) -> list[dict]:
    """The first ``n`` records of the bundled TinyStories sample."""
    out = []
    with gzip.open(ASSETS / "train-000.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="session")
def stories_jsonl(tmp_path_factory) -> Path:
    """400 TinyStories (~500 KB) as a .jsonl.gz file."""
    path = tmp_path_factory.mktemp("corpus") / "stories.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for rec in tiny_stories(400):
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, stories_jsonl) -> Path:
    """One end-to-end ``text2llm run`` on the tiny corpus, shared by the tests that read its outputs."""
    from text2llm.cli import main

    out = tmp_path_factory.mktemp("run") / "out"
    rc = main(["run", "--out", str(out), "-q", f"run.inputs=[\"{stories_jsonl}\"]", *TINY_OVERRIDES])
    assert rc == 0
    return out
