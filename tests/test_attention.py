"""Sliding-window attention (model/attention.py) through every stage: the config, the band against
a reference written here, the blocked path, document masks, the ring-buffer KV cache, decoding past
max_seq_len, the engines, MoE, int8 and pruning, training, ONNX Runtime. (Hugging Face parity:
tests/test_hf.py, cases mistral / ministral / mixtral-window.)

fp32 throughout, on models of a few thousand parameters.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from text2llm.infer.fast_step import FastDecodeStep
from text2llm.infer.generate import TorchEngine
from text2llm.infer.packing import pack_weights
from text2llm.model import KVCache, ModelConfig, Transformer
from text2llm.model.attention import block_attention, dense_band_attention, pick_path, windowed_attention
from text2llm.model.transformer import apply_rope, causal_mask, document_mask

V = 61


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64, attention_window=8)
    return ModelConfig(**{**base, **kw})


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # non-trivial norms, so a wrong mapping cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def ids(B=2, T=40, seed=1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def reference_attention(q, k, v, window, allowed=None):
    """softmax(q k^T / sqrt(Dh)) v with query i seeing key j iff i - window < j <= i (and
    ``allowed[..., i, j]``): the definition, written plainly."""
    T = q.size(2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    see = (j <= i) & (i - j < window)
    if allowed is not None:
        see = see & allowed
    return torch.softmax(scores.masked_fill(~see, float("-inf")), dim=-1) @ v


# ---- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("over, message", [
    (["model.window_pattern=\"SSL\""], r"model\.window_pattern .*needs model\.attention_window > 0"),
    (["model.attention_window=8", "model.window_pattern=\"SxL\""], r"only the letters S .* and L"),
    (["model.attention_window=8", "model.window_pattern=\"ssl\""], r"only the letters S"),
    (["model.attention_window=8", "model.window_pattern=\"LL\""], r"leaves none of the 4 layers windowed"),
    (["model.attention_window=-1"], r"model\.attention_window"),
    (["model.attention_window=512"], r"attention_window \(512\) must be <= model\.max_seq_len \(256\)"),
])
def test_config_errors_are_one_line_naming_the_field(over, message):
    from text2llm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message) as e:
        load_config(overrides=over)
    assert "\n" not in str(e.value)


def test_pattern_repeats_over_the_depth():
    cfg = tiny(n_layer=5, window_pattern="SSL")
    assert cfg.pattern == "SSLSS" and [cfg.layer_window(i) for i in range(5)] == [8, 8, 0, 8, 8]
    assert tiny(n_layer=3).pattern == "SSS" and tiny(attention_window=0).pattern == "LL"
    assert tiny().unbounded_context and not tiny(window_pattern="SL").unbounded_context
    assert not ModelConfig(attention_window=0).unbounded_context


def test_preset_config_uses_a_window():
    from pathlib import Path

    from text2llm.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "sliding-window.toml")
    assert cfg.model.attention_window > 0 and "L" in cfg.model.pattern and cfg.train.seq_len > cfg.model.attention_window


# ---- the band --------------------------------------------------------------------------------


def test_window_covering_the_sequence_equals_dense_exactly():
    """A window >= the sequence changes nothing: bitwise the dense model's logits, with and
    without a document mask, and its gradients."""
    x = ids(T=24)
    dense = build(tiny(attention_window=0))
    for window in (24, 64):
        windowed = build(tiny(attention_window=window, window_pattern="SL"))
        assert torch.equal(windowed(x).logits, dense(x).logits)
        dm = document_mask(torch.cumsum(x == 5, dim=1))
        assert torch.equal(windowed(x, attn_mask=dm).logits, dense(x, attn_mask=dm).logits)
    windowed.train(), dense.train()
    windowed(x).logits.square().mean().backward()
    dense(x).logits.square().mean().backward()
    for (name, a), b in zip(windowed.named_parameters(), dense.parameters()):
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("T, window", [(37, 8), (64, 16), (50, 7), (33, 32), (40, 1)])
def test_blocked_and_dense_paths_equal_the_reference(T, window):
    torch.manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ref = reference_attention(q, k, v, window)
    for fn in (block_attention, dense_band_attention):
        out = fn(q, k, v, window)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
        g = torch.randn_like(ref)  # gradients through the blocks, too
        want = torch.autograd.grad(ref, (q, k, v), g, retain_graph=True)
        got = torch.autograd.grad(out, (q, k, v), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_a_windowed_layer_equals_reference_attention():
    """The model's Attention module (GQA, RoPE) with a window == projections + the reference
    attention + o_proj, computed here step by step."""
    model = build(tiny(n_layer=1))
    attn = model.blocks[0].attn
    T = 29
    x = torch.randn(2, T, 32)
    rope = (model.rope_cos[:T], model.rope_sin[:T])
    with torch.no_grad():
        got = attn(x, rope, None, None)
        q = apply_rope(attn.q_proj(x).view(2, T, 4, 8).transpose(1, 2), *rope)
        k = apply_rope(attn.k_proj(x).view(2, T, 2, 8).transpose(1, 2), *rope).repeat_interleave(2, dim=1)
        v = attn.v_proj(x).view(2, T, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        want = attn.o_proj(reference_attention(q, k, v, 8).transpose(1, 2).reshape(2, T, 32))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_document_mask_and_window_together():
    """A token sees only its own document *and* its window: blocked path == reference, and the
    model's forward with a document mask == the same documents run one by one."""
    torch.manual_seed(0)
    T, window = 45, 8
    doc_BT = torch.tensor([[0] * 5 + [1] * 22 + [2] * 18, [0] * 30 + [1] * 15])
    dm = document_mask(doc_BT)  # B 1 T T
    q, k, v = (torch.randn(2, 4, T, 8, dtype=torch.float64) for _ in range(3))
    ref = reference_attention(q, k, v, window, dm)
    torch.testing.assert_close(block_attention(q, k, v, window, dm), ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(dense_band_attention(q, k, v, window, dm), ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(windowed_attention(q, k, v, window, dm), ref, atol=1e-10, rtol=0)

    model = build(tiny())
    x = ids(T=T)
    with torch.no_grad():
        packed = model(x, attn_mask=dm).logits
        for b in range(2):
            for d in doc_BT[b].unique():
                cols = (doc_BT[b] == d).nonzero()[:, 0]
                alone = model(x[b : b + 1, cols]).logits[0]
                torch.testing.assert_close(packed[b, cols], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", ["T T", "1 1 T T", "B 1 T T", "B H T T"])
def test_blocked_path_takes_masks_of_every_broadcast_shape(shape):
    torch.manual_seed(1)
    B, H, T = 2, 3, 29
    q, k, v = (torch.randn(B, H, T, 8, dtype=torch.float64) for _ in range(3))
    full = (torch.rand(B, H, T, T) > 0.3) | torch.eye(T, dtype=torch.bool)  # the diagonal: no empty row
    mask = {"T T": full[0, 0], "1 1 T T": full[:1, :1], "B 1 T T": full[:, :1], "B H T T": full}[shape]
    ref = reference_attention(q, k, v, 6, mask)
    torch.testing.assert_close(block_attention(q, k, v, 6, mask), ref, atol=1e-10, rtol=0)


def test_path_rule():
    """The measured rule (docs/attention.md): blocks from 3 windows of queries and 512 tokens on."""
    cpu = torch.device("cpu")
    assert pick_path(768, 768, 256, cpu) == pick_path(512, 512, 128, cpu) == "blocks"
    assert pick_path(384, 384, 64, cpu) == "dense"  # under 512 tokens
    assert pick_path(1024, 1024, 512, cpu) == "dense"  # under 3 windows
    assert pick_path(1, 2048, 128, cpu) == "dense"  # a decode step
    assert pick_path(64, 64, 64, cpu) == "dense"


def test_long_sequence_takes_the_blocks_and_equals_the_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 600, 8) for _ in range(3))
    assert pick_path(600, 600, 64, q.device) == "blocks"
    torch.testing.assert_close(windowed_attention(q, k, v, 64), reference_attention(q, k, v, 64), atol=1e-5, rtol=0)


def test_flops_count_the_window():
    dense, windowed = build(tiny(attention_window=0)), build(tiny(window_pattern="SL"))
    assert dense.flops_per_token(64) - windowed.flops_per_token(64) == 12 * 32 * (64 - 8)


# ---- the KV cache ----------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["S", "SL"])
def test_ring_buffer_decode_equals_full_forward_over_3x_the_window(pattern):
    model = build(tiny(window_pattern=pattern))
    x = ids(T=3 * 8 + 5)
    with torch.no_grad():
        full = model(x).logits
        cache = KVCache(model.cfg, 2)
        assert [k.size(2) for k in cache.k] == [8 if c == "S" else 64 for c in model.cfg.pattern]
        steps = [model(x[:, :3], cache=cache).logits]
        steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(3, x.size(1))]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
        cache = KVCache(model.cfg, 2)  # in chunks: a prompt longer than the window, then more
        chunks = [model(x[:, a:b], cache=cache).logits for a, b in ((0, 11), (11, 14), (14, 29))]
        torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=0)


