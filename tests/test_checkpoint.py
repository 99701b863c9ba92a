"""Checkpoints: exact resume (bitwise on CPU), SIGTERM saves and exits cleanly, SIGKILL during a
write leaves the previous checkpoint loadable and chosen, non-finite steps, retention, init_from,
and model.safetensors written from sharded (DCP) files equal to the gathered one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train import losses, make_tokens, tiny_config

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_tokens(tmp_path_factory.mktemp("tok") / "tokens")


@pytest.fixture(scope="module")
def reference(tokens, tmp_path_factory) -> Path:
    """An uninterrupted 8-step run with checkpoints at 4 and 8."""
    from text2llm.train.trainer import train

    run = tmp_path_factory.mktemp("ref") / "run"
    train(tiny_config(max_steps=8, checkpoint_every=4, eval_every=4), tokens, run, progress=False)
    return run


def _weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def test_resume_is_bitwise_equal_to_uninterrupted(reference, tmp_path):
    from text2llm.train.trainer import train

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / "step_0000008")  # as if the run had stopped after step 4
    result = train(tiny_config(max_steps=8, checkpoint_every=4, eval_every=4), tokens_dir(reference), run,
                   resume=True, progress=False)
    assert result.step == 8
    ref, got = losses(reference), losses(run)
    assert sorted(got) == list(range(1, 9))  # metrics after step 4 were rewritten, not duplicated
    assert [got[s] for s in range(5, 9)] == [ref[s] for s in range(5, 9)]  # bitwise
    a, b = _weights(reference / "checkpoints" / "step_0000008"), _weights(run / "checkpoints" / "step_0000008")
    assert all(torch.equal(a[k], b[k]) for k in a)


def tokens_dir(run: Path) -> Path:
    return Path(json.loads((run / "run.json").read_text())["data"])


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "text2llm", "train", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _overrides(**train):
    cfg = tiny_config(**train)
    over = [f"model.{k}={getattr(cfg.model, k)}" for k in ("d_model", "n_layer", "n_head", "max_seq_len")]
    return over + [f"train.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in cfg.train.model_dump().items()
                   if isinstance(v, (int, float, bool)) and v != type(cfg.train).model_fields[k].default]


def test_sigterm_saves_a_checkpoint_and_resume_matches_uninterrupted(tokens, tmp_path):
    from text2llm.metrics import read_metrics
    from text2llm.train.trainer import train

    steps = 50
    over = _overrides(max_steps=steps, warmup_steps=2)
    run = tmp_path / "run"
    p = _cli(["--data", str(tokens), "--out", str(run), "-q", *over])
    deadline = time.time() + 60
    while time.time() < deadline and len([r for r in read_metrics(run) if "loss" in r]) < 5:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "Traceback" not in err
    stopped = max(losses(run))
    assert 5 <= stopped < steps
    assert (run / "checkpoints" / f"step_{stopped:07d}" / "state.json").is_file()
    assert "--resume" in out
    p = _cli(["--resume", str(run), "-q"])
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    ref_run = tmp_path / "ref"
    train(tiny_config(max_steps=steps, warmup_steps=2), tokens, ref_run, progress=False)
    ref, got = losses(ref_run), losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    assert got == ref  # every step bitwise, across processes


KILLER = """
import os, signal, sys
from pathlib import Path
from text2llm.train import checkpoint as C
from test_train import tiny_config
real = C.save_weights
def dying(model, path, *a, **kw):
    if "0000008" in str(path):            # the second checkpoint: die with half a file written
        Path(path).write_bytes(b"half a safetensors file")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(model, path, *a, **kw)
