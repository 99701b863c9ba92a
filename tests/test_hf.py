"""Hugging Face interop: our logits == transformers' Llama / Mixtral / GPT-2 after export, and after
import back; the tokenizer travels along; unrepresentable configs are refused by field name.

Everything is offline (HF_HUB_OFFLINE=1, set in conftest) and fp32 on models of a few K params.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from text2llm.config import Config, TokenizerConfig  # noqa: E402
from text2llm.errors import UserError  # noqa: E402
from text2llm.interop.hf import export_hf, hf_architecture, import_hf  # noqa: E402
from text2llm.model import ModelConfig, Transformer  # noqa: E402
from text2llm.model.transformer import causal_mask  # noqa: E402
from text2llm.train.checkpoint import save_checkpoint  # noqa: E402

TOL = 1e-4
LLAMA = dict(d_model=32, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=64, max_seq_len=64, rope_theta=5000.0)
CASES = {
    "llama": (LLAMA, "LlamaForCausalLM"),
    "llama-untied-bias-mha": ({**LLAMA, "n_kv_head": 0, "bias": True, "tie_embeddings": False, "norm_eps": 1e-6},
                              "LlamaForCausalLM"),
    "mixtral": ({**LLAMA, "n_experts": 4, "moe_top_k": 2, "moe_ffn_hidden": 32}, "MixtralForCausalLM"),
    # sliding windows (T = 20 > window 6, so the band bites): every layer, and local + global
    "mistral": ({**LLAMA, "attention_window": 6}, "MistralForCausalLM"),
    "ministral": ({**LLAMA, "n_layer": 3, "attention_window": 6, "window_pattern": "SL"}, "MinistralForCausalLM"),
    "mixtral-window": ({**LLAMA, "n_experts": 4, "moe_top_k": 2, "moe_ffn_hidden": 32, "attention_window": 6},
                       "MixtralForCausalLM"),
    # model.qk_norm: Qwen3 (per-head q/k RMSNorm before RoPE)
    "qwen3": ({**LLAMA, "qk_norm": True}, "Qwen3ForCausalLM"),
    "qwen3-untied-mha": ({**LLAMA, "qk_norm": True, "n_kv_head": 0, "tie_embeddings": False, "zero_init_output": True},
                         "Qwen3ForCausalLM"),
    "gpt2": (dict(d_model=32, n_layer=2, n_head=4, max_seq_len=64, positions="learned", norm="layernorm",
                  activation="gelu", bias=True), "GPT2LMHeadModel"),
    "gpt2-nobias-untied": (dict(d_model=32, n_layer=2, n_head=4, ffn_hidden=96, max_seq_len=64, positions="learned",
                                norm="layernorm", activation="gelu", tie_embeddings=False), "GPT2LMHeadModel"),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from text2llm.tokenizer import train_tokenizer

    from conftest import tiny_stories

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([r["text"] for r in tiny_stories(60)], out / "tok", TokenizerConfig(vocab_size=320))
    return out / "tok"


def make_checkpoint(root, tok_dir, model_kw, seed=0):
    from text2llm.tokenizer import Tokenizer

    cfg = Config(model=ModelConfig(vocab_size=Tokenizer.load(tok_dir).vocab_size, **model_kw), train={"seq_len": 64})
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(root / "run", 5, model, None, {}, cfg.to_toml(), tok_dir)
    return root / "run", model.eval()


def shape(cfg: ModelConfig) -> dict:
    keys = ("vocab_size", "d_model", "n_layer", "n_head", "kv_heads", "ffn_dim", "max_seq_len", "positions",
            "rope_theta", "norm", "norm_eps", "activation", "tie_embeddings", "bias", "n_experts", "moe_top_k",
            "moe_dim", "aux_loss_weight", "pattern", "attention_window", "qk_norm")
    out = {k: getattr(cfg, k) for k in keys}
    if cfg.n_experts and cfg.moe_every == 1:
        out["ffn_dim"] = None  # no dense MLP left: the dense width means nothing
    return out


def input_ids(vocab, B=2, T=20):
    return torch.randint(4, vocab, (B, T), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("case", list(CASES))
def test_export_then_transformers_gives_our_logits_and_import_gives_them_back(tmp_path, tok_dir, case):
    import text2llm

    model_kw, arch = CASES[case]
    run, model = make_checkpoint(tmp_path, tok_dir, model_kw)
    out = export_hf(run, tmp_path / "hf")  # a run dir: its latest checkpoint
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__ == arch
    x = input_ids(model.cfg.vocab_size)
    with torch.no_grad():
        ours, theirs = model(x).logits, hf_model(x).logits
    assert (ours - theirs).abs().max().item() <= TOL

    back = import_hf(out, tmp_path / "back")
    model2, tok2 = text2llm.load(back)
    assert shape(model2.cfg) == shape(model.cfg)
    with torch.no_grad():
        assert (model2(x).logits - ours).abs().max().item() <= TOL
    assert tok2.encode("Once upon a time") == text2llm.load(run)[1].encode("Once upon a time")
    assert json.loads((back / "state.json").read_text())["step"] == 0


def test_exported_tokenizer_loads_in_transformers_and_encodes_like_ours(tmp_path, tok_dir):
    from text2llm.tokenizer import Tokenizer

    run, _ = make_checkpoint(tmp_path, tok_dir, LLAMA)
    out = export_hf(run, tmp_path / "hf")
    ours = Tokenizer.load(tok_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = "Once upon a time, a little girl named Lily found a shiny key."
    assert theirs(text).input_ids == [ours.bos_id] + ours.encode(text)


def test_padding_mask_matches_transformers_attention_mask(tmp_path, tok_dir):
    run, model = make_checkpoint(tmp_path, tok_dir, LLAMA)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / "hf")).eval()
    x = input_ids(model.cfg.vocab_size, B=2, T=12)
    keep = torch.ones(2, 12, dtype=torch.long)
    keep[1, :5] = 0  # row 1 is left-padded by 5
    with torch.no_grad():
        ours = model(x, attn_mask=causal_mask(12, key_padding_BS=keep)).logits
        theirs = hf_model(x, attention_mask=keep).logits
    real = keep.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= TOL


def test_mixtral_saved_by_transformers_imports_back(tmp_path, tok_dir):
    """transformers 5 keeps fused expert tensors in memory; whatever layout save_pretrained
    writes, import_hf reads it."""
    run, model = make_checkpoint(tmp_path, tok_dir, CASES["mixtral"][0])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / "hf")).eval()
    hf_model.save_pretrained(tmp_path / "resaved")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no text2llm tokenizer in a dir transformers wrote
        back = import_hf(tmp_path / "resaved", tmp_path / "back")
    from text2llm.model.transformer import Transformer as T
    from text2llm.checkpoint import load_weights, read_checkpoint_config

    model2 = T(read_checkpoint_config(back).model)
    load_weights(model2, back / "model.safetensors")
    x = input_ids(model.cfg.vocab_size)
    with torch.no_grad():
        assert (model2.eval()(x).logits - model(x).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("kw, field", [
    (dict(norm="layernorm"), "model.norm"),
    (dict(activation="gelu"), "model.activation"),
    (dict(positions="learned"), "model.norm"),  # learned positions -> GPT-2, which needs layernorm
    (dict(positions="learned", norm="layernorm", activation="gelu", n_kv_head=2), "model.n_kv_head"),
    (dict(n_experts=4, n_layer=2, moe_every=2), "model.moe_every"),
    (dict(n_experts=4, bias=True), "model.bias"),
    (dict(attention_window=8, bias=True), "model.bias"),
    (dict(attention_window=8, positions="learned", norm="layernorm", activation="gelu"), "model.attention_window"),
    (dict(attention_window=8, window_pattern="SL", n_experts=4), "model.window_pattern"),
    (dict(qk_norm=True, n_experts=4), "model.n_experts"),
    (dict(qk_norm=True, attention_window=8), "model.attention_window"),
    (dict(qk_norm=True, bias=True), "model.bias"),
    (dict(activation="relu2"), "model.activation"),
    (dict(logit_softcap=30.0), "model.logit_softcap"),
])
def test_unrepresentable_configs_are_refused_naming_the_field(kw, field):
    cfg = ModelConfig(**{**LLAMA, "vocab_size": 100, **kw})
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        hf_architecture(cfg)


def test_refusal_writes_nothing_and_existing_out_needs_overwrite(tmp_path, tok_dir):
    run, _ = make_checkpoint(tmp_path, tok_dir, {**LLAMA, "norm": "layernorm"})
    with pytest.raises(UserError, match="model.norm"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    run2, _ = make_checkpoint(tmp_path / "b", tok_dir, LLAMA)
    export_hf(run2, tmp_path / "hf2")
    with pytest.raises(UserError, match="overwrite"):
        export_hf(run2, tmp_path / "hf2")
    export_hf(run2, tmp_path / "hf2", overwrite=True)


def test_import_refuses_unsupported_models(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="model_type 'bert'"):
        import_hf(d, tmp_path / "out")
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    with pytest.raises(UserError, match="llama3"):
        import_hf(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_and_import(tmp_path, tok_dir, capsys):
    from text2llm.cli import main

    run, model = make_checkpoint(tmp_path, tok_dir, LLAMA)
    assert main(["export", "hf", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 0
    assert main(["export", "hf", str(run), "--out", str(tmp_path / "hf")]) == 2  # exists, no --overwrite
    assert "overwrite" in capsys.readouterr().err
    import text2llm

    model2, _ = text2llm.load(tmp_path / "ck")
    x = input_ids(model.cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(model2(x).logits, model(x).logits)


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "sharded", "bf16"])
def test_import_reads_bin_sharded_and_bf16_weights(tmp_path, tok_dir, layout):
    import shutil

    from safetensors.torch import load_file, save_file

    run, model = make_checkpoint(tmp_path, tok_dir, LLAMA)
    out = export_hf(run, tmp_path / "hf")
    sd = load_file(str(out / "model.safetensors"))
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(out / "config.json", src / "config.json")
    if layout == "pytorch_model.bin":
        torch.save(sd, src / "pytorch_model.bin")
    elif layout == "sharded":
        names = sorted(sd)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, keys in shards.items():
            save_file({k: sd[k] for k in keys}, str(src / shard), metadata={"format": "pt"})
        index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file({k: v.bfloat16() for k, v in sd.items()}, str(src / "model.safetensors"), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer in these dirs
        back = import_hf(src, tmp_path / "back")
    from text2llm.checkpoint import load_weights, read_checkpoint_config

    model2 = Transformer(read_checkpoint_config(back).model)
    load_weights(model2, back / "model.safetensors")
    x = input_ids(model.cfg.vocab_size)
    with torch.no_grad():
        diff = (model2.eval()(x).logits - model(x).logits).abs().max().item()
    assert diff <= (TOL if layout != "bf16" else 0.05)
    assert next(model2.parameters()).dtype == torch.float32


@pytest.mark.parametrize("kind", ["mistral", "ministral"])
def test_import_reads_a_sliding_window_checkpoint_written_by_transformers(tmp_path, kind):
    """A Mistral (``sliding_window``) or Ministral (``layer_types``) model made and saved by
    transformers itself imports as our window and pattern, with its logits."""
    common = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=5,
                  tie_word_embeddings=False)  # (head_dim: MinistralConfig does not derive it)
    if kind == "mistral":
        hf_model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    else:
        types = ["sliding_attention"] * 3 + ["full_attention"]
        hf_model = transformers.MinistralForCausalLM(transformers.MinistralConfig(**common, layer_types=types))
    hf_model.eval().save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no text2llm tokenizer in a dir transformers wrote
        back = import_hf(tmp_path / "hf", tmp_path / "back")
    from text2llm.checkpoint import load_model

    model, _ = load_model(back)
    assert model.cfg.attention_window == 5 and model.cfg.window_pattern == ("" if kind == "mistral" else "SSSL")
    x = input_ids(100, T=24)
    with torch.no_grad():
        assert (model(x).logits - hf_model(x).logits).abs().max().item() <= TOL
