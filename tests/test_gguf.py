"""GGUF export (`text2llm export gguf`), read back with the gguf package's own reader: tensors
equal to the checkpoint's (after the documented q/k permutation: exact in f32, close in f16 and
q8_0), the llama metadata, the tokenizer (SentencePiece and byte-level BPE), MoE experts, the
refusals; the permutation checked numerically against llama.cpp's adjacent-pair RoPE; and, where
llama-cpp-python is installed (`make test-interop`), llama.cpp's logits and greedy text equal ours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_generate import shared_checkpoint, tiny_checkpoint

import text2llm
from text2llm.cli import main
from text2llm.errors import UserError
from text2llm.interop.gguf import export_gguf, permute

gguf = pytest.importorskip("gguf")


def _read(path):
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def _expected(model):
    """What the file must hold, built here from the model's modules (not from the exporter's table)."""
    cfg = model.cfg
    want = {"token_embd.weight": model.embed.weight, "output_norm.weight": model.norm.weight}
    for i, b in enumerate(model.blocks):
        p = f"blk.{i}."
        want[p + "attn_norm.weight"] = b.attn_norm.weight
        want[p + "ffn_norm.weight"] = b.mlp_norm.weight
        want[p + "attn_q.weight"] = permute(b.attn.q_proj.weight, cfg.n_head)
        want[p + "attn_k.weight"] = permute(b.attn.k_proj.weight, cfg.kv_heads)
        want[p + "attn_v.weight"] = b.attn.v_proj.weight
        want[p + "attn_output.weight"] = b.attn.o_proj.weight
        if cfg.n_experts:
            want[p + "ffn_gate_inp.weight"] = b.mlp.router.weight
            for proj in ("gate", "up", "down"):
                want[p + f"ffn_{proj}_exps.weight"] = torch.stack([getattr(e, f"{proj}_proj").weight
                                                                    for e in b.mlp.experts])
        else:
            for proj in ("gate", "up", "down"):
                want[p + f"ffn_{proj}.weight"] = getattr(b.mlp, f"{proj}_proj").weight
    return {k: v.detach().numpy() for k, v in want.items()}


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """A GQA checkpoint (4 query heads over 2 K/V heads): k is permuted with the K/V head count."""
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("gqa"), n_kv_head=2)
    model, tok = text2llm.load(ckpt)
    return ckpt, model, tok


def test_f32_tensors_metadata_and_tokenizer(gqa, tmp_path):
    ckpt, model, tok = gqa
    out = export_gguf(ckpt, tmp_path / "m.gguf")
    fields, tensors = _read(out)
    cfg = model.cfg
    want = _expected(model)
    assert set(tensors) == set(want)  # tied head: no output.weight (llama.cpp reuses token_embd)
    for name, w in want.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_array_equal(np.asarray(t.data), w, err_msg=name)
    assert fields["general.architecture"] == "llama"
    for key, value in {"context_length": cfg.max_seq_len, "embedding_length": cfg.d_model,
                       "block_count": cfg.n_layer, "feed_forward_length": cfg.ffn_dim,
                       "attention.head_count": cfg.n_head, "attention.head_count_kv": 2,
                       "rope.dimension_count": cfg.head_dim, "vocab_size": cfg.vocab_size}.items():
        assert fields[f"llama.{key}"] == value, key
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    # the tokenizer: SentencePiece pieces, scores, types, special ids
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is False
    assert fields["tokenizer.ggml.tokens"] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert fields["tokenizer.ggml.scores"] == pytest.approx([tok._sp.get_score(i) for i in range(tok.vocab_size)])
    types = fields["tokenizer.ggml.token_type"]
    T = gguf.TokenType
    assert types[:4] == [T.CONTROL, T.CONTROL, T.CONTROL, T.UNKNOWN] and types[4] == T.BYTE
    assert types[-1] == T.NORMAL
    assert [fields[f"tokenizer.ggml.{k}_token_id"] for k in ("padding", "bos", "eos", "unknown")] == [0, 1, 2, 3]
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert "Assistant:" in fields["tokenizer.chat_template"]


def _rope_adjacent_pairs(x_TD, theta):
    """llama.cpp's RoPE (GGML_ROPE_TYPE_NORM): rotate (x[2j], x[2j+1]) by pos * theta^(-2j/Dh)."""
    T, D = x_TD.shape
    ang = np.arange(T)[:, None] * theta ** (-np.arange(0, D, 2) / D)[None, :]
    x1, x2 = x_TD[:, 0::2], x_TD[:, 1::2]
    out = np.empty_like(x_TD)
    out[:, 0::2] = x1 * np.cos(ang) - x2 * np.sin(ang)
    out[:, 1::2] = x1 * np.sin(ang) + x2 * np.cos(ang)
    return out


