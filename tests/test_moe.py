"""Mixture-of-Experts: routing math vs a per-token reference, dense equivalence, losses, capacity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from text2llm.model import ModelConfig, Transformer
from text2llm.model.moe import MoE
from text2llm.model.transformer import MLP

D = 32


def moe_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=D, n_layer=2, n_head=4, max_seq_len=64, n_experts=4, moe_top_k=2,
                moe_ffn_hidden=48)
    return ModelConfig(**{**base, **kw})


def make_moe(seed=0, **kw) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(moe_cfg(**kw))
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    return layer


def reference_moe(layer: MoE, x_ND: torch.Tensor) -> torch.Tensor:
    """The definition, token by token: sum over the chosen experts of renormalised prob * expert(x)."""
    out = torch.zeros_like(x_ND)
    for n in range(x_ND.size(0)):
        probs = layer.router(x_ND[n]).softmax(-1)
        w, e = probs.topk(layer.top_k)
        w = w / w.sum()
        for wj, ej in zip(w, e):
            out[n] += wj * layer.experts[int(ej)](x_ND[n : n + 1])[0]
    return out


@pytest.mark.parametrize("k, act", [(1, "swiglu"), (2, "swiglu"), (3, "gelu")])
def test_batched_dispatch_equals_the_per_token_definition(k, act):
    layer = make_moe(moe_top_k=k, activation=act)
    x = torch.randn(3, 7, D)
    y, stats = layer(x)
    assert (y.view(-1, D) - reference_moe(layer, x.view(-1, D))).abs().max() <= 1e-5
    assert stats.load_E.sum().item() == 3 * 7 * k


def test_one_expert_top1_equals_the_dense_mlp():
    cfg = moe_cfg(n_experts=1, moe_top_k=1, moe_ffn_hidden=0)
    torch.manual_seed(0)
    layer, mlp = MoE(cfg), MLP(cfg)
    mlp.load_state_dict(layer.experts[0].state_dict())
    x = torch.randn(2, 9, D)
    y, stats = layer(x)
    assert (y - mlp(x)).abs().max() <= 1e-6
    assert stats.load_E.tolist() == [18]


def test_one_expert_model_equals_the_dense_model():
    dense_cfg = moe_cfg(n_experts=0, ffn_hidden=48)
    moe = Transformer(moe_cfg(n_experts=1, moe_top_k=1)).eval()
    dense = Transformer(dense_cfg).eval()
    sd = {k.replace("mlp.experts.0.", "mlp."): v for k, v in moe.state_dict().items() if "router" not in k}
    dense.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 16))
    out = moe(x)
    assert (out.logits - dense(x).logits).abs().max() <= 1e-5


def test_router_statistics_sum_to_the_token_count():
    cfg = moe_cfg(n_layer=4, moe_every=2, n_experts=8, moe_top_k=2)
    assert cfg.moe_layers == [1, 3]
    model = Transformer(cfg)
    assert [b.is_moe for b in model.blocks] == [False, True, False, True]
    out = model(torch.randint(0, 97, (3, 20)))
    assert out.expert_load.shape == out.expert_dropped.shape == (2, 8)
    assert out.expert_load.sum(dim=1).tolist() == [3 * 20 * 2] * 2
    assert out.expert_dropped.sum().item() == 0
    assert (out.expert_load > 0).sum() > 2  # tokens actually spread over experts


def test_aux_loss_gradients_reach_the_router():
    torch.manual_seed(0)
    model = Transformer(moe_cfg())
    out = model(torch.randint(0, 97, (2, 16)))
    assert out.aux_loss.ndim == 0 and out.aux_loss.item() > 0
    out.aux_loss.backward()
    for block in model.blocks:
        g = block.mlp.router.weight.grad
        assert g is not None and g.abs().sum() > 0
    # the LM loss trains the router too (through the gate weights)
    model.zero_grad()
    out = model(torch.randint(0, 97, (2, 16)))
    F.cross_entropy(out.logits.view(-1, 97), torch.randint(0, 97, (32,))).backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


def test_balance_loss_is_one_for_a_uniform_router_and_z_loss_is_log_e_squared():
    layer = make_moe(aux_loss_weight=1.0, z_loss_weight=0.0, n_experts=8)
    torch.nn.init.zeros_(layer.router.weight)  # every prob = 1/8
    _, stats = layer(torch.randn(2, 5, D))
    assert stats.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    layer.aux_w, layer.z_w = 0.0, 1.0
    _, stats = layer(torch.randn(2, 5, D))
    assert stats.aux_loss.item() == pytest.approx(math.log(8) ** 2, rel=1e-6)


def test_balance_loss_grows_when_routing_collapses():
    layer = make_moe(aux_loss_weight=1.0, z_loss_weight=0.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 5.0  # push every (positive-sum) token to expert 0
    x = torch.rand(2, 8, D)
    _, stats = layer(x)
    assert stats.load_E[0].item() == 16
    assert stats.aux_loss.item() > 1.5


def test_capacity_drops_overflow_tokens_and_counts_them():
    layer = make_moe(capacity_factor=1.0, n_experts=4, moe_top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 5.0  # all 16 tokens want expert 2; capacity = 1.0 * 16 / 4 = 4
    x = torch.rand(1, 16, D)
    layer.train()
    y, stats = layer(x)
    assert stats.load_E.tolist() == [0, 0, 16, 0]
    assert stats.dropped_E.tolist() == [0, 0, 12, 0]
    expected = layer.experts[2](x[0, :4])  # the first 4 tokens are served (weight 1 with k=1)
    assert (y[0, :4] - expected).abs().max() <= 1e-6
    assert torch.equal(y[0, 4:], torch.zeros(12, D))  # dropped: only the residual stream carries them
    layer.eval()  # inference never drops
    y, stats = layer(x)
    assert stats.dropped_E.sum().item() == 0
    assert y[0, 4:].abs().sum() > 0


def test_capacity_serves_first_choices_before_second_choices():
    layer = make_moe(capacity_factor=0.5, n_experts=2, moe_top_k=2)  # capacity = 0.5 * 8 * 2 / 2 = 4
    layer.train()
    x = torch.randn(1, 8, D)
    y, stats = layer(x)
    assert stats.load_E.tolist() == [8, 8] and stats.dropped_E.tolist() == [4, 4]
    with torch.no_grad():
        probs = layer.router(x[0]).softmax(-1)  # k = n_experts: the weights are the probs
        first = probs.argmax(-1)
        expected = torch.zeros(8, D)
        for e in range(2):
            queue = [n for n in range(8) if first[n] == e] + [n for n in range(8) if first[n] != e]
            for n in queue[:4]:  # first choices in token order, then second choices
                expected[n] += probs[n, e] * layer.experts[e](x[0, n : n + 1])[0]
    assert (y[0] - expected).abs().max() <= 1e-5


def test_moe_model_trains_and_logs_expert_load():
    torch.manual_seed(0)
    model = Transformer(moe_cfg(capacity_factor=1.25))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 97, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(25):
        out = model(x[:, :-1])
        loss = F.cross_entropy(out.logits.reshape(-1, 97), x[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()
        losses.append(loss.item())
        assert out.expert_load.sum(dim=1).tolist() == [4 * 32 * 2] * 2
        assert (out.expert_dropped <= out.expert_load).all()
    assert losses[-1] < 0.6 * losses[0]


def test_moe_runs_under_bf16_autocast():
    model = Transformer(moe_cfg())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, 97, (2, 8)))
        loss = out.logits.float().logsumexp(-1).mean() + out.aux_loss
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].mlp.router.weight.grad is not None


def test_export_path_runs_every_expert_with_the_same_result(monkeypatch):
    import text2llm.model.moe as moe_mod

    layer = make_moe(moe_top_k=2).eval()
    x = torch.randn(2, 6, D)
    grouped, s1 = layer(x)
    monkeypatch.setattr(moe_mod, "_exporting", lambda: True)
    dense, s2 = layer(x)
    assert (grouped - dense).abs().max() <= 1e-6
    assert torch.equal(s1.load_E, s2.load_E) and torch.allclose(s1.aux_loss, s2.aux_loss)


def test_moe_model_exports_to_onnx_and_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import numpy as np

    from text2llm.interop.onnx import export_model
    from text2llm.infer.ort_runtime import OrtEngine

    torch.manual_seed(0)
    model = Transformer(moe_cfg(n_layer=1)).eval()
    out = export_model(model, tmp_path / "onnx")
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = np.ones((2, 10), dtype=np.int64)
    logits = OrtEngine.load(out).prefill(ids.numpy(), mask)
    with torch.no_grad():
        ref = model(ids).logits[:, -1].numpy()
    assert np.abs(logits - ref).max() <= 1e-4