def test_ring_cache_bytes_are_window_over_context():
    cfg = tiny(max_seq_len=256, attention_window=32)
    ring, full = KVCache(cfg, 1, 256), KVCache(cfg, 1, 256, ring=False)
    assert ring.nbytes * 256 == full.nbytes * 32


@pytest.mark.parametrize("pattern", ["S", "SL"])
def test_engines_decode_a_padded_batch_like_forward(pattern):
    """TorchEngine with the fast decode step, with forward, with a full cache and the band (what
    the compiled steps use) and without a cache: the same logits, on a left-padded batch, past
    three windows."""
    model = build(tiny(window_pattern=pattern, d_model=64))
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, V, size=(3, 10))
    mask = np.ones_like(prompt)
    mask[0, :4] = mask[1, :1] = 0
    engines = [TorchEngine(model), TorchEngine(model, fast_step=False), TorchEngine(model, use_cache=False)]
    outs = [e.prefill(prompt, mask, 40) for e in engines]
    assert engines[0].fast_step is not None and engines[1].fast_step is None
    for _ in range(29):
        for o in outs[1:]:
            np.testing.assert_allclose(o, outs[0], atol=1e-5)
        nxt = outs[0].argmax(-1)
        outs = [e.step(nxt) for e in engines]
    # the full buffers + band of a compiled step, run eagerly
    cache = KVCache(model.cfg, 3, 40, ring=False)
    x = torch.from_numpy(np.concatenate([prompt, rng.integers(3, V, size=(3, 20))], 1))
    valid = torch.cat([torch.from_numpy(mask).bool(), torch.ones(3, 20, dtype=torch.bool)], 1)
    with torch.no_grad():
        want = model(x, attn_mask=causal_mask(30, key_padding_BS=valid)).logits
        model(x[:, :10], cache=cache, attn_mask=causal_mask(10, key_padding_BS=valid[:, :10]))
        for t in range(10, 30):
            got = model.decode_step(x[:, t : t + 1], t, cache, valid[:, None, None, : t + 1])
            torch.testing.assert_close(got[valid[:, t]], want[valid[:, t], t], atol=1e-5, rtol=0)
    # the fast decode step over the same full buffers (a batch past an AOT export's max_batch)
    step = FastDecodeStep.build(pack_weights(model))
    cache = KVCache(model.cfg, 3, 40, ring=False)
    with torch.no_grad():
        model(x[:, :10], cache=cache, attn_mask=causal_mask(10, key_padding_BS=valid[:, :10]))
        for t in range(10, 30):
            got = step(x[:, t], t, cache, valid[:, None, None, : t + 1])
            torch.testing.assert_close(got[valid[:, t]], want[valid[:, t], t], atol=1e-5, rtol=0)
    pack_weights(model, on=False)