def test_permuted_q_k_under_llama_cpp_rope_give_our_attention_scores(gqa):
    """The reason for the permutation: llama.cpp rotating adjacent pairs of the permuted q/k
    computes the same q.k scores as our rotate-halves RoPE on the original weights."""
    from text2llm.model.transformer import apply_rope, rope_tables

    _, model, _ = gqa
    cfg, attn = model.cfg, model.blocks[0].attn
    Dh, T = cfg.head_dim, 12
    x = torch.randn(T, cfg.d_model, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_tables(Dh, T, cfg.rope_theta)
    with torch.no_grad():
        q = apply_rope((x @ attn.q_proj.weight.T).view(T, cfg.n_head, Dh).transpose(0, 1), cos, sin)
        k = apply_rope((x @ attn.k_proj.weight.T).view(T, cfg.kv_heads, Dh).transpose(0, 1), cos, sin)
        ours = q[0] @ k[0].T  # head 0 with its K/V head 0
        qp = (x @ permute(attn.q_proj.weight, cfg.n_head).T).view(T, cfg.n_head, Dh)[:, 0].numpy()
        kp = (x @ permute(attn.k_proj.weight, cfg.kv_heads).T).view(T, cfg.kv_heads, Dh)[:, 0].numpy()
    theirs = _rope_adjacent_pairs(qp, cfg.rope_theta) @ _rope_adjacent_pairs(kp, cfg.rope_theta).T
    np.testing.assert_allclose(theirs, ours.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, tol", [("f16", 2e-3), ("q8_0", 1.5e-2)])
def test_f16_and_q8_0_dequantize_close(gqa, tmp_path, kind, tol):
    ckpt, model, _ = gqa
    _, tensors = _read(export_gguf(ckpt, tmp_path / f"m-{kind}.gguf", type=kind))
    want_type = gguf.GGMLQuantizationType.F16 if kind == "f16" else gguf.GGMLQuantizationType.Q8_0
    for name, w in _expected(model).items():
        t = tensors[name]
        if w.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name  # norms stay f32
            continue
        assert t.tensor_type == want_type, name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        assert np.abs(got - w).max() <= tol * np.abs(w).max(), name


def test_bytelevel_tokenizer_and_untied_head(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "bl", tokenizer="bytelevel", tie_embeddings=False)
    model, tok = text2llm.load(ckpt)
    fields, tensors = _read(export_gguf(ckpt, tmp_path / "bl.gguf"))
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    merges = fields["tokenizer.ggml.merges"]
    assert merges and all(len(m.split(" ")) == 2 for m in merges)
    assert "tokenizer.ggml.scores" not in fields
    np.testing.assert_array_equal(np.asarray(tensors["output.weight"].data), model.lm_head.weight.detach().numpy())


def test_moe_experts_in_llama_cpp_layout(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "moe", n_experts=4, moe_top_k=2, moe_ffn_hidden=32)
    model, _ = text2llm.load(ckpt)
    fields, tensors = _read(export_gguf(ckpt, tmp_path / "moe.gguf"))
    assert fields["llama.expert_count"] == 4 and fields["llama.expert_used_count"] == 2
    assert fields["llama.feed_forward_length"] == 32
    want = _expected(model)
    assert set(tensors) == set(want)
    for name, w in want.items():
        np.testing.assert_array_equal(np.asarray(tensors[name].data), w, err_msg=name)
    assert tensors["blk.0.ffn_gate_exps.weight"].data.shape == (4, 32, 32)  # (E, F, D)


def test_refusals_are_one_line(tmp_path, capsys):
    learned = tiny_checkpoint(tmp_path / "gpt", positions="learned")
    with pytest.raises(UserError, match="model.positions = 'learned'.*rotary"):
        export_gguf(learned, tmp_path / "x.gguf")
    windowed = tiny_checkpoint(tmp_path / "win", attention_window=8)  # the file has no place for the window
    with pytest.raises(UserError, match="model.attention_window = 8.*no sliding-window"):
        export_gguf(windowed, tmp_path / "x.gguf")
    int8 = tmp_path / "int8"
    int8.mkdir()
    (int8 / "quant.json").write_text("{}")
    with pytest.raises(UserError, match="int8 checkpoint.*q8_0"):
        export_gguf(int8, tmp_path / "y.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def test_cli_export_gguf(tmp_path_factory, tmp_path, capsys):
    ckpt = shared_checkpoint(tmp_path_factory)
    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(ckpt), "--out", str(out), "--type", "q8_0"]) == 0
    assert out.is_file() and "exported GGUF (q8_0)" in capsys.readouterr().out
    assert main(["export", "gguf", str(ckpt), "--out", str(out)]) == 2  # no --overwrite
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err and "--overwrite" in err
    assert main(["export", "gguf", str(ckpt), "--out", str(out), "--overwrite"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no partial file left


def test_llama_cpp_logits_and_greedy_text_equal_ours(gqa, tmp_path):
    """llama.cpp (llama-cpp-python, `make test-interop`) runs the exported file: its logits over a
    prompt equal ours and its greedy text equals `text2llm generate --temperature 0`."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from text2llm.infer.generate import generate

    ckpt, model, tok = gqa
    out = export_gguf(ckpt, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=model.cfg.max_seq_len, n_threads=1, logits_all=True,
                          verbose=False)
    prompt = "Once upon a time"
    ids = [tok.bos_id] + tok.encode(prompt)
    assert llm.tokenize(prompt.encode(), add_bos=True) == ids
    llm.reset()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=1e-3)
    want = generate(model, tok, prompt, max_new_tokens=20, temperature=0)[len(prompt):]
    got = llm.create_completion(prompt, max_tokens=20, temperature=0.0, top_k=1, repeat_penalty=1.0)
    assert got["choices"][0]["text"] == want
