"""LR schedules at key steps, AdamW parameter groups, gradient clipping, accumulation equivalence."""

from __future__ import annotations

import math

import pytest
import torch

from text2llm.train.config import TrainConfig
from text2llm.train.optim import lr_at, make_optimizer, param_groups


def _model(**kw):
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = dict(vocab_size=50, d_model=16, n_layer=2, n_head=2, max_seq_len=16)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg))


def test_cosine_schedule_key_steps():
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(0, c) == pytest.approx(0.1)        # first warm-up step: lr / warmup
    assert lr_at(4, c) == pytest.approx(0.5)
    assert lr_at(9, c) == pytest.approx(1.0)        # warm-up reaches the peak
    assert lr_at(10, c) == pytest.approx(1.0)       # cosine starts at the peak
    mid = 10 + (109 - 10) / 2
    assert lr_at(int(mid), c) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (int(mid) - 10) / 99)))
    assert lr_at(109, c) == pytest.approx(0.1)      # the last step is at min_lr
    assert lr_at(500, c) == pytest.approx(0.1)      # past the end stays at min_lr
    values = [lr_at(s, c) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_constant_and_wsd_schedules():
    c = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=5, max_steps=100, schedule="constant")
    assert [lr_at(s, c) for s in (0, 4, 5, 50, 99)] == pytest.approx([0.2, 1.0, 1.0, 1.0, 1.0])
    w = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=5, max_steps=100, schedule="wsd", decay_fraction=0.2)
    assert lr_at(4, w) == pytest.approx(1.0)
    assert lr_at(79, w) == pytest.approx(1.0)       # stable until 80% of the run
    assert lr_at(80, w) == pytest.approx(1.0 - 0.9 / 20)
    assert lr_at(89, w) == pytest.approx(1.0 - 0.9 * 10 / 20)
    assert lr_at(99, w) == pytest.approx(0.1)       # decayed to min_lr on the last step


def test_no_warmup_starts_at_peak():
    c = TrainConfig(lr=2e-3, min_lr=2e-4, warmup_steps=0, max_steps=10)
    assert lr_at(0, c) == pytest.approx(2e-3)


def test_param_groups_skip_norms_biases_and_embeddings():
    m = _model(bias=True, tie_embeddings=True)
    groups = param_groups(m, 0.1)
    decay, no_decay = groups[0], groups[1]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("weight") and "norm" not in n and "embed" not in n for n in decay["names"])
    assert "embed.weight" in no_decay["names"]
    assert any("norm" in n for n in no_decay["names"]) and any(n.endswith("bias") for n in no_decay["names"])
    assert "lm_head.weight" not in decay["names"] + no_decay["names"]  # tied: counted once, as the embedding
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == m.num_params()
    # configurable: decay embeddings and norms too
    all_decay = param_groups(m, 0.1, decay_embeddings=True, decay_norms_and_biases=True)
    assert len(all_decay) == 1 and all_decay[0]["weight_decay"] == 0.1
    # an untied head is a matrix and is decayed
    untied = param_groups(_model(tie_embeddings=False), 0.1)
    assert "lm_head.weight" in untied[0]["names"]
    opt = make_optimizer(m, TrainConfig(weight_decay=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_clipping_caps_the_global_norm_and_returns_the_norm_before():
    m = _model()
    x = torch.randint(0, 50, (2, 16))
    m(x).logits.pow(2).sum().mul(100).backward()
    before = torch.sqrt(sum(p.grad.pow(2).sum() for p in m.parameters()))
    norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    after = torch.sqrt(sum(p.grad.pow(2).sum() for p in m.parameters()))
    assert norm.item() == pytest.approx(before.item(), rel=1e-5) and before > 1
    assert after.item() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("padding", [False, True])
def test_accumulation_4x2_equals_one_batch_of_8(padding):
    """Gradients of 4 micro-batches of 2 == one micro-batch of 8, within 1e-6 (token-weighted,
    so uneven padding across micro-batches does not change the weighting)."""
    from text2llm.loss import IGNORE_INDEX
    from text2llm.train.trainer import forward_backward

    torch.manual_seed(1)
    x = torch.randint(0, 50, (8, 16))
    y = torch.randint(0, 50, (8, 16))
    if padding:
        for i in range(8):
            y[i, 16 - 2 * i:] = IGNORE_INDEX  # rows end with 0..14 padded targets
    grads = []
    for micro in (8, 2):
        m = _model()
        batches = [(x[i:i + micro], y[i:i + micro]) for i in range(0, 8, micro)]
        stats = forward_backward(m, batches, torch.device("cpu"))
        grads.append((stats.loss.item(), [p.grad.clone() for p in m.parameters()]))
    (l8, g8), (l2, g2) = grads
    assert l8 == pytest.approx(l2, abs=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(g8, g2)) < 1e-6
    m = _model()
    ref = torch.nn.functional.cross_entropy(m(x).logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    assert l8 == pytest.approx(ref.item(), abs=1e-6)


def test_tokens_per_step_sets_accumulation():
    from text2llm.errors import UserError

    c = TrainConfig(batch_size=4, seq_len=32, tokens_per_step=4 * 32 * 8)
    assert c.accum_steps(1) == 8 and c.accum_steps(2) == 4 and c.accum_steps(8) == 1
    with pytest.raises(UserError, match="tokens_per_step"):
        c.accum_steps(3)
    with pytest.raises(ValueError, match="tokens_per_step"):
        TrainConfig(batch_size=4, seq_len=32, tokens_per_step=100)