def test_all_windowed_rope_model_decodes_past_max_seq_len():
    """Every layer windowed: the cache never fills, RoPE rows past the table are computed, and the
    logits equal a full forward (which may run past max_seq_len too) far beyond max_seq_len."""
    model = build(tiny(max_seq_len=16))
    x = ids(B=1, T=70)
    with torch.no_grad():
        full = model(x).logits
        eng = TorchEngine(model)
        assert eng.max_len > 16
        outs = [eng.prefill(x[:, :5].numpy(), np.ones((1, 5), np.int64), 70)]
        outs += [eng.step(x[:, t].numpy()) for t in range(5, 69)]
    np.testing.assert_allclose(np.stack(outs, 1)[0], full[0, 4:69].numpy(), atol=1e-5)
    assert all(k.size(2) == 8 for k in eng.cache.k)


@pytest.mark.parametrize("kw, why", [
    (dict(positions="learned", norm="layernorm", activation="gelu"), "learned positions have no embedding past it"),
    (dict(window_pattern="SL"), "has full layers"),
])
def test_past_max_seq_len_refused_with_a_reason(kw, why):
    model = build(tiny(max_seq_len=16, **kw))
    with pytest.raises(ValueError, match=why):
        model(ids(B=1, T=17))
    assert TorchEngine(model).max_len == 16


# ---- the other stages ------------------------------------------------------------------------


def test_moe_with_a_window():
    model = build(tiny(n_experts=4, moe_top_k=2, window_pattern="SL"))
    x = ids(T=30)
    with torch.no_grad():
        out = model(x)
        cache = KVCache(model.cfg, 2)
        steps = [model(x[:, :4], cache=cache).logits] + [model(x[:, t : t + 1], cache=cache).logits
                                                         for t in range(4, 30)]
    assert out.aux_loss is not None and out.expert_load.sum() == 2 * 30 * 2 * 2  # 2 layers, top-2
    torch.testing.assert_close(torch.cat(steps, 1), out.logits, atol=1e-5, rtol=0)


