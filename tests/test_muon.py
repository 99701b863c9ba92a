"""train.optimizer = "muon": torch.optim.Muon on the hidden matrices, AdamW on the rest.

* the split: Muon takes exactly the 2-D hidden weights (attention, MLPs, every expert), AdamW the
  embeddings, untied head, router, gains and biases; each steps only its own parameters;
* each part follows its own peak LR on the shared schedule shape;
* resume is bitwise on CPU; the NaN guard skips a step without touching either part's state;
* DDP with 2 processes == 1 process with 2 micro-batches (<= 1e-5); FSDP2 / tp refuse it in one line.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from test_train import losses, make_tokens, tiny_config
from text2llm.model.config import ModelConfig
from text2llm.model.transformer import Transformer
from text2llm.train.config import TrainConfig
from text2llm.train.optim import MuonAdamW, make_optimizer, muon_params, set_lr

MUON = dict(optimizer="muon", muon_lr=0.02)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_tokens(tmp_path_factory.mktemp("tok") / "tokens")


def _moe_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=32, n_experts=2,
                                   moe_top_k=1, moe_every=2, tie_embeddings=False, bias=True, qk_norm=True))


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    m = _moe_model()
    opt = make_optimizer(m, TrainConfig(**MUON))
    assert isinstance(opt, MuonAdamW) and isinstance(opt.muon, torch.optim.Muon)
    muon_names = set(opt.muon.param_groups[0]["names"])
    adamw_names = {n for g in opt.adamw.param_groups for n in g["names"]}
    all_names = {n for n, _ in m.named_parameters()}
    assert muon_names | adamw_names == all_names and not muon_names & adamw_names
    assert muon_names == {n for n, _ in muon_params(m)}
    assert "blocks.1.mlp.experts.1.down_proj.weight" in muon_names and "blocks.0.attn.q_proj.weight" in muon_names
    for name in ("embed.weight", "lm_head.weight", "blocks.1.mlp.router.weight", "blocks.0.attn.q_norm.weight",
                 "blocks.0.attn.q_proj.bias", "norm.weight"):
        assert name in adamw_names, name
    assert all(p.dim() == 2 for g in opt.muon.param_groups for p in g["params"])


def test_each_part_steps_only_its_own_parameters():
    for frozen in ("adamw", "muon"):
        m = _moe_model()
        opt = make_optimizer(m, TrainConfig(**MUON, weight_decay=0.0))
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        x = torch.randint(0, 64, (2, 16))
        out = m(x)
        (out.logits.square().mean() + out.aux_loss).backward()
        for g in getattr(opt, frozen).param_groups:
            g["lr"] = 0.0
        opt.step()
        muon_names = set(opt.muon.param_groups[0]["names"])
        for n, p in m.named_parameters():
            moved = not torch.equal(p, before[n])
            should = (n in muon_names) == (frozen == "adamw")
            if not should:
                assert not moved, (frozen, n)
        assert any(not torch.equal(p, before[n]) for n, p in m.named_parameters()
                   if (n in muon_names) == (frozen == "adamw"))


def test_each_part_has_its_own_peak_on_the_shared_schedule():
    m = _moe_model()
    tc = TrainConfig(**MUON, lr=1e-3, min_lr=1e-4, warmup_steps=4, max_steps=20)
    opt = make_optimizer(m, tc)
    lr = set_lr(opt, 2, tc)
    assert lr == pytest.approx(1e-3 * 3 / 4)
    assert all(g["lr"] == lr for g in opt.adamw.param_groups)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02 * 3 / 4)
    set_lr(opt, 19, tc)  # the last step: both at the same fraction min_lr / lr of their peaks
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.002)
    assert type(make_optimizer(m, TrainConfig())) is torch.optim.AdamW  # adamw stays the plain optimizer


def test_muon_trains_and_resumes_bitwise(tokens, tmp_path):
    from text2llm.train.trainer import train

    cfg = tiny_config(max_steps=8, checkpoint_every=4, eval_every=4, grad_accum=2, **MUON)
    ref = tmp_path / "ref"
    train(cfg, tokens, ref, progress=False)
    base = tmp_path / "adamw"
    train(tiny_config(max_steps=8, grad_accum=2), tokens, base, progress=False)
    assert losses(ref)[8] < losses(ref)[1] and losses(ref) != losses(base)
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "step_0000008")
    train(cfg, tokens, run, resume=True, progress=False)
    a, b = losses(ref), losses(run)
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]  # bitwise
    state = torch.load(ref / "checkpoints" / "step_0000008" / "optimizer.pt", weights_only=True)
    assert set(state) == {"muon", "adamw"} and state["muon"]["state"]  # Muon's momentum buffers are saved


def test_nan_guard_leaves_both_parts_untouched(tokens, tmp_path, monkeypatch):
    """A non-finite step is skipped: no Muon / AdamW state is created or changed by it."""
    from text2llm.train import trainer as T

    real = T.forward_backward
    calls = {"n": 0}

    def poisoned(*a, **k):
        stats = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 1:
            stats.loss = stats.loss * float("nan")
        return stats

    monkeypatch.setattr(T, "forward_backward", poisoned)
    r = T.train(tiny_config(max_steps=3, **MUON), tokens, tmp_path / "run", progress=False)
    assert r.skipped_steps == 1 and r.step == 3


def test_ddp_two_processes_match_one_process_with_muon(tokens, tmp_path):
    pytest.importorskip("torch.distributed")
    from test_distributed import TRAIN, _close, torchrun
    from text2llm.train.trainer import train

    single = tmp_path / "single"
    train(tiny_config(**TRAIN, grad_accum=2, **MUON), tokens, single, progress=False)
    run = tmp_path / "ddp"
    torchrun(tokens, run, "train.optimizer=muon", "train.muon_lr=0.02")
    assert _close(losses(run), losses(single), 1e-5) <= 1e-5


def test_sharded_layouts_refuse_muon(tokens, tmp_path):
    from text2llm.errors import UserError
    from text2llm.train import distributed as D
    from text2llm.train.trainer import Trainer
    from text2llm.pack import read_meta

    cfg = tiny_config(**MUON)
    env = D.DistEnv(mode="fsdp", device=torch.device("cpu"))
    tr = Trainer.__new__(Trainer)
    tr.cfg, tr.env, tr.k, tr.device, tr.start_ckpt = cfg, env, 1, torch.device("cpu"), None
    with pytest.raises(UserError, match="muon.*one process or DDP"):
        Trainer.setup_model(tr, None)
    assert read_meta(tokens)["bos_id"] == 1


def test_resume_with_another_optimizer_is_one_clear_line(tokens, tmp_path):
    from text2llm.errors import UserError
    from text2llm.train.trainer import train

    run = tmp_path / "run"
    train(tiny_config(max_steps=4, checkpoint_every=2), tokens, run, progress=False)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    with pytest.raises(UserError, match="train.optimizer"):
        train(tiny_config(max_steps=4, checkpoint_every=2, **MUON), tokens, run, resume=True, progress=False)
