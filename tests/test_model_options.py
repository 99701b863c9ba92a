"""The 2025 block refinements as config keys (model.qk_norm, activation = "relu2", logit_softcap,
zero_init_output, tie_embeddings = false): each changes the forward as documented, every inference
path (KV cache, packed weights, the fast decode step, ONNX) computes the same thing, and the exports
that cannot carry an option refuse it naming the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from text2llm.errors import UserError
from text2llm.infer.fast_step import FastDecodeStep
from text2llm.infer.packing import pack_weights
from text2llm.interop.gguf import check_gguf
from text2llm.interop.hf import hf_architecture
from text2llm.model.cache import KVCache
from text2llm.model.config import ModelConfig
from text2llm.model.transformer import Transformer

BASE = dict(vocab_size=97, d_model=32, n_layer=2, n_head=2, max_seq_len=64)
ALL = dict(qk_norm=True, activation="relu2", logit_softcap=5.0, zero_init_output=False, tie_embeddings=False)


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**BASE, **kw})).eval()


def _ids(T=12, B=2):
    return torch.randint(3, 97, (B, T), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_qk_norm_makes_attention_scale_invariant_in_q_and_k():
    """With qk_norm each head's q and k are RMS-normalised: scaling W_q (or W_k) leaves the output
    unchanged; without it the attention logits, and so the output, change."""
    x = _ids()
    diffs = {}
    for qk_norm in (True, False):
        m = _model(qk_norm=qk_norm, norm_eps=1e-8)  # (eps is the only term that sees the scale)
        ref = m(x).logits
        for blk in m.blocks:
            blk.attn.q_proj.weight.mul_(7.0)
            blk.attn.k_proj.weight.mul_(0.3)
        diffs[qk_norm] = (m(x).logits - ref).abs().max().item()
    assert diffs[True] < 1e-5 and diffs[False] > 1e-3, diffs
    m = _model(qk_norm=True)
    assert m.blocks[0].attn.q_norm.weight.shape == (m.cfg.head_dim,)  # one gain per head dim (Qwen3 layout)


@torch.no_grad()
def test_relu2_mlp_is_ungated_relu_squared_with_4d_hidden():
    m = _model(activation="relu2")
    mlp = m.blocks[0].mlp
    assert m.cfg.ffn_dim == 4 * BASE["d_model"] and not hasattr(mlp, "gate_proj")
    x = torch.randn(3, 5, BASE["d_model"])
    want = mlp.down_proj(torch.relu(mlp.up_proj(x)) ** 2)
    assert torch.allclose(mlp(x), want, atol=1e-6)


@torch.no_grad()
def test_logit_softcap_bounds_logits_as_cap_tanh():
    capped, plain = _model(logit_softcap=2.0), _model()
    plain.load_state_dict(capped.state_dict())
    for p in plain.parameters():  # large logits so that the cap bites
        p.mul_(3.0) if p.dim() == 2 else None
    capped.load_state_dict(plain.state_dict())
    raw, out = plain(_ids()).logits, capped(_ids()).logits
    assert raw.abs().max() > 2.0 and out.abs().max() < 2.0
    assert torch.allclose(out, 2.0 * torch.tanh(raw / 2.0), atol=1e-5)


@torch.no_grad()
def test_zero_init_output_starts_every_block_as_the_identity():
    m = _model(zero_init_output=True)
    for name, p in m.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert not p.any(), name
    x = _ids()
    assert torch.allclose(m(x).logits, m.lm_head(m.norm(m.embed(x))), atol=1e-6)
    assert _model().blocks[0].attn.o_proj.weight.any()  # off by default
    moe = _model(zero_init_output=True, n_experts=2, moe_top_k=1)
    assert not moe.blocks[0].mlp.experts[1].down_proj.weight.any()


def test_untied_head_is_its_own_parameter():
    m = _model(tie_embeddings=False)
    assert m.lm_head.weight is not m.embed.weight
    tied = _model()
    assert tied.lm_head.weight is tied.embed.weight


@torch.no_grad()
@pytest.mark.parametrize("kw", [ALL, dict(activation="relu2"), dict(logit_softcap=3.0), dict(qk_norm=True, n_kv_head=1)])
def test_cache_packed_and_fast_step_match_forward(kw):
    """KV-cache decoding, packed weights and the fast decode step compute what forward computes."""
    m = _model(**kw)
    x = _ids(T=10, B=2)
    full = m(x).logits
    cache = KVCache(m.cfg, batch_size=2)
    m(x[:, :6], cache=cache)
    steps = [m.decode_step(x[:, t : t + 1], t, cache) for t in range(6, 10)]
    assert torch.allclose(torch.stack(steps, 1), full[:, 6:], atol=1e-4)
    pack_weights(m)
    assert torch.allclose(m(x).logits, full, atol=1e-4)
    fast = FastDecodeStep.build(m)
    if kw.get("qk_norm"):
        assert fast is None  # decoded through forward
        return
    assert fast is not None
    cache = KVCache(m.cfg, batch_size=2)
    m(x[:, :6], cache=cache)
    steps = [fast(x[:, t], t, cache) for t in range(6, 10)]
    assert torch.allclose(torch.stack(steps, 1), full[:, 6:], atol=1e-4)


@pytest.mark.parametrize("kw, field", [(dict(qk_norm=True), "model.qk_norm"),
                                       (dict(activation="relu2"), "model.activation"),
                                       (dict(logit_softcap=30.0), "model.logit_softcap")])
def test_hf_and_gguf_refuse_what_they_cannot_carry(kw, field):
    cfg = ModelConfig(**{**BASE, **kw})
    if kw.get("qk_norm"):
        assert hf_architecture(cfg) == "qwen3"  # transformers has it (parity: tests/test_hf.py)
    else:
        with pytest.raises(UserError, match=field.replace(".", r"\.")):
            hf_architecture(cfg)
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        check_gguf(cfg)
    # zero-init and an untied head are only an init / a weight: both exports carry them
    ok = ModelConfig(**{**BASE, "zero_init_output": True, "tie_embeddings": False})
    assert hf_architecture(ok) == "llama"
    check_gguf(ok)


def test_onnx_carries_every_option(tmp_path):
    pytest.importorskip("onnxruntime")
    from text2llm.infer.decoding import left_pad
    from text2llm.infer.generate import TorchEngine
    from text2llm.infer.ort_runtime import OrtEngine
    from text2llm.interop.onnx import export_model

    m = _model(**ALL, n_head=2, n_kv_head=1)
    out = export_model(m, tmp_path / "onnx")
    rng = np.random.default_rng(0)
    ids, mask = left_pad([list(rng.integers(3, 97, size=n)) for n in (7, 4)], 0)
    ort_e, pt_e = OrtEngine.load(out), TorchEngine(m)
    a, b = ort_e.prefill(ids, mask, total_len=ids.shape[1] + 6), pt_e.prefill(ids, mask, total_len=ids.shape[1] + 6)
    assert np.abs(a - b).max() <= 1e-4
    for _ in range(4):
        nxt = b.argmax(-1)
        a, b = ort_e.step(nxt), pt_e.step(nxt)
        assert np.abs(a - b).max() <= 1e-4