def test_int8_and_pruning_keep_the_window():
    from text2llm.compress.prune import prune_ffn, prune_heads
    from text2llm.compress.quantize import quantize_model

    model = build(tiny(d_model=64, n_head=4, n_kv_head=4, window_pattern="SL"))
    x = ids(T=30)
    with torch.no_grad():
        ref = model(x).logits
    q = quantize_model(build(tiny(d_model=64, n_head=4, n_kv_head=4, window_pattern="SL")))
    with torch.no_grad():
        got = q(x).logits
    assert q.cfg.pattern == "SL" and q.blocks[0].attn.window == 8 and q.blocks[1].attn.window == 0
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    # decoding one row at a time (int8 quantizes each call's rows: compare like with like)
    fast, ref = TorchEngine(q), TorchEngine(q, fast_step=False)
    a, b = (e.prefill(x[:, :4].numpy(), np.ones((2, 4), np.int64), 30) for e in (fast, ref))
    assert fast.fast_step is not None
    for t in range(4, 29):
        np.testing.assert_allclose(a, b, atol=1e-4)
        a, b = fast.step(x[:, t].numpy()), ref.step(x[:, t].numpy())
    for pruned, _ in (prune_ffn(model, 0.5), prune_heads(model, 0.25)):
        assert pruned.cfg.pattern == "SL" and pruned.blocks[0].attn.window == 8
        cache = KVCache(pruned.cfg, 2)
        with torch.no_grad():
            full = pruned(x).logits
            steps = [pruned(x[:, :4], cache=cache).logits] + [pruned(x[:, t : t + 1], cache=cache).logits
                                                              for t in range(4, 30)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_training_with_window_and_document_mask(tmp_path):
    from test_train import make_tokens, tiny_config
    from text2llm.checkpoint import load_model
    from text2llm.train.trainer import train

    tokens = make_tokens(tmp_path / "tokens", n_train=6000, n_val=1000)
    cfg = tiny_config(max_steps=3, document_mask=True)
    cfg.model.attention_window = 8
    cfg.model.window_pattern = "SL"
    r = train(cfg, tokens, tmp_path / "run", progress=False)
    assert r.step == 3 and math.isfinite(r.val_loss or 0.0)
    model, _ = load_model(tmp_path / "run")
    assert model.cfg.attention_window == 8 and model.cfg.pattern == "SL"


def test_onnx_windowed_cache_and_greedy_text_equal_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    import text2llm
    from test_generate import PROMPTS, tiny_checkpoint
    from text2llm.infer.decoding import SamplingParams, complete, left_pad
    from text2llm.infer.generate import generate_batch
    from text2llm.infer.ort_runtime import OrtEngine
    from text2llm.interop.onnx import export_onnx

    ckpt = tiny_checkpoint(tmp_path, n_kv_head=2, attention_window=8, window_pattern="SL")
    model, tok = text2llm.load(ckpt)
    out = export_onnx(ckpt, tmp_path / "onnx")
    ort_e, pt_e = OrtEngine.load(out), TorchEngine(model)
    ids_, mask = left_pad([[tok.bos_id] + tok.encode(p) for p in PROMPTS], tok.pad_id)  # a padded batch
    a, b = ort_e.prefill(ids_, mask, 64), pt_e.prefill(ids_, mask, 64)
    for _ in range(3 * 8):
        np.testing.assert_allclose(a, b, atol=1e-4)
        nxt = b.argmax(-1)
        a, b = ort_e.step(nxt), pt_e.step(nxt)
    p = SamplingParams(max_new_tokens=40, temperature=0)
    assert [c.text for c in complete(OrtEngine.load(out), tok, PROMPTS, p)] == \
        generate_batch(model, tok, PROMPTS, 40, temperature=0)


@pytest.mark.skipif(__import__("os").environ.get("T2L_COMPILE_TESTS") != "1",
                    reason="real torch.compile and AOTInductor compiles, ~1-2 min on 2 cores; run with T2L_COMPILE_TESTS=1")
def test_compiled_and_aot_steps_decode_a_windowed_model_like_eager(tmp_path):
    """The compiled decode steps read full buffers and apply the band as a mask (no ring buffer in
    a graph): greedy text past three windows equals the eager engine's, padded batch included."""
    import text2llm
    from test_generate import PROMPTS, tiny_checkpoint
    from text2llm.infer.aot import export_aot
    from text2llm.infer.decoding import SamplingParams, complete

    ckpt = tiny_checkpoint(tmp_path, n_kv_head=2, attention_window=8, window_pattern="SL")
    model, tok = text2llm.load(ckpt)
    p = SamplingParams(max_new_tokens=30, temperature=0)
    want = [c.text for c in complete(TorchEngine(model), tok, PROMPTS, p)]
    aot = export_aot(ckpt, tmp_path / "aot", max_batch=4)
    for eng in (TorchEngine(model, compile=True), TorchEngine(model, aot_dir=aot)):
        assert [c.text for c in complete(eng, tok, PROMPTS, p)] == want
        assert all(k.size(2) >= 30 for k in eng.cache.k)  # full buffers
