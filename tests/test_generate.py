"""Generation with PyTorch: KV cache == no cache, batches with left padding == one by one, sampling
reproducible with a seed, top-k / top-p / repetition-penalty masks, stop strings, streaming, CLI.

``tiny_checkpoint`` (also used by the ONNX and server tests) trains a ~300-token SentencePiece
tokenizer on a few KB of the bundled stories and saves a random 2-layer model as a checkpoint.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from text2llm.infer.decoding import (SamplingParams, TextStream, apply_repetition_penalty, complete,
                                     filter_logits_np, iter_tokens, sample_np)
from text2llm.infer.generate import TorchEngine, generate, generate_batch, generate_ids

ASSET = Path(__file__).resolve().parents[1] / "src" / "text2llm" / "assets" / "tinystories" / "train-000.jsonl.gz"
PROMPTS = ["Once upon a time", "Tom", "The little dog ran to the park and"]


def tiny_checkpoint(root: Path, positions: str = "rope", n_kv_head: int = 0, **model_kw) -> Path:
    """A checkpoint dir with a random tiny model and a trained tiny tokenizer (``model_kw``: more
    ModelConfig fields)."""
    from text2llm.config import Config
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer
    from text2llm.tokenizer import train_tokenizer
    from text2llm.train.checkpoint import save_checkpoint

    texts = []
    with gzip.open(ASSET, "rt", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if sum(map(len, texts)) > 20_000:
                break
    cfg = Config()
    cfg.tokenizer.vocab_size = 384
    cfg.tokenizer.threads = 1
    tok = train_tokenizer(texts, root / "tok", cfg.tokenizer)
    cfg.train.seq_len = 64
    cfg.model = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, n_kv_head=n_kv_head,
                            max_seq_len=64, positions=positions, init_std=0.1, **model_kw)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    return save_checkpoint(root / "run", 1, model, None, {}, cfg.to_toml(), root / "tok")


def shared_checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint, built once per test session (the ONNX and server tests reuse it)."""
    root = tmp_path_factory.getbasetemp() / "text2llm-tiny"
    ckpt = root / "run" / "checkpoints" / "step_0000001"
    if not ckpt.is_dir():
        tiny_checkpoint(root)
    return ckpt


def shared_export(tmp_path_factory) -> Path:
    """The tiny checkpoint exported to ONNX (fp32 + int8), once per test session."""
    from text2llm.interop.onnx import export_onnx

    out = tmp_path_factory.getbasetemp() / "text2llm-tiny-onnx"
    if not (out / "text2llm-onnx.json").is_file():
        export_onnx(shared_checkpoint(tmp_path_factory), out, int8=True, overwrite=True)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import text2llm

    ckpt = shared_checkpoint(tmp_path_factory)
    model, tok = text2llm.load(ckpt)
    return ckpt, model, tok


def _greedy_ids(model, ids, n, use_cache):
    return list(generate_ids(model, ids, n, temperature=0, use_cache=use_cache))


def test_kv_cache_greedy_equals_no_cache(tiny):
    _, model, tok = tiny
    ids = [tok.bos_id] + tok.encode("Once upon a time there was")
    with_cache = _greedy_ids(model, ids, 40, True)
    without = _greedy_ids(model, ids, 40, False)
    assert len(with_cache) > 10 and with_cache == without


def test_kv_cache_logits_equal_full_forward(tiny):
    _, model, tok = tiny
    ids = np.array([[tok.bos_id] + tok.encode("The cat sat on the mat")])
    eng, ref = TorchEngine(model), TorchEngine(model, use_cache=False)
    a, b = eng.prefill(ids, np.ones_like(ids)), ref.prefill(ids, np.ones_like(ids))
    np.testing.assert_allclose(a, b, atol=1e-5)
    for t in [5, 17, 42]:
        np.testing.assert_allclose(eng.step(np.array([t])), ref.step(np.array([t])), atol=1e-5)