C.save_weights = dying
from text2llm.train.trainer import train
train(tiny_config(max_steps=8, checkpoint_every=4, eval_every=4), sys.argv[1], sys.argv[2], progress=False)
"""


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tokens, reference, tmp_path):
    from text2llm.model.transformer import Transformer
    from text2llm.checkpoint import load_weights, read_checkpoint_config, resolve_checkpoint
    from text2llm.train.trainer import train

    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", KILLER, str(tokens), str(run)], env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    ck = run / "checkpoints"
    assert (ck / ".tmp-step_0000008").is_dir() and not (ck / "step_0000008").exists()
    chosen = resolve_checkpoint(run)
    assert chosen == ck / "step_0000004"
    model = Transformer(read_checkpoint_config(chosen).model)
    load_weights(model, chosen / "model.safetensors")  # loadable
    result = train(tiny_config(max_steps=8, checkpoint_every=4, eval_every=4), tokens, run, resume=True, progress=False)
    assert result.step == 8 and not (ck / ".tmp-step_0000008").exists()  # the leftover is cleaned up
    assert losses(run) == losses(reference)


def test_nonfinite_steps_are_skipped_then_the_run_stops(tokens, tmp_path):
    from text2llm.errors import UserError
    from text2llm.loss import lm_loss
    from text2llm.train.trainer import train

    calls = {"n": 0}

    def sometimes_nan(model, x, y):
        calls["n"] += 1
        loss = lm_loss(model(x).logits, y)
        return (loss * float("nan") if calls["n"] in (3, 5, 7) else loss), {}

    r = train(tiny_config(max_steps=8, max_bad_steps=4), tokens, tmp_path / "a", progress=False, loss_fn=sometimes_nan)
    assert r.step == 8 and r.skipped_steps == 3
    assert sorted(losses(tmp_path / "a")) == [1, 2, 4, 6, 8]  # skipped steps are not logged
    w = _weights(r.last_checkpoint)
    assert all(torch.isfinite(v).all() for v in w.values())

    calls["n"] = 0
    with pytest.raises(UserError, match="non-finite"):
        train(tiny_config(max_steps=8, max_bad_steps=2, checkpoint_every=2), tokens, tmp_path / "b", progress=False,
              loss_fn=sometimes_nan)
    ck = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step_0000002", "step_0000004"]
    assert all(torch.isfinite(v).all() for v in _weights(ck / "step_0000004").values())


def test_retention_keeps_last_k_and_the_best(tmp_path):
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer
    from text2llm.checkpoint import best_checkpoint, list_checkpoints
    from text2llm.train.checkpoint import save_checkpoint

    model = Transformer(ModelConfig(vocab_size=20, d_model=16, n_layer=1, n_head=2, max_seq_len=8))
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, None)]:
        save_checkpoint(tmp_path, step, model, None, {"val_loss": val}, "", None, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002", "step_0000004", "step_0000005"]
    assert best_checkpoint(tmp_path).name == "step_0000002"
    save_checkpoint(tmp_path, 6, model, None, {}, "", None, keep_last=1, keep_best=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000006"]
    w = save_checkpoint(tmp_path, 6, model, None, {}, "", None, keep_last=1)  # re-saving a step replaces it
    assert (w / "model.safetensors").is_file() and not list(w.parent.glob(".old-*"))
    state = json.loads((w / "state.json").read_text())
    assert "lm_head.weight" not in _weights(w) and state["step"] == 6 and "rng" in state


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_weights_written_from_dcp_shards_are_the_gathered_file(tmp_path):
    """consolidate: model.safetensors from a torch.distributed.checkpoint dir, one tensor at a time,
    is byte for byte what save_weights writes from the whole state dict (tied head once, any dtype)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from text2llm.checkpoint import save_weights
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer
    from text2llm.train.checkpoint import consolidate

    model = Transformer(ModelConfig(vocab_size=20, d_model=16, n_layer=2, n_head=2, max_seq_len=8))
    sd = {**model.state_dict(), "extra.half": torch.randn(3, 5).bfloat16(), "extra.count": torch.tensor(7)}
    dcp.save({"model": sd, "optimizer": {"lr": 0.1}}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    consolidate(tmp_path / "dcp", tmp_path / "streamed.safetensors", {"step": 3}, tie_embeddings=True)
    save_weights(sd, tmp_path / "gathered.safetensors", {"step": 3}, tie_embeddings=True)
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "gathered.safetensors").read_bytes()
    streamed = load_file(str(tmp_path / "streamed.safetensors"))
    assert "lm_head.weight" not in streamed and torch.equal(streamed["embed.weight"], sd["embed.weight"])


def test_init_from_starts_a_new_run_from_weights(reference, tokens, tmp_path):
    from text2llm.errors import UserError
    from text2llm.train.trainer import train

    first = losses(reference)[1]
    r = train(tiny_config(max_steps=2, lr=1e-9, min_lr=0.0, warmup_steps=0), tokens, tmp_path / "ft", progress=False,
              init_from=reference)
    got = losses(tmp_path / "ft")
    assert r.step == 2 and sorted(got) == [1, 2]
    assert got[1] < first - 0.3  # starts where the reference ended, not from a random init
    # the key form; a run started from init_from resumes from its own checkpoint
    cfg = tiny_config(max_steps=2, init_from=str(reference))
    train(cfg, tokens, tmp_path / "ft2", progress=False)
    assert losses(tmp_path / "ft2")[1] < first - 0.3
    r = train(tiny_config(max_steps=3, init_from=str(reference)), tokens, tmp_path / "ft2", resume=True, progress=False)
    assert r.step == 3
    with pytest.raises(UserError, match="do not match"):
        cfg = tiny_config(max_steps=1)
        cfg.model.d_model = 64
        train(cfg, tokens, tmp_path / "bad", progress=False, init_from=reference)


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_at_step_0(reference, tmp_path, capsys):
    from text2llm.cli import main
    from text2llm.metrics import read_metrics

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints")  # killed before its first checkpoint: config.toml, run.json, metrics, no checkpoint
    assert main(["train", "--resume", str(run), "-q"]) == 0
    out = capsys.readouterr().out
    assert f"note: {run} holds no checkpoint yet; starting it from step 0 with its saved config" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004", "step_0000008"]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 9))  # the killed attempt's dropped
    assert losses(run) == losses(reference)  # from step 0 with the saved config: the same run, bitwise
    a, b = _weights(reference / "checkpoints" / "step_0000008"), _weights(run / "checkpoints" / "step_0000008")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_dir_that_is_not_a_run_is_refused(tokens, tmp_path, capsys):
    from text2llm.cli import main
    from text2llm.errors import UserError
    from text2llm.train.trainer import train

    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty"), "-q"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    (tmp_path / "empty" / "config.toml").write_text("")  # a config but no run.json: not a run dir either
    with pytest.raises(UserError, match="holds no checkpoints"):
        train(tiny_config(max_steps=1), tokens, tmp_path / "empty", resume=True, progress=False)
    with pytest.raises(UserError, match="no such checkpoint or run dir"):
        train(tiny_config(max_steps=1), tokens, tmp_path / "missing", resume=True, progress=False)
