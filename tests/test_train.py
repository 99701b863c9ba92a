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
    if mode == "padded":
        meta["row_len"] = seq_len + 1
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
    from text2llm.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_tokens(tmp_path_factory.mktemp("tok") / "tokens")


# ---- end to end ------------------------------------------------------------------------------


def test_loss_falls_and_run_dir_is_complete(tokens, tmp_path):
    from text2llm.metrics import read_metrics
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


# ---- the CLI with a real tokenizer: samples, TensorBoard, inference from the run dir ----------


ASSET = Path(__file__).resolve().parents[1] / "src" / "text2llm" / "assets" / "tinystories" / "train-000.jsonl.gz"


@pytest.fixture(scope="module")
def story_tokens(tmp_path_factory) -> Path:
    import gzip

    from text2llm.config import Config
    from text2llm.pack import pack
    from text2llm.tokenizer import train_tokenizer

    texts = []
    with gzip.open(ASSET, "rt", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if sum(map(len, texts)) > 40_000:
                break
    root = tmp_path_factory.mktemp("stories")
    cfg = Config()
    cfg.tokenizer.vocab_size = 384
    cfg.tokenizer.threads = 1
    train_tokenizer(texts, root / "tok", cfg.tokenizer)
    cfg.pack.val_fraction = 0.1
    pack(texts, root / "tok", root / "tokens", cfg.pack, progress=False)
    return root / "tokens"


def test_cli_train_writes_samples_tensorboard_and_a_loadable_run(story_tokens, tmp_path, capsys):
    import text2llm
    from text2llm.cli import main

    run = tmp_path / "run"
    over = ["model.d_model=32", "model.n_layer=2", "model.n_head=4", "model.max_seq_len=64", "train.seq_len=64",
            "train.max_steps=6", "train.warmup_steps=1", "train.batch_size=4", "train.eval_every=3", "train.log_every=2",
            "train.samples=1", "train.sample_tokens=8", "train.eval_batches=2", "train.threads=1",
            "train.peak_flops=1e11"]
    assert main(["train", "--data", str(story_tokens), "--out", str(run), *over]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "MFU" in out  # the summary table
    samples = (run / "samples.txt").read_text(encoding="utf-8")
    assert samples.count("--- step ") == 2 and "Once upon a time" in samples
    if pytest.importorskip("tensorboard"):
        assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "loss.png").is_file()
    model, tok = text2llm.load(run)
    assert model(torch.tensor([[tok.bos_id] + tok.encode("Once")])).logits.shape[-1] == model.cfg.vocab_size
    # --resume on a finished run with a larger max_steps continues it
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "-q", "train.max_steps=8"]) == 0
    assert max(losses(run)) == 8
    assert "train.max_steps: 6 -> 8" in capsys.readouterr().out  # a changed config is pointed out


def test_padding_is_ignored_and_document_mask_is_used(tmp_path):
    from text2llm.train.trainer import train

    padded = make_tokens(tmp_path / "padded", n_train=6000, n_val=1000, mode="padded", seq_len=32)
    r = train(tiny_config(max_steps=4), padded, tmp_path / "p", progress=False)
    assert r.step == 4 and all(math.isfinite(v) for v in losses(tmp_path / "p").values())
    packed = make_tokens(tmp_path / "packed", n_train=6000, n_val=1000)
    a = train(tiny_config(max_steps=2), packed, tmp_path / "a", progress=False)
    b = train(tiny_config(max_steps=2, document_mask=True), packed, tmp_path / "b", progress=False)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la[1] != lb[1] and abs(la[1] - lb[1]) < 0.1  # same data and init, attention cut at BOS
    assert a.step == b.step == 2


def test_moe_aux_loss_and_expert_load_are_logged(tokens, tmp_path):
    from text2llm.model.config import ModelConfig
    from text2llm.metrics import read_metrics
    from text2llm.train.trainer import train

    if "n_experts" not in ModelConfig.model_fields:
        pytest.skip("this model has no MoE")
    cfg = tiny_config(max_steps=3)
    cfg.model.n_experts, cfg.model.moe_top_k = 4, 2
    train(cfg, tokens, tmp_path / "moe", progress=False)
    rec = [r for r in read_metrics(tmp_path / "moe") if "loss" in r][-1]
    assert rec["aux_loss"] > 0
    assert len(rec["expert_load"]) == 2 and all(abs(sum(row) - 1) < 1e-3 for row in rec["expert_load"])
    assert rec["expert_load_max_ratio"] >= 1.0


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    from text2llm.train import mfu

    assert mfu.measure_matmul_flops(n=128, repeats=2) > 1e8
    calls = []
    monkeypatch.setattr(mfu, "measure_matmul_flops", lambda *a, **k: calls.append(1) or 5e10)
    cache = tmp_path / "peak.json"
    assert mfu.cpu_peak_flops(cache) == 5e10
    assert mfu.cpu_peak_flops(cache) == 5e10
    assert len(calls) == 1 and f"threads={torch.get_num_threads()}" in cache.read_text()
    peak, src = mfu.device_peak_flops(torch.device("cpu"), 0.0, cache)
    assert peak == 5e10 and "measured" in src
    assert mfu.device_peak_flops(torch.device("cpu"), 1e12)[0] == 1e12


def test_metrics_helpers(tmp_path):
    from text2llm.metrics import MetricsWriter, plot_curves, read_metrics, truncate_metrics

    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in range(1, 6):
        w.write({"step": s, "loss": 5.0 / s, "lr": 0.1})
    w.write({"step": 5, "val_loss": 1.5})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a torn line from a crash
    assert len(read_metrics(tmp_path)) == 6
    truncate_metrics(tmp_path / "metrics.jsonl", 3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert plot_curves(tmp_path / "metrics.jsonl", tmp_path / "loss.png").stat().st_size > 1000
    assert plot_curves([], tmp_path / "empty.png") is None


def test_evaluate_tokens_skips_padding(tmp_path):
    from text2llm.evaluate import evaluate_tokens
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer

    padded = make_tokens(tmp_path / "padded", n_train=2000, n_val=1000, mode="padded", seq_len=32)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=16, n_layer=1, n_head=2, max_seq_len=32)).eval()
    res = evaluate_tokens(model, padded)
    import numpy as np

    rows = np.fromfile(padded / "val-00000.bin", dtype=np.uint16).reshape(-1, 33)
    assert res["tokens"] == int((rows[:, 1:] != 0).sum())  # every non-pad target, and no pad target