def test_batch_with_left_padding_equals_one_by_one(tiny):
    _, model, tok = tiny
    batch = generate_batch(model, tok, PROMPTS, max_new_tokens=20, temperature=0)
    single = [generate_batch(model, tok, [p], max_new_tokens=20, temperature=0)[0] for p in PROMPTS]
    assert batch == single
    # and the logits: a padded row gives the same numbers as the row alone
    enc = [[tok.bos_id] + tok.encode(p) for p in PROMPTS]
    from text2llm.infer.decoding import left_pad

    ids, mask = left_pad(enc, tok.pad_id)
    eng = TorchEngine(model)
    lb = eng.prefill(ids, mask)
    step_b = eng.step(np.array([7, 7, 7]))
    for b, e in enumerate(enc):
        one = TorchEngine(model)
        np.testing.assert_allclose(one.prefill(np.array([e]), np.ones((1, len(e)), np.int64))[0], lb[b], atol=1e-5)
        np.testing.assert_allclose(one.step(np.array([7]))[0], step_b[b], atol=1e-5)


def test_learned_positions_batch_equals_one_by_one(tmp_path):
    import text2llm

    model, tok = text2llm.load(tiny_checkpoint(tmp_path, positions="learned", n_kv_head=2))
    batch = generate_batch(model, tok, PROMPTS, max_new_tokens=10, temperature=0)
    assert batch == [generate_batch(model, tok, [p], max_new_tokens=10, temperature=0)[0] for p in PROMPTS]


def test_sampling_reproducible_with_seed(tiny):
    _, model, tok = tiny
    kw = dict(max_new_tokens=30, temperature=1.0, top_k=0, top_p=0.95)
    a = generate_batch(model, tok, PROMPTS, seed=3, **kw)
    assert a == generate_batch(model, tok, PROMPTS, seed=3, **kw)
    assert a != generate_batch(model, tok, PROMPTS, seed=4, **kw)
    # cache or no cache: same logits -> same draws
    assert a == generate_batch(model, tok, PROMPTS, seed=3, use_cache=False, **kw)


def test_top_k_top_p_masks():
    logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=np.float32))
    keep = lambda x: np.isfinite(x[0]).tolist()
    assert keep(filter_logits_np(logits, top_k=2)) == [True, True, False, False, False]
    assert keep(filter_logits_np(logits, top_p=0.5)) == [True, False, False, False, False]
    assert keep(filter_logits_np(logits, top_p=0.6)) == [True, True, False, False, False]
    assert keep(filter_logits_np(logits, top_p=0.86)) == [True, True, True, True, False]
    assert keep(filter_logits_np(logits, top_k=3, top_p=0.99)) == [True, True, True, False, False]
    # shuffled vocab: the mask follows the values
    perm = np.array([3, 0, 4, 1, 2])
    shuffled = logits[:, perm]
    assert keep(filter_logits_np(shuffled, top_p=0.6)) == [False, True, False, True, False]
    # a sample never leaves the kept set
    rng = np.random.default_rng(0)
    p = SamplingParams(temperature=1.0, top_k=2)
    draws = {int(sample_np(np.repeat(logits, 64, 0), p, rng)[i]) for i in range(64)}
    assert draws == {0, 1}


