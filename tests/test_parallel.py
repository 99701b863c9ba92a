"""Tensor and pipeline parallelism (train/parallelize.py) under torchrun, gloo on CPU, one thread
per process. Each parallel run is compared with one process training the same micro-batch slots:

* tp=2 (GQA: 4 query heads, 2 KV heads, one per process; sequence parallel, vocab-parallel
  embedding tied to the head, loss parallel) == one process within 1e-5, val loss included; its
  checkpoint is sharded (torch.distributed.checkpoint: one file per process, no full state dict
  and no full weight gathered anywhere), its model.safetensors is byte for byte the file of the
  gathered weights, and it resumes from the shards bitwise on tp=2 and within 1e-5 in one process;
* tp=2 with MoE layers (experts replicated, each expert's MLP split) == one process;
* pp=2 with GPipe and with 1F1B == one process; interleaved 1F1B (4 layers, 2 stages per
  process) == one process, resumes from its shards bitwise on the same layout and continues in
  one process;
* tp=2 x FSDP2 dp=2 on 4 processes (a 2-D mesh) == one process; pp=2 x tp=2 x FSDP2 dp=2 on 8
  processes (the 3-D mesh) == one process;
* tp=2 greedy and seeded generation (`generate --tp 2`) == one process's text;
* `serve --tp 2`: rank 0 answers HTTP, both ranks decode every request; greedy completions (plain
  and streamed) == one process's text, a sampled request without a seed keeps the ranks in step,
  and SIGTERM to rank 0 stops both ranks cleanly (torchrun exits 0);
* layouts that do not fit give one clear line.
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
TRAIN = dict(max_steps=8, batch_size=4, checkpoint_every=4, eval_every=4, grad_accum=2)
NO_TIE = ["model.tie_embeddings=false"]
GQA = ["model.n_kv_head=2"]
MOE = ["model.n_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=32"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


# run as the torchrun entry point instead of `-m text2llm`: the command, with the three ways of
# holding a whole model made to fail (a full state dict, a DTensor's full value beyond a scalar, or
# a Transformer built anywhere but on the meta device)
NO_GATHER = """
import torch
import torch.distributed.checkpoint.state_dict as S
from torch.distributed.tensor import DTensor

def refuse_full(fn):
    def checked(*args, options=None, **kw):
        assert not (options and options.full_state_dict), f"{fn.__name__}: a full state dict was asked for"
        return fn(*args, options=options, **kw)
    return checked

S.get_model_state_dict, S.get_optimizer_state_dict = refuse_full(S.get_model_state_dict), refuse_full(S.get_optimizer_state_dict)
full_tensor = DTensor.full_tensor

def scalars_only(self, **kw):
    assert self.numel() == 1, f"a full {tuple(self.shape)} tensor was gathered"
    return full_tensor(self, **kw)

DTensor.full_tensor = scalars_only

from text2llm.model.transformer import Transformer
eager_init = Transformer.__init__

def meta_only(self, cfg):
    assert torch.empty(()).device.type == "meta", "a whole model was built on a real device"
    eager_init(self, cfg)

Transformer.__init__ = meta_only
from text2llm.cli import entry
entry()
"""


def torchrun(*args: str, nproc: int = 2, entry: tuple[str, ...] = ("-m", "text2llm")) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *entry, *args]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p.stdout


def train_parallel(tokens: Path, run: Path, *over: str, nproc: int = 2, no_gather: bool = False, **train) -> Path:
    from test_checkpoint import _overrides

    entry = ("-m", "text2llm")
    if no_gather:
        (run.parent / "no_gather.py").write_text(NO_GATHER)
        entry = (str(run.parent / "no_gather.py"),)
    torchrun("train", "-q", "--data", str(tokens), "--out", str(run), *_overrides(**{**TRAIN, **train}), *over,
             nproc=nproc, entry=entry)
    return run


def train_one(tokens: Path, run: Path, *over: str, **train) -> Path:
    """The one-process reference (same micro-batch slots: grad_accum = dp * the parallel run's)."""
    from text2llm.config import load_config
    from test_checkpoint import _overrides
    from text2llm.train.trainer import train as train_fn

    train_fn(load_config(None, _overrides(**{**TRAIN, **train}) + list(over)), tokens, run, progress=False)
    return run


def val_losses(run: Path) -> dict[int, float]:
    from text2llm.metrics import read_metrics

    return {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) for s in a)


