"""The dense decoder: config validation and presets, causality, KV cache, GQA, masks, init, sizes.

All numerical tests run fp32 on models of a few thousand parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from text2llm.infer.packing import pack_weights
from text2llm.model import KVCache, ModelConfig, Transformer
from text2llm.model.config import PRESETS
from text2llm.model.transformer import causal_mask, document_mask

V = 97


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_layer=2, n_head=4, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def ids(B=2, T=24, seed=1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, field", [
    (dict(d_model=30, n_head=4), "model.d_model"),
    (dict(n_kv_head=3), "model.n_kv_head"),
    (dict(n_experts=2, moe_top_k=3), "model.moe_top_k"),
    (dict(n_experts=4, moe_every=3), "model.moe_every"),
    (dict(preset="no-such-model"), "model.preset"),
])
def test_config_rejects_bad_fields_with_a_message_naming_them(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        tiny(**kw)


def test_config_errors_from_toml_are_one_line(tmp_path):
    from text2llm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model\.moe_top_k"):
        load_config(overrides=["model.n_experts=2", "model.moe_top_k=4"])
    with pytest.raises(ConfigError, match=r"model\.activation"):
        load_config(overrides=["model.activation=relu"])


def test_preset_from_toml_with_explicit_overrides(tmp_path):
    from text2llm.config import load_config

    path = tmp_path / "c.toml"
    path.write_text('[model]\npreset = "gpt2-124m"\nn_layer = 6\n', encoding="utf-8")
    cfg = load_config(path).model
    assert (cfg.d_model, cfg.n_layer, cfg.positions, cfg.norm, cfg.activation) == (768, 6, "learned", "layernorm", "gelu")
    again = load_config(overrides=["model.preset=test-moe"]).model
    assert again.n_experts == 4 and again.moe_top_k == 2
    # the resolved config round-trips through TOML
    from text2llm.config import Config

    cfg2 = load_config(overrides=[f"model.{k}={v!r}".replace("'", '"') for k, v in cfg.model_dump().items()
                                  if v is not None] + ["train.seq_len=256"])
    assert cfg2.model == cfg and Config(model=cfg).to_toml()


@pytest.mark.parametrize("preset, vocab, expected", [
    ("gpt2-124m", 50257, 124_439_808),  # GPT-2 small, as published
    ("llama-1b", 128256, 1_235_814_400),  # Llama-3.2-1B, as published
])
def test_reference_presets_have_the_published_size(preset, vocab, expected):
    with torch.device("meta"):  # shapes only, no memory
        model = Transformer(ModelConfig(preset=preset, vocab_size=vocab))
    assert model.num_params() == expected


def test_small_presets_sizes():
    assert 90_000 <= Transformer(ModelConfig(preset="test-100k", vocab_size=256)).num_params() <= 110_000
    dense = Transformer(ModelConfig(preset="dense-10m", vocab_size=4096))
    moe = Transformer(ModelConfig(preset="moe-8x2-10m", vocab_size=4096))
    assert 9e6 < dense.num_params() < 13e6
    # same active parameters up to the router (8 x d_model per layer)
    assert moe.num_params(active_only=True) - dense.num_params() == 6 * 8 * 384
    assert moe.flops_per_token(256) - dense.flops_per_token(256) == 6 * (6 * 8 * 384)
    assert set(PRESETS) >= {"test-100k", "gpt2-124m", "llama-1b"}


def test_flops_per_token_formula():
    cfg = tiny(tie_embeddings=False)
    model = Transformer(cfg)
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token(64) == 6 * n + 12 * 2 * 32 * 64


# ---- forward --------------------------------------------------------------------------------


def test_forward_shapes_and_dense_output_has_no_moe_fields():
    out = build(tiny())(ids())
    assert out.logits.shape == (2, 24, V)
    assert out.aux_loss is None and out.expert_load is None and out.expert_dropped is None


@pytest.mark.parametrize("kw", [dict(), dict(positions="learned", norm="layernorm", activation="gelu", bias=True)])
def test_causal_future_tokens_do_not_change_past_logits(kw):
    model = build(tiny(**kw))
    x = ids()
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % V
    a, b = model(x).logits, model(y).logits
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@pytest.mark.parametrize("kw", [
    dict(), dict(n_kv_head=2), dict(n_kv_head=1),
    dict(positions="learned", norm="layernorm", activation="gelu", bias=True),
    dict(n_experts=4, moe_top_k=2), dict(n_experts=4, moe_top_k=1, moe_every=2),
])
def test_kv_cache_incremental_decoding_equals_full_forward(kw):
    cfg = tiny(**kw)
    model = build(cfg)
    x = ids(T=30)
    with torch.no_grad():
        full = model(x).logits
        cache = KVCache(cfg, batch_size=2)
        parts = [model(x[:, :7], cache=cache).logits, model(x[:, 7:12], cache=cache).logits]  # prefill + a chunk
        parts += [model(x[:, t : t + 1], cache=cache).logits for t in range(12, 30)]  # one token at a time
    assert cache.pos == 30
    assert (torch.cat(parts, dim=1) - full).abs().max() <= 1e-5
    cache.reset()
    assert cache.pos == 0


@pytest.mark.parametrize("kw", [
    dict(), dict(n_kv_head=2), dict(positions="learned", norm="layernorm", activation="gelu", bias=True),
    dict(n_experts=4, moe_top_k=2),
])
def test_packed_weights_give_the_same_logits(kw):
    cfg = tiny(**kw)
    model = build(cfg)
    x = ids(T=20)
    with torch.no_grad():
        ref = model(x).logits
        pack_weights(model)
        cache = KVCache(cfg, batch_size=2)
        fast = torch.cat([model(x[:, :12], cache=cache).logits]
                         + [model(x[:, t : t + 1], cache=cache).logits for t in range(12, 20)], dim=1)
        last = model(x, last_only=True).logits
    assert (fast - ref).abs().max() <= 1e-5
    assert last.shape == (2, 1, V) and (last[:, 0] - ref[:, -1]).abs().max() <= 1e-5
    assert set(model.state_dict()) == set(build(cfg).state_dict())  # the packed copies are not state


def test_packed_weights_follow_weight_updates_and_leave_training_alone():
    cfg = tiny()
    model = pack_weights(build(cfg))
    x = ids(T=10)
    with torch.no_grad():
        before = model(x).logits
        model.blocks[0].attn.k_proj.weight.mul_(2.0)  # in place, as an optimizer step would
        model.blocks[1].mlp.up_proj.weight.add_(0.5)
        after = model(x).logits
        pack_weights(model, on=False)
        plain = model(x).logits
    assert not any("_packed" in m.__dict__ for m in model.modules())  # the stacked copies are freed
    assert (after - before).abs().max() > 1e-3
    assert (after - plain).abs().max() <= 1e-5
    pack_weights(model).train()
    loss = model(x).logits.square().mean()  # grad enabled: the plain Linears, so gradients reach them
    loss.backward()
    assert model.blocks[0].attn.q_proj.weight.grad is not None and model.lm_head.weight.grad is not None


def test_model_built_under_inference_mode_decodes():
    """A model made inside ``torch.inference_mode`` (serving code loads it there) has parameters
    without a version counter: the packed-weights check must not trip on them."""
    from text2llm.infer.generate import generate_ids

    cfg = tiny()
    ref = build(cfg)
    with torch.inference_mode():
        model = build(cfg)
        model.load_state_dict(ref.state_dict())
        got = list(generate_ids(model, [1, 5, 6], 6, temperature=0))
    assert got == list(generate_ids(ref, [1, 5, 6], 6, temperature=0))


def test_kv_cache_overflow_is_an_error():
    cfg = tiny()
    model = build(cfg)
    cache = KVCache(cfg, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="KV cache full"):
        model(ids(B=1, T=9), cache=cache)


def test_gqa_with_n_kv_head_equal_n_head_is_mha():
    a = build(tiny(n_kv_head=0))
    b = build(tiny(n_kv_head=4))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(ids()).logits, b(ids()).logits)


def test_gqa_equals_mha_with_each_kv_head_repeated_for_its_query_group():
    gqa = build(tiny(n_kv_head=2))
    mha = build(tiny())
    sd = gqa.state_dict()
    Dh = 8
    for i in range(2):
        for p in "kv":
            w = sd[f"blocks.{i}.attn.{p}_proj.weight"].view(2, Dh, 32)  # K heads
            sd[f"blocks.{i}.attn.{p}_proj.weight"] = w.repeat_interleave(2, dim=0).reshape(4 * Dh, 32)  # heads 0,0,1,1
    mha.load_state_dict(sd)
    assert (gqa(ids()).logits - mha(ids()).logits).abs().max() <= 1e-5


def test_left_padding_mask_gives_the_unpadded_logits():
    model = build(tiny())
    x = ids(B=1, T=10)
    pad = 4
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), x], dim=1)
    keep = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)], dim=1)
    mask = causal_mask(14, key_padding_BS=keep)
    assert mask.shape == (1, 1, 14, 14)
    a = model(x).logits
    b = model(padded, attn_mask=mask).logits[:, pad:]
    assert not b.isnan().any()
    assert (a - b).abs().max() <= 1e-5  # RoPE is relative: shifting positions changes nothing


def test_document_mask_keeps_packed_documents_apart():
    model = build(tiny())
    d1, d2 = ids(B=1, T=9, seed=2), ids(B=1, T=11, seed=3)
    packed = torch.cat([d1, d2], dim=1)
    doc = torch.tensor([[0] * 9 + [1] * 11])
    out = model(packed, attn_mask=document_mask(doc)).logits
    assert (out[:, :9] - model(d1).logits).abs().max() <= 1e-5
    assert (out[:, 9:] - model(d2).logits).abs().max() <= 1e-5


def test_max_seq_len_is_enforced():
    with pytest.raises(ValueError, match="max_seq_len"):
        build(tiny())(ids(B=1, T=65))


def test_tied_head_shares_the_embedding_and_untied_does_not():
    tied, untied = Transformer(tiny()), Transformer(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_params() - tied.num_params() == V * 32


def test_init_weights_scales_residual_projections():
    cfg = tiny(d_model=128, n_layer=8, n_head=4, vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(cfg)
    resid = 0.02 / math.sqrt(16)
    assert model.blocks[3].attn.o_proj.weight.std().item() == pytest.approx(resid, rel=0.1)
    assert model.blocks[3].mlp.down_proj.weight.std().item() == pytest.approx(resid, rel=0.1)
    assert model.blocks[3].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(model.norm.weight, torch.ones(128))


def test_rmsnorm_matches_its_formula():
    from text2llm.model.transformer import RMSNorm

    norm = RMSNorm(16, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert (norm(x) - ref).abs().max() <= 1e-6


def test_a_few_training_steps_learn_a_repeated_sequence():
    torch.manual_seed(0)
    model = Transformer(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = ids(B=4, T=33)
    losses = []
    for _ in range(30):
        logits = model(x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(V) - 0.5
    assert losses[-1] < 0.5 * losses[0]


def test_preset_cannot_be_assigned_after_the_config_is_built():
    cfg = ModelConfig(preset="test-100k")
    cfg.vocab_size = 300  # other fields stay assignable (the trainer sets vocab_size)
    with pytest.raises(ValueError, match="model.preset"):
        cfg.preset = "gpt2-124m"