def test_repetition_penalty():
    logits = np.array([[2.0, -1.0, 1.0]], dtype=np.float32)
    seen = np.array([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    np.testing.assert_allclose(out, [[1.0, -2.0, 1.0]])
    with pytest.raises(Exception):
        SamplingParams(repetition_penalty=0)


def test_repetition_penalty_changes_greedy_output(tiny):
    _, model, tok = tiny
    plain = generate(model, tok, "Tom", 30, temperature=0)
    penal = generate(model, tok, "Tom", 30, temperature=0, repetition_penalty=1.5)
    assert plain != penal


class _CharTok:
    """A tokenizer whose ids are code points (for TextStream tests)."""
    eos_id, pad_id = -5, -6

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_text_stream_stop_strings_and_holdback():
    s = TextStream(_CharTok(), stop=["END"])
    pieces = [s.push(ord(c)) for c in "abcEN"]
    assert "".join(pieces) == "abc"  # "EN" held back: it may become "END"
    assert s.push(ord("D")) == "" and s.stopped and s.text == "abc"
    s = TextStream(_CharTok(), stop=["END"])
    out = "".join(s.push(ord(c)) for c in "xENy") + s.finish()
    assert out == "xENy" and not s.stopped


def test_stop_strings_and_streaming_match(tiny):
    _, model, tok = tiny
    full = generate_batch(model, tok, ["Once upon a time"], 40, temperature=0)[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3
    pieces = []
    cut = generate_batch(model, tok, ["Once upon a time"], 40, temperature=0, stop=[stop],
                         on_text=lambda r, s: pieces.append(s))[0]
    assert cut == full[: full.index(stop)]
    assert "".join(pieces) == cut


def test_long_prompt_truncated_with_warning(tiny):
    _, model, tok = tiny
    long = "Once upon a time there was a little girl. " * 30
    with pytest.warns(UserWarning, match="truncated from the left"):
        out = generate(model, tok, long, 10, temperature=0)
    assert out.startswith(long)
    with pytest.warns(UserWarning):
        (c,) = complete(TorchEngine(model), tok, [long], SamplingParams(max_new_tokens=10, temperature=0))
    assert c.prompt_tokens == model.cfg.max_seq_len - 1 and c.tokens == 1 and c.finish_reason == "length"


def test_cli_generate_stream_and_interactive(tiny, capsys, monkeypatch):
    import io

    from text2llm.cli import main

    ckpt, model, tok = tiny
    want = generate(model, tok, "Tom", 15, temperature=0)
    rc = main(["generate", str(ckpt), "--prompt", "Tom", "--max-new-tokens", "15", "--temperature", "0", "--stream"])
    assert rc == 0 and capsys.readouterr().out == want + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("Tom\n\nOnce upon a time\n"))
    rc = main(["generate", str(ckpt), "--interactive", "--max-new-tokens", "15", "--temperature", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and out == want + "\n" + generate(model, tok, "Once upon a time", 15, temperature=0) + "\n"
    assert main(["generate", str(ckpt), "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err


# ---- compiled decoding (TorchEngine(compile=True), generate --compile) -----------------------------


def test_decode_step_equals_forward(tiny, tmp_path, monkeypatch):
    """The compiled engine's step (Transformer.decode_step, the cache position as an argument),
    run eagerly (torch.compile replaced by the identity): same logits as the KV-cache engine, for a
    left-padded batch, with rotary and with learned positions (and GQA)."""
    import text2llm

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    _, model, tok = tiny
    learned, _ = text2llm.load(tiny_checkpoint(tmp_path, positions="learned", n_kv_head=2))
    from text2llm.infer.decoding import left_pad

    ids, mask = left_pad([[tok.bos_id] + tok.encode(p) for p in PROMPTS], tok.pad_id)
    for m in (model, learned):
        ref, eng = TorchEngine(m), TorchEngine(m, compile=True)
        np.testing.assert_allclose(eng.prefill(ids, mask, ids.shape[1] + 6), ref.prefill(ids, mask), atol=1e-5)
        for t in [5, 17, 42, 3, 99, 8]:
            np.testing.assert_allclose(eng.step(np.full(3, t)), ref.step(np.full(3, t)), atol=1e-5)
        assert eng.cache.pos == ref.cache.pos == ids.shape[1] + 6
        with pytest.raises(ValueError, match="full"):  # the cache was sized for 6 new tokens
            eng.step(np.full(3, 1))


@pytest.mark.parametrize("kw", [
    {},  # the default shape: RoPE, RMSNorm, SwiGLU, tied head
    {"n_head": 6, "n_kv_head": 2, "d_model": 96, "tie_embeddings": False},  # GQA, 3 query heads per K/V head
    {"positions": "learned", "norm": "layernorm", "activation": "gelu", "bias": True},
])
def test_fast_step_equals_forward(kw):
    """The eager engine's decode step (infer/fast_step.py) gives forward's logits, on a left-padded
    batch, step after step, for each architecture option it covers."""
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer

    torch.manual_seed(0)
    kw = {"d_model": 64, "n_head": 4, **kw}
    model = Transformer(ModelConfig(vocab_size=300, n_layer=2, max_seq_len=64, **kw)).eval()
    fast, ref = TorchEngine(model), TorchEngine(model, fast_step=False)
    ids = np.random.default_rng(0).integers(3, 300, size=(3, 7))
    mask = np.ones_like(ids)
    mask[0, :3] = mask[1, :1] = 0
    a, b = fast.prefill(ids, mask, 20), ref.prefill(ids, mask, 20)
    assert fast.fast_step is not None and ref.fast_step is None
    for _ in range(13):
        np.testing.assert_allclose(a, b, atol=1e-5)
        nxt = b.argmax(-1)
        a, b = fast.step(nxt), ref.step(nxt)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert fast.cache.pos == ref.cache.pos == 20
    # the keys and values it wrote are forward's
    for la, lb in zip(fast.cache.k + fast.cache.v, ref.cache.k + ref.cache.v):
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="full"):
        fast.step(nxt)


def test_fast_step_sees_new_weights_and_skips_moe():
    """Built again at each prefill: a weight changed between two generations (a training step
    between samples) is used; an MoE model decodes through forward."""
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=100, d_model=32, n_layer=2, n_head=2, max_seq_len=32)).eval()
    eng = TorchEngine(model)
    ids = np.array([[5, 6, 7]])
    eng.prefill(ids, np.ones_like(ids), 8)
    before = eng.step(np.array([9]))
    with torch.no_grad():
        model.blocks[1].mlp.down_proj.weight.mul_(3.0)
    eng.prefill(ids, np.ones_like(ids), 8)
    after = eng.step(np.array([9]))
    ref = TorchEngine(model, fast_step=False)
    ref.prefill(ids, np.ones_like(ids), 8)
    np.testing.assert_allclose(after, ref.step(np.array([9])), atol=1e-5)
    assert np.abs(after - before).max() > 1e-3

    moe = Transformer(ModelConfig(vocab_size=100, d_model=32, n_layer=2, n_head=2, max_seq_len=32,
                                  n_experts=4, moe_top_k=2)).eval()
    eng = TorchEngine(moe)
    eng.prefill(ids, np.ones_like(ids), 8)
    assert eng.fast_step is None and eng.step(np.array([9])).shape == (1, 100)


def test_engine_sizes_its_cache_by_the_request():
    """prefill(..., total_len) sizes the cache for prompt + new tokens (the decoding loop passes it),
    not for the whole context."""
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2, max_seq_len=1024)).eval()
    eng = TorchEngine(model)
    ids = np.ones((2, 10), np.int64)
    for total, want in [(20, 20), (5, 10), (None, 1024), (5000, 1024)]:
        eng.prefill(ids, np.ones_like(ids), total)
        assert eng.cache.max_len == eng.ids.size(1) == want
    prompts = [[1, 2, 3]]
    list(iter_tokens(eng, prompts, SamplingParams(max_new_tokens=7, temperature=0), None, 0))
    assert eng.cache.max_len == 10


@pytest.mark.skipif(os.environ.get("T2L_COMPILE_TESTS") != "1",
                    reason="a real inductor compile, ~40 s on 2 cores (ENVIRONMENT.md: keep torch.compile out of "
                           "the unit tests); run with T2L_COMPILE_TESTS=1. benchmarks/generate.py checks it too")
def test_compiled_generation_equals_eager(tiny, capsys):
    """A real torch.compile (inductor, C++): `generate --compile` prints the eager greedy text, and the
    compiled step's logits match the eager ones."""
    from text2llm.cli import main

    ckpt, model, tok = tiny
    want = generate(model, tok, "Tom", 12, temperature=0)
    rc = main(["generate", str(ckpt), "--prompt", "Tom", "--max-new-tokens", "12", "--temperature", "0", "--compile"])
    assert rc == 0 and capsys.readouterr().out == want + "\n"
    ids = np.array([[tok.bos_id] + tok.encode("The cat sat")])
    ref, eng = TorchEngine(model), TorchEngine(model, compile=True)
    np.testing.assert_allclose(eng.prefill(ids, np.ones_like(ids), 20), ref.prefill(ids, np.ones_like(ids)), atol=1e-5)
    for t in [5, 17, 42]:
        np.testing.assert_allclose(eng.step(np.array([t])), ref.step(np.array([t])), atol=1e-4)


def test_compile_flag_rejected_for_onnx(tmp_path_factory, capsys):
    from text2llm.cli import main

    assert main(["generate", str(shared_export(tmp_path_factory)), "--compile"]) == 2
    assert "--compile applies to PyTorch checkpoints" in capsys.readouterr().err


def _fake_aot_dir(tmp_path, ckpt, torch_version):
    """A dir laid out like `text2llm export aot` output, without the (slow) compile."""
    import json
    import shutil

    import torch

    d = tmp_path / "aot"
    shutil.copytree(ckpt, d)
    (d / "text2llm-aot.json").write_text(json.dumps({"format_version": 1, "torch": torch_version or torch.__version__,
                                                      "device": "cpu", "max_batch": 4, "max_seq_len": 64}))
    return d


def test_aot_dir_refused_when_it_cannot_run(tiny, tmp_path, capsys):
    """An AOT export names what it was built with: another torch version or a missing package is
    one clear line (export again), `--compile` on it is refused, and `export aot` keeps a
    non-empty output dir."""
    from text2llm.cli import main
    from text2llm.errors import UserError

    ckpt, model, _ = tiny
    old = _fake_aot_dir(tmp_path / "a", ckpt, "1.0.0")
    with pytest.raises(UserError, match="compiled with torch 1.0.0.*export it again"):
        TorchEngine(model, aot_dir=old)
    missing = _fake_aot_dir(tmp_path / "b", ckpt, None)
    with pytest.raises(UserError, match="decode_step.pt2 is missing"):
        TorchEngine(model, aot_dir=missing)
    assert main(["generate", str(missing), "--compile", "--prompt", "Tom"]) == 2
    assert "compiled already" in capsys.readouterr().err
    assert main(["export", "aot", str(ckpt), "--out", str(missing)]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.skipif(os.environ.get("T2L_COMPILE_TESTS") != "1",
                    reason="a real AOTInductor compile, ~30 s on 2 cores; run with T2L_COMPILE_TESTS=1")
def test_aot_export_generates_like_eager(tiny, tmp_path, capsys):
    """`export aot` then `generate DIR`: the eager greedy text, for a left-padded batch too, and a
    batch beyond --max-batch decodes eagerly with the same result."""
    from text2llm.cli import main
    from text2llm.infer.aot import is_aot_dir

    ckpt, model, tok = tiny
    out = tmp_path / "aot"
    assert main(["export", "aot", str(ckpt), "--out", str(out), "--max-batch", "2"]) == 0 and is_aot_dir(out)
    capsys.readouterr()
    want = generate(model, tok, "Tom", 12, temperature=0)
    assert main(["generate", str(out), "--prompt", "Tom", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == want + "\n"
    eng = TorchEngine(model, aot_dir=out)
    for prompts in (PROMPTS[:2], PROMPTS[:3]):  # 2: the compiled step, left-padded; 3 > max batch: eager
        p = SamplingParams(max_new_tokens=15, temperature=0)
        assert [c.text for c in complete(eng, tok, prompts, p)] == generate_batch(model, tok, prompts, 15, temperature=0)
    ids = np.array([[tok.bos_id] + tok.encode("The cat sat")])
    ref = TorchEngine(model)
    np.testing.assert_allclose(eng.prefill(ids, np.ones_like(ids), 20), ref.prefill(ids, np.ones_like(ids), 20), atol=1e-5)
    for t in [5, 17, 42]:
        np.testing.assert_allclose(eng.step(np.array([t])), ref.step(np.array([t])), atol=1e-4)
    # a batch fed a strided numpy column (every other token of a wider array) reads the right ids
    wide = np.array([[5, 0, 17, 0], [42, 0, 9, 0]])
    ids2 = np.array([[tok.bos_id] + tok.encode("The cat")] * 2)
    eng.prefill(ids2, np.ones_like(ids2), 20), ref.prefill(ids2, np.ones_like(ids2), 20)
    for col in (0, 2):
        np.testing.assert_allclose(eng.step(wide[:, col]), ref.step(wide[:, col]), atol=1e-4)