def resume_from_step_4(run: Path, dest: Path) -> Path:
    """A copy of a sharded run without its step-8 checkpoint, and with step 4's model.safetensors
    zeroed: a resume that continues the run has read the weights from the shards (dcp/)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, dest)
    shutil.rmtree(dest / "checkpoints" / "step_0000008")
    weights = dest / "checkpoints" / "step_0000004" / "model.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(weights)).items()}, str(weights))
    return dest


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_tokens(tmp_path_factory.mktemp("tok") / "tokens")


# ---- meta-device init ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("over", [{}, {"tie_embeddings": False}, {"n_experts": 4, "moe_ffn_hidden": 32},
                                  {"positions": "learned", "bias": True, "norm": "layernorm", "activation": "gelu"},
                                  {"n_kv_head": 2}, {"qk_norm": True, "zero_init_output": True, "activation": "relu2"}])
def test_meta_init_equals_the_eager_build(over):
    """materialize() fills a meta-device model with exactly the eager build's values (ties kept,
    RoPE tables computed) and leaves the global RNG where the eager build leaves it; what the
    distributed runs below rely on to match one process."""
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer
    from text2llm.train.materialize import materialize, meta_model

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=16, **over)
    torch.manual_seed(3)
    eager = Transformer(cfg)
    eager_next = torch.rand(4)
    meta = meta_model(cfg)
    assert all(p.is_meta for p in meta.parameters())
    materialize([meta], cfg, torch.device("cpu"), seed=3)
    assert torch.equal(torch.rand(4), eager_next)
    want, got = eager.state_dict(), meta.state_dict()
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert (meta.lm_head.weight is meta.embed.weight) == cfg.tie_embeddings
    if cfg.positions == "rope":
        assert torch.equal(meta.rope_cos, eager.rope_cos) and torch.equal(meta.rope_sin, eager.rope_sin)


def test_meta_init_loads_weights_one_tensor_at_a_time_with_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    from text2llm.errors import UserError
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer
    from text2llm.train.materialize import materialize, meta_model

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=16)
    torch.manual_seed(5)
    src = {k: v for k, v in Transformer(cfg).state_dict().items() if k != "lm_head.weight"}
    save_file(src, str(tmp_path / "w.safetensors"))
    meta = meta_model(cfg)
    materialize([meta], cfg, torch.device("cpu"), seed=0, weights=tmp_path / "w.safetensors")
    assert all(torch.equal(meta.state_dict()[k], v) for k, v in src.items())
    save_file({**src, "blocks.0.attn.q_proj.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match=r"bad.safetensors: weights do not match the model config \(blocks.0.attn.q_proj"):
        materialize([meta_model(cfg)], cfg, torch.device("cpu"), seed=0, weights=tmp_path / "bad.safetensors")
    save_file({"stray": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="other.safetensors: weights do not match the model .missing"):
        materialize([meta_model(cfg)], cfg, torch.device("cpu"), seed=0, weights=tmp_path / "other.safetensors")


# ---- tensor parallel ----------------------------------------------------------------------------------------


def test_tp2_gqa_matches_one_process_and_resumes(tokens, tmp_path):
    from collections import defaultdict

    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from text2llm.checkpoint import load_model, read_state, save_weights
    from text2llm.config import load_config
    from text2llm.train.trainer import train

    one = train_one(tokens, tmp_path / "one", *GQA)
    run = train_parallel(tokens, tmp_path / "tp2", *GQA, "train.tp=2", no_gather=True)
    ref = losses(run)
    assert max_diff(ref, losses(one)) <= 1e-5
    assert max_diff(val_losses(run), val_losses(one)) <= 1e-5
    ck = run / "checkpoints" / "step_0000008"
    # sharded: one file per process; every weight matrix and its Adam moments are stored as two
    # halves, one written by each process; no optimizer.pt
    assert sorted(p.name for p in (ck / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ck / "optimizer.pt").exists()
    md = FileSystemReader(str(ck / "dcp")).read_metadata()
    files = defaultdict(set)
    for index, where in md.storage_data.items():
        files[index.fqn].add(where.relative_path)
    matrices = {k: m for k, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata) and len(m.size) == 2}
    model, _ = load_model(ck)  # every other verb reads model.safetensors as usual
    weights = {f"model.{k}" for k, v in model.state_dict().items() if v.dim() == 2}  # (the tied head too)
    assert {k for k in matrices if k.startswith("model.")} == weights and len(matrices) == len(weights) + 2 * 15
    for key, m in matrices.items():
        assert len(m.chunks) == 2 and all(2 * c.sizes.numel() == m.size.numel() for c in m.chunks), key
        assert files[key] == {"__0_0.distcp", "__1_0.distcp"}, key
    # model.safetensors, written from the shards one tensor at a time, is the gathered weights' file
    dcp_to_torch_save(ck / "dcp", tmp_path / "gathered.pt")  # PyTorch's own full load of the shards
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)["model"]
    save_weights(gathered, tmp_path / "gathered.safetensors", {"step": 8}, tie_embeddings=True)
    assert (ck / "model.safetensors").read_bytes() == (tmp_path / "gathered.safetensors").read_bytes()
    sd = load_file(str(ck / "model.safetensors"))
    assert all(type(v) is torch.Tensor for v in sd.values()) and sd["blocks.0.attn.k_proj.weight"].shape == (16, 32)
    assert "lm_head.weight" not in sd  # tied to the embedding, stored once
    state = read_state(ck)
    assert (state["tp"], state["pp"], state["optimizer_format"], len(state["loaders"])) == (2, 1, "dcp", 2)
    assert all(torch.equal(v, gathered[k]) for k, v in model.state_dict().items())
    # the same layout resumes bitwise
    same = resume_from_step_4(run, tmp_path / "tp2-resumed")
    torchrun("train", "-q", "--resume", str(same))
    assert max_diff(losses(same), ref) == 0.0
    # one process continues the tp=2 run from its step-4 checkpoint
    single = resume_from_step_4(run, tmp_path / "tp2-resumed-1proc")
    saved = load_config(single / "config.toml")
    train(saved.model_copy(update={"train": saved.train.model_copy(update={"tp": 1})}), tokens, single, resume=True,
          progress=False)
    assert max_diff(losses(single), ref) <= 1e-5


def test_tp2_moe_matches_one_process(tokens, tmp_path):
    one = train_one(tokens, tmp_path / "one", *MOE)
    run = train_parallel(tokens, tmp_path / "tp2-moe", *MOE, "train.tp=2")
    assert max_diff(losses(run), losses(one)) <= 1e-5


def test_tp2_fsdp2_on_four_processes_matches_one_process(tokens, tmp_path):
    """A 2-D mesh: each of 2 FSDP2 replicas is split over 2 tensor-parallel processes."""
    one = train_one(tokens, tmp_path / "one", grad_accum=2)
    run = train_parallel(tokens, tmp_path / "tp2-dp2", "train.tp=2", "train.distributed=fsdp", nproc=4, grad_accum=1)
    assert max_diff(losses(run), losses(one)) <= 1e-5


def test_pp2_tp2_fsdp2_on_eight_processes_matches_one_process(tokens, tmp_path):
    """The 3-D mesh (pp, dp, tp) = (2, 2, 2): two pipeline stages, each split over 2 tensor-parallel
    processes, the whole replicated twice by FSDP2; GQA with one KV head per tp rank."""
    one = train_one(tokens, tmp_path / "one", *NO_TIE, *GQA, grad_accum=4)
    run = train_parallel(tokens, tmp_path / "pp2-tp2-dp2", *NO_TIE, *GQA, "train.pp=2", "train.tp=2",
                         "train.distributed=fsdp", nproc=8, grad_accum=2)
    assert max_diff(losses(run), losses(one)) <= 1e-5


def test_compile_under_tp_and_pp_matches_one_process(tokens, one_untied, tmp_path):
    """train.compile with tp=2 (each block's attention and MLP forward compiled after the split,
    sequence parallel on) and with pp=2 (the stages' sublayers compiled) == one eager process."""
    one = train_one(tokens, tmp_path / "one", max_steps=4, eval_every=0, checkpoint_every=0)
    tp = train_parallel(tokens, tmp_path / "tp2", "train.tp=2", "train.compile=true", max_steps=4, eval_every=0,
                        checkpoint_every=0)
    assert max_diff(losses(tp), losses(one)) <= 1e-5
    pp = train_parallel(tokens, tmp_path / "pp2", *NO_TIE, "train.pp=2", "train.compile=true")
    assert max_diff(losses(pp), losses(one_untied)) <= 1e-5


# ---- pipeline parallel ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_untied(tokens, tmp_path_factory) -> Path:
    return train_one(tokens, tmp_path_factory.mktemp("one") / "run", *NO_TIE)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pp2_matches_one_process(tokens, one_untied, tmp_path, schedule):
    run = train_parallel(tokens, tmp_path / schedule, *NO_TIE, "train.pp=2", f"train.pp_schedule={schedule}")
    assert max_diff(losses(run), losses(one_untied)) <= 1e-5
    assert max_diff(val_losses(run), val_losses(one_untied)) <= 1e-5


def test_pp2_moe_with_document_mask_matches_one_process(tokens, tmp_path):
    """What a stage needs besides the hidden states travels with them: the document mask (made
    from the token ids on the first stage) and the running sum of the router losses. The training
    loss, the val loss and the logged aux loss equal one process's."""
    from text2llm.metrics import read_metrics

    over = [*NO_TIE, *MOE, "train.document_mask=true"]
    one = train_one(tokens, tmp_path / "one", *over)
    run = train_parallel(tokens, tmp_path / "pp2-moe", *over, "train.pp=2")
    assert max_diff(losses(run), losses(one)) <= 1e-5
    assert max_diff(val_losses(run), val_losses(one)) <= 1e-5
    aux = [{r["step"]: r["aux_loss"] for r in read_metrics(d) if "aux_loss" in r} for d in (run, one)]
    assert len(aux[0]) == 8 and max_diff(*aux) <= 1e-6


@pytest.fixture(scope="module")
def one_tied(tokens, tmp_path_factory) -> Path:
    return train_one(tokens, tmp_path_factory.mktemp("one") / "run")


@pytest.mark.parametrize("schedule,over", [("1f1b", []), ("gpipe", ["train.distributed=fsdp"])])
def test_pp2_with_a_tied_head_matches_one_process(tokens, one_tied, tmp_path, schedule, over):
    """The embedding (first stage) and the head (last stage) share one weight: its two gradients are
    summed across the stages, counted once in the gradient norm, and both copies stay equal; the
    checkpoint resumes in one process."""
    from safetensors.torch import load_file

    from text2llm.config import load_config
    from text2llm.train.trainer import train

    nproc, extra = (4, {"grad_accum": 1}) if over else (2, {})
    run = train_parallel(tokens, tmp_path / schedule, "train.pp=2", f"train.pp_schedule={schedule}", *over,
                         nproc=nproc, **extra)
    assert max_diff(losses(run), losses(one_tied)) <= 1e-5
    if not over:  # (with dp = 2 the val loss is taken over each replica's own val batches: another sample)
        assert max_diff(val_losses(run), val_losses(one_tied)) <= 1e-5
    weights = load_file(str(run / "checkpoints" / "step_0000008" / "model.safetensors"))
    assert "lm_head.weight" not in weights and "embed.weight" in weights
    if over:
        return
    single = resume_from_step_4(run, tmp_path / "resumed-1proc")
    saved = load_config(single / "config.toml")
    train(saved.model_copy(update={"train": saved.train.model_copy(update={"pp": 1})}), tokens, single, resume=True,
          progress=False)
    assert max_diff(losses(single), losses(run)) <= 1e-5


def test_pp2_interleaved_1f1b_matches_one_process_and_resumes(tokens, tmp_path):
    from text2llm.config import load_config
    from text2llm.train.trainer import train

    four = [*NO_TIE, "model.n_layer=4"]  # 4 stages of one layer: stages 0 and 2 on rank 0, 1 and 3 on rank 1
    one = train_one(tokens, tmp_path / "one", *four)
    run = train_parallel(tokens, tmp_path / "interleaved", *four, "train.pp=2", "train.pp_schedule=interleaved-1f1b",
                         no_gather=True)
    ref = losses(run)
    assert max_diff(ref, losses(one)) <= 1e-5
    same = resume_from_step_4(run, tmp_path / "resumed")
    torchrun("train", "-q", "--resume", str(same))
    assert max_diff(losses(same), ref) == 0.0
    single = resume_from_step_4(run, tmp_path / "resumed-1proc")
    saved = load_config(single / "config.toml")
    train(saved.model_copy(update={"train": saved.train.model_copy(update={"pp": 1, "pp_schedule": "1f1b"})}),
          tokens, single, resume=True, progress=False)
    assert max_diff(losses(single), ref) <= 1e-5


# ---- tensor-parallel generation ----------------------------------------------------------------------------------


def test_tp2_generation_matches_one_process(tmp_path):
    import text2llm
    from test_generate import tiny_checkpoint
    from text2llm.infer.generate import generate

    ckpt = tiny_checkpoint(tmp_path, n_kv_head=2)
    model, tok = text2llm.load(ckpt)
    for flags, kw in ((["--temperature", "0"], dict(temperature=0)),
                      (["--temperature", "1", "--top-k", "20", "--seed", "3"], dict(temperature=1, top_k=20, seed=3))):
        out = torchrun("generate", str(ckpt), "--tp", "2", "--max-new-tokens", "24", "--prompt", "Tom", *flags)
        assert out.strip() == generate(model, tok, "Tom", 24, **kw)


def test_tp2_serve_matches_one_process(tmp_path):
    import json
    import queue
    import re
    import signal
    import threading

    import text2llm
    from test_generate import tiny_checkpoint
    from test_server import request
    from text2llm.infer.generate import generate_batch

    ckpt = tiny_checkpoint(tmp_path, n_kv_head=2)
    model, tok = text2llm.load(ckpt)
    want = {p: generate_batch(model, tok, [p], 12, temperature=0)[0] for p in ("Tom", "Once upon a time")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "text2llm",
           "serve", str(ckpt), "--tp", "2", "--port", "0", "--max-tokens-limit", "32"]
    with open(tmp_path / "stderr", "w") as err:
        p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, p.stdout), lines.put("")], daemon=True).start()
    try:
        line = lines.get(timeout=180)  # serving ... on http://127.0.0.1:PORT  (...; rank 0 is pid N; ...)
        found = re.search(r"http://127\.0\.0\.1:(\d+) .*rank 0 is pid (\d+)", line)
        assert found, line + (tmp_path / "stderr").read_text()[-3000:]
        port, rank0 = map(int, found.groups())

        def complete(prompt, **body):
            status, _, text = request(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 12, **body})
            assert status == 200, text
            return text

        assert json.loads(complete("Tom", temperature=0))["choices"][0]["text"] == want["Tom"]
        events = [e[len("data: "):] for e in complete("Once upon a time", temperature=0, stream=True).split("\n\n") if e]
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == want["Once upon a time"]
        complete("Tom", temperature=1.0)  # no seed: rank 0 draws one for both
        assert json.loads(complete("Tom", temperature=0))["choices"][0]["text"] == want["Tom"]
        os.kill(rank0, signal.SIGTERM)
        assert p.wait(timeout=60) == 0, (tmp_path / "stderr").read_text()[-3000:]
    finally:
        if p.poll() is None:
            p.terminate()  # torchrun passes it on to both ranks
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


