"""End to end: `text2llm run` on a tiny slice, then every verb on its outputs."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from text2llm.cli import main


def test_run_writes_every_stage(tiny_run):
    out = tiny_run
    # clean
    stats = json.loads((out / "clean" / "stats.json").read_text())
    assert stats["docs_out"] > 300 and (out / "clean" / "clean-00000.jsonl.gz").is_file()
    with gzip.open(out / "clean" / "clean-00000.jsonl.gz", "rt", encoding="utf-8") as f:
        rec = json.loads(f.readline())
    assert set(rec) >= {"id", "text", "source"}
    # tokenizer
    meta_tok = json.loads((out / "tokenizer" / "text2llm-tokenizer.json").read_text())
    assert meta_tok["vocab_size"] == 512 and meta_tok["special_ids"] == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
    # tokens
    meta = json.loads((out / "tokens" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["splits"]["train"]["tokens"] > 10_000
    assert meta["splits"]["val"]["documents"] >= 1
    # train: resolved config, metrics, checkpoint
    run = out / "train"
    assert (run / "config.toml").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    # it learned: well below the first logged loss and below a uniform guess over 512 tokens (ln 512 = 6.24)
    assert losses[-1] < losses[0] - 0.5 and losses[-1] < math.log(512) - 1.0, losses
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "model.safetensors").is_file() and (ckpts[-1] / "tokenizer").is_dir()
    # summary
    summary = json.loads((out / "summary.json").read_text())
    for key in ("val_loss", "val_bits_per_byte", "train_tokens_per_s", "params", "stage_seconds"):
        assert key in summary
    assert set(summary["stage_seconds"]) >= {"clean", "tokenizer", "pack", "train", "eval", "generate"}
    assert 0 < summary["val_bits_per_byte"] < 8
    assert summary["sample"].startswith("Once upon a time")


def test_eval_json_fields(tiny_run, capsys, stories_jsonl):
    assert main(["eval", str(tiny_run / "train"), "--data", str(tiny_run / "tokens"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res) >= {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}
    assert res["tokens"] > 0 and res["bytes"] > 0
    assert res["perplexity"] == pytest.approx(2.718281828 ** res["loss"], rel=1e-6)
    # the same checkpoint on raw text (a .txt file)
    txt = tiny_run / "sample.txt"
    txt.write_text("Once upon a time there was a little cat. The cat liked to play.\n", encoding="utf-8")
    assert main(["eval", str(tiny_run / "train"), "--text", str(txt), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bytes"] == len(txt.read_bytes())


def test_generate_same_seed_same_text(tiny_run, capsys):
    args = ["generate", str(tiny_run / "train"), "--prompt", "Once upon a time", "--max-new-tokens", "15"]
    assert main(args + ["--seed", "7"]) == 0
    first = capsys.readouterr().out
    assert main(args + ["--seed", "7"]) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("Once upon a time")
    assert main(args + ["--temperature", "0"]) == 0  # greedy is deterministic without a seed
    g1 = capsys.readouterr().out
    assert main(args + ["--temperature", "0"]) == 0
    assert capsys.readouterr().out == g1


def test_load_public_api(tiny_run):
    import torch

    import text2llm

    model, tok = text2llm.load(tiny_run / "train")
    assert not model.training
    ids = tok.encode("Once upon a time")
    assert ids and tok.bos_id not in ids  # no special tokens unless asked
    assert tok.decode(ids) == "Once upon a time"
    out = model(torch.tensor([ids]))
    logits = getattr(out, "logits", out)
    assert logits.shape == (1, len(ids), tok.vocab_size)


def test_python_dash_m_works(tiny_run):
    r = subprocess.run([sys.executable, "-m", "text2llm", "eval", str(tiny_run / "train"), "--data",
                        str(tiny_run / "tokens"), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "bits_per_byte" in r.stdout


def test_run_refuses_non_empty_out(tiny_run, capsys):
    assert main(["run", "--out", str(tiny_run), "-q"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_process_scaling_reports_both_kinds_of_work():
    """The 2-process ceiling probe the clean and pack benchmarks print (tiny work here: the
    numbers are not checked, only what is reported and that the two processes ran)."""
    from text2llm.workers import process_scaling

    recs = process_scaling(repeats=1, scale=0.01)
    assert [r["work"] for r in recs] == ["python_loop", "numpy_stream"]
    for r in recs:
        assert r["case"] == "machine_scaling" and r["one_process_s"] > 0 and r["two_processes_s"] > 0
        assert 0 < r["speedup_2_procs"] < 10  # 2 x one alone / two at once


def test_run_all_plans_every_cpu_benchmark():
    """`make bench` (benchmarks/run_all.py) runs every CPU benchmark script, in full and quick form,
    and each one it names exists (a new benchmark cannot be left out silently)."""
    import importlib.util

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("run_all", bench / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    scripts = {p.stem for p in bench.glob("*.py")} - {"run_all", "gpu_checks"}  # gpu_checks: benchmarks/gpu.sh
    for quick in (False, True):
        assert set(run_all.plan(quick, None)) == scripts
    assert "--ckpt" in run_all.plan(True, "runs/x/train")["generate"]
