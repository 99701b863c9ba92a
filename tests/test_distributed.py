"""DDP and FSDP2 under torchrun with 2 gloo processes on CPU (OMP_NUM_THREADS=1).

* DDP, 2 processes x micro-batch 4 == 1 process x 2 micro-batches of 4: same losses (<= 1e-5),
  because micro-batch slot ``rank * grad_accum + i`` reads the same data either way;
* a DDP checkpoint resumes in 1 process with grad_accum=2 (same slots, different world size);
* FSDP2 (fully_shard per block) trains, writes sharded checkpoints (torch.distributed.checkpoint,
  one file per process) with a plain model.safetensors beside them, and resumes from the shards
  exactly, and in one process (DCP reshards them).

Tensor and pipeline parallelism: tests/test_parallel.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import losses, make_tokens, tiny_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = dict(max_steps=8, batch_size=4, checkpoint_every=4, eval_every=4)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def torchrun(tokens: Path, run: Path, *extra: str, resume: bool = False) -> None:
    from test_checkpoint import _overrides

    args = ["--resume", str(run)] if resume else ["--data", str(tokens), "--out", str(run), *_overrides(**TRAIN)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "text2llm", "train", "-q", *args, *extra]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_tokens(tmp_path_factory.mktemp("tok") / "tokens")


@pytest.fixture(scope="module")
def single(tokens, tmp_path_factory) -> Path:
    from text2llm.train.trainer import train

    run = tmp_path_factory.mktemp("single") / "run"
    train(tiny_config(**TRAIN, grad_accum=2), tokens, run, progress=False)
    return run


def _close(a: dict, b: dict, tol: float) -> float:
    assert sorted(a) == sorted(b)
    return max(abs(a[s] - b[s]) for s in a)


def test_ddp_two_processes_match_one_process(tokens, single, tmp_path):
    from text2llm.checkpoint import read_state
    from text2llm.train.trainer import train

    run = tmp_path / "ddp"
    torchrun(tokens, run)
    assert _close(losses(run), losses(single), 1e-5) <= 1e-5
    state = read_state(run / "checkpoints" / "step_0000008")
    assert state["world_size"] == 2 and state["distributed"] == "ddp" and len(state["loaders"]) == 2
    assert len(state["rng_ranks"]) == 2
    # resume the DDP run's step-4 checkpoint in one process with 2 micro-batches per step
    one = tmp_path / "resumed-1proc"
    shutil.copytree(run, one)
    shutil.rmtree(one / "checkpoints" / "step_0000008")
    train(tiny_config(**TRAIN, grad_accum=2), tokens, one, resume=True, progress=False)
    assert _close(losses(one), losses(run), 1e-5) <= 1e-5


def test_fsdp2_trains_checkpoints_plain_weights_and_resumes(tokens, single, tmp_path):
    from safetensors.torch import load_file

    from text2llm.checkpoint import read_state
    from text2llm.train.trainer import train

    run = tmp_path / "fsdp"
    torchrun(tokens, run, "train.distributed=fsdp")
    ref = losses(run)
    assert _close(ref, losses(single), 1e-5) <= 1e-5  # FSDP2 == DDP == one process
    ck = run / "checkpoints" / "step_0000008"
    sd = load_file(str(ck / "model.safetensors"))
    assert "embed.weight" in sd and all(type(v) is torch.Tensor for v in sd.values())  # plain, full tensors
    assert read_state(ck)["optimizer_format"] == "dcp" and not (ck / "optimizer.pt").exists()
    assert sorted(p.name for p in (ck / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    resumed = tmp_path / "fsdp-resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000008")
    torchrun(tokens, resumed, resume=True)
    got = losses(resumed)
    assert sorted(got) == list(range(1, 9))
    assert _close(got, ref, 1e-6) <= 1e-6
    # a different layout reads the shards: the step-4 checkpoint in one process
    one = tmp_path / "fsdp-resumed-1proc"
    shutil.copytree(run, one)
    shutil.rmtree(one / "checkpoints" / "step_0000008")
    train(tiny_config(**TRAIN, grad_accum=2), tokens, one, resume=True, progress=False)
    assert _close(losses(one), ref, 1e-5) <= 1e-5