# ---- layouts that do not fit ------------------------------------------------------------------------------------


def test_layouts_that_do_not_fit_give_one_line(monkeypatch):
    from text2llm.errors import UserError
    from text2llm.train.distributed import DistEnv, init_distributed
    from text2llm.train.parallelize import check_layout

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"train.tp \(4\) x train.pp \(1\) = 4 does not divide the 2 processes"):
        init_distributed(tiny_config(tp=4).train)

    def check(k=2, **changes):
        model = {key[6:]: v for key, v in changes.items() if key.startswith("model_")}
        cfg = tiny_config(**{key: v for key, v in changes.items() if not key.startswith("model_")})
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": 64, **model})})
        env = DistEnv(world_size=cfg.train.tp * cfg.train.pp, tp=cfg.train.tp, pp=cfg.train.pp)
        check_layout(cfg.model, cfg.train, env, k)

    check(tp=2)  # fits: 4 heads, 64 vocab, seq_len 32
    cases = [
        (dict(tp=3), "train.tp=3 does not divide model.n_head = 4"),
        (dict(tp=4, model_n_kv_head=2), r"train.tp=4 does not divide model.n_kv_head \(key/value heads\) = 2"),
        (dict(tp=2, model_vocab_size=63), "set model.vocab_size to a multiple of 2"),
        (dict(tp=2, seq_len=31), "train.tp=2 does not divide train.seq_len=31"),
        (dict(pp=3, model_tie_embeddings=False), "model.n_layer=2 does not split evenly into 3 pipeline stages"),
        (dict(pp=2, model_tie_embeddings=False, pp_split=[2, 1]), r"train.pp_split=\[2, 1\] must give 2 stages"),
        (dict(pp=2, model_tie_embeddings=False, k=1), "needs at least train.pp=2 micro-batches per step"),
        (dict(pp=2, model_tie_embeddings=False, pp_schedule="interleaved-1f1b"),
         "does not split evenly into 4 pipeline stages"),
    ]
    check(pp=2)  # a tied head fits
    check(pp=2, model_n_experts=4, document_mask=True)  # and MoE layers, and a document mask
    for changes, message in cases:
        with pytest.raises(UserError, match=message):
            check(**changes)
