"""Compression: int8 quantization, pruning, distillation on a tiny model trained inside the test."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from text2llm.errors import UserError

TEACHER = ["model.d_model=64", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.max_seq_len=64",
           "train.seq_len=64", "train.batch_size=8", "train.max_steps=60", "train.warmup_steps=5", "train.lr=3e-3",
           "train.min_lr=3e-4", "train.eval_every=0", "train.eval_batches=2", "train.log_every=10", "train.threads=1",
           "train.device=cpu"]
FAST_LATENCY = {"prefill_len": 16, "decode_tokens": 4, "repeats": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, stories_jsonl):
    """Tokenizer + token shards of 400 stories and a 2-layer GQA teacher trained 60 steps."""
    from text2llm.config import PackConfig, TokenizerConfig, load_config
    from text2llm.pack import pack
    from text2llm.tokenizer import train_tokenizer
    from text2llm.train.trainer import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("compress")
    with gzip.open(stories_jsonl, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    train_tokenizer(iter(texts), root / "tok", TokenizerConfig(vocab_size=512))
    pack(texts, root / "tok", root / "tokens", PackConfig(val_fraction=0.1), progress=False)
    res = train(load_config(None, TEACHER), root / "tokens", root / "run", progress=False)
    return {"root": root, "tokens": root / "tokens", "run": root / "run", "ckpt": res.last_checkpoint}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---- quantization -----------------------------------------------------------------------------------


def test_quantize_close_to_fp32_and_small(tiny):
    import text2llm
    from text2llm.compress.quantize import load_quantized, quantize_checkpoint

    out = tiny["root"] / "int8"
    rep = quantize_checkpoint(tiny["ckpt"], out, data=tiny["tokens"], latency_kwargs=FAST_LATENCY)
    fp, _ = text2llm.load(tiny["ckpt"])
    q, tok = text2llm.load(out)  # dispatches on quant.json
    ids = torch.randint(0, fp.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    a, b = _logits(fp, ids), _logits(q, ids)
    rel = (a - b).norm() / a.norm()
    assert rel < 0.05, rel
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9

    # Linear weights on disk: int8 + one fp32 scale per row vs fp32
    from safetensors import safe_open

    meta = json.loads((out / "quant.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        q_bytes = sum(f.get_tensor(e["weight"]).numel() + 4 * f.get_tensor(e["scale"]).numel()
                      for e in meta["layers"].values())
    fp_bytes = sum(4 * m.weight.numel() for m in fp.modules() if isinstance(m, torch.nn.Linear))
    assert fp_bytes / q_bytes >= 3.0
    assert rep["after"]["size_bytes"] * 2.5 < rep["before"]["size_bytes"]
    assert meta["embedding"]["tied_to"] == "lm_head"  # the tied embedding is stored once, as the int8 head
    assert rep["after"]["params"] == rep["before"]["params"]
    assert abs(rep["after"]["val_bits_per_byte"] / rep["before"]["val_bits_per_byte"] - 1) < 0.02
    assert json.loads((out / "report.json").read_text())["delta"]["size_bytes"]["ratio"] > 2.5
    assert tok is not None and (out / "config.toml").is_file()

    # reload round trip: identical logits, and the KV-cache path works (generation)
    q2, _ = load_quantized(out)
    assert torch.equal(_logits(q2, ids), b)
    from text2llm.infer.generate import generate_ids
    from text2llm.model.transformer import KVCache

    cache = KVCache(q.cfg, batch_size=1)
    step = torch.cat([_logits(q, ids[:1, :10]), ], 1)
    with torch.no_grad():
        inc = torch.cat([q(ids[:1, :6], cache=cache).logits, q(ids[:1, 6:10], cache=cache).logits], 1)
    assert torch.allclose(inc, step, atol=0.05)  # dynamic int8: activation scales depend on the chunk
    assert len(list(generate_ids(q, [1, 5, 6], 5, temperature=0))) <= 5


@pytest.mark.parametrize("tie", [True, False])
def test_int8_embedding_stored_once_when_tied(tie, tmp_path):
    """A tied embedding is not written a second time: the int8 output head stands for it (and a
    model whose embedding is its own keeps its own int8 copy); both reload to the same logits."""
    from safetensors import safe_open

    from text2llm.compress import quantize as Q
    from text2llm.config import Config
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(vocab_size=300, d_model=64, n_layer=2, n_head=4, max_seq_len=64,
                                   tie_embeddings=tie), train={"seq_len": 64})
    q = Q.quantize_model(Transformer(cfg.model).eval())
    Q.save_quantized(q, tmp_path, cfg.to_toml(), None)
    meta = json.loads((tmp_path / "quant.json").read_text())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("embed.weight_int8" in keys) == (not tie) and "embed.weight" not in keys
    assert meta["embedding"].get("tied_to") == ("lm_head" if tie else None)
    q2, _ = Q.load_quantized(tmp_path, with_tokenizer=False)
    head = q2.lm_head.weight().dequantize()
    assert torch.equal(q2.embed.weight, head) == tie
    assert torch.allclose(q2.embed.weight, q.embed.weight, atol=float(head.abs().max()) / 127)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    a, b = _logits(q, ids), _logits(q2, ids)
    assert ((a - b).norm() / a.norm()) < 0.05  # only the embedding's rounding differs


@pytest.mark.parametrize("min_weights", [0, 1 << 30])  # every stack int8 / every stack dequantized to fp32
def test_int8_packed_linears_match_the_int8_modules(min_weights, monkeypatch):
    from text2llm.compress import quantize as Q
    from text2llm.infer.packing import PackedAttention, PackedMLP, pack_weights
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer

    monkeypatch.setattr(Q, "INT8_MIN_WEIGHTS", min_weights)
    torch.manual_seed(0)
    fp = Transformer(ModelConfig(vocab_size=300, d_model=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64)).eval()
    q = Q.quantize_model(fp)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    plain = _logits(q, ids)
    pack_weights(q)
    assert all(isinstance(b.attn, PackedAttention) and isinstance(b.mlp, PackedMLP) for b in q.blocks) and q.packed_head
    fast = _logits(q, ids)
    assert "_packed" in q.blocks[0].attn.__dict__
    # same int8 weights; the dynamic activation scales differ (one per stacked call vs one per Linear)
    assert ((fast - plain).norm() / plain.norm()) < 0.02
    assert (fast.argmax(-1) == plain.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("min_weights", [0, 1 << 30])
def test_int8_fast_decode_step_equals_forward(min_weights, monkeypatch):
    """The eager engine's decode step (infer/fast_step.py) runs the int8 packed matmuls too, with
    the same numbers as the int8 model's forward."""
    import numpy as np

    from text2llm.compress import quantize as Q
    from text2llm.infer.generate import TorchEngine
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer

    monkeypatch.setattr(Q, "INT8_MIN_WEIGHTS", min_weights)
    torch.manual_seed(0)
    q = Q.quantize_model(Transformer(ModelConfig(vocab_size=300, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                                                 max_seq_len=64)).eval())
    fast, ref = TorchEngine(q), TorchEngine(q, fast_step=False)
    ids = np.random.default_rng(0).integers(3, 300, size=(2, 9))
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    a, b = fast.prefill(ids, mask, 20), ref.prefill(ids, mask, 20)
    assert fast.fast_step is not None
    for _ in range(10):
        nxt = b.argmax(-1)
        a, b = fast.step(nxt), ref.step(nxt)
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_quantize_cli_eval_generate(tiny, capsys):
    from text2llm.cli import main

    out = tiny["root"] / "int8-cli"
    assert main(["compress", "quantize", str(tiny["run"]), "--out", str(out), "--data", str(tiny["tokens"])]) == 0
    assert "decode ms/token" in capsys.readouterr().out
    assert main(["eval", str(out), "--data", str(tiny["tokens"]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bits_per_byte"] > 0
    assert main(["generate", str(out), "--prompt", "Once", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("Once")
    assert main(["compress", "quantize", str(out), "--out", str(tiny["root"] / "x")]) == 2  # int8 twice: a user error


# ---- pruning ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_reaches_sparsity(tiny, scope):
    from text2llm.compress.common import load_fp32
    from text2llm.compress.prune import magnitude_masks, apply_masks, prunable_weights, sparsity_of

    model = load_fp32(tiny["ckpt"]).model
    apply_masks(model, magnitude_masks(model, 0.5, scope))
    assert sparsity_of(model) == pytest.approx(0.5, abs=0.01)
    if scope == "layer":
        for w in prunable_weights(model).values():
            assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert torch.isfinite(_logits(model, torch.tensor([[1, 2, 3, 4]]))).all()


def test_magnitude_prune_with_finetune_keeps_zeros(tiny):
    import text2llm
    from text2llm.compress.prune import prune_checkpoint, sparsity_of

    out = tiny["root"] / "pruned-mag"
    rep = prune_checkpoint(tiny["ckpt"], out, "magnitude", 0.4, finetune_steps=6, data=tiny["tokens"],
                           latency_kwargs=FAST_LATENCY, progress=False)
    model, _ = text2llm.load(out)
    assert sparsity_of(model) == pytest.approx(0.4, abs=0.01)
    assert set(rep) >= {"before", "pruned", "after", "delta"}
    assert rep["after"]["val_loss"] <= rep["pruned"]["val_loss"] + 1e-3  # the fine-tune helped (or did no harm)
    assert (out / "finetune" / "metrics.jsonl").is_file()


def test_structured_ffn_pruning_removes_computed_params(tiny):
    import text2llm
    from text2llm.compress.prune import prune_checkpoint, removed_params

    out = tiny["root"] / "pruned-ffn"
    prune_checkpoint(tiny["ckpt"], out, "ffn", 0.25, data=tiny["tokens"], latency_kwargs=FAST_LATENCY)
    before, _ = text2llm.load(tiny["ckpt"])
    after, _ = text2llm.load(out)  # a plain checkpoint: loads like any other
    F_ = before.cfg.ffn_dim
    assert after.cfg.ffn_dim == F_ - round(0.25 * F_)  # 192 -> 144 (a multiple of 8, as prune_ffn rounds)
    expected = before.cfg.n_layer * (F_ - after.cfg.ffn_dim) * 3 * before.cfg.d_model
    assert before.num_params() - after.num_params() == expected == removed_params(before.cfg, after.cfg)
    assert torch.isfinite(_logits(after, torch.tensor([[1, 2, 3]]))).all()


def test_ffn_pruning_is_exact_when_removed_channels_are_dead():
    """Channels whose down_proj column is zero contribute nothing: removing them keeps the logits."""
    from text2llm.compress.prune import prune_ffn
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, ffn_hidden=64)).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.mlp.down_proj.weight[:, 48:] = 0
    new, info = prune_ffn(model, 0.25)
    assert new.cfg.ffn_hidden == 48 and info["kept_channels"][0] == list(range(48))
    ids = torch.randint(0, 50, (2, 10))
    assert torch.allclose(_logits(model, ids), _logits(new, ids), atol=1e-5)


@pytest.mark.parametrize("n_head,n_kv,sparsity,want", [(4, 4, 0.25, (3, 3)), (4, 2, 0.5, (2, 2)), (8, 2, 0.25, (6, 2)),
                                                       (6, 6, 0.3, (4, 4))])
def test_head_pruning_keeps_gqa_valid(n_head, n_kv, sparsity, want):
    from text2llm.compress.prune import head_plan, prune_heads, removed_params
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import KVCache, Transformer

    assert head_plan(n_head, n_kv, sparsity) == want
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=48, n_layer=2, n_head=n_head, n_kv_head=n_kv, max_seq_len=32)
    model = Transformer(cfg).eval()
    new, info = prune_heads(model, sparsity)
    H2, K2 = want
    assert (new.cfg.n_head, new.cfg.kv_heads, new.cfg.head_dim) == (H2, K2, cfg.head_dim)
    assert new.cfg.n_head % new.cfg.kv_heads == 0
    assert model.num_params() - new.num_params() == removed_params(cfg, new.cfg)
    # KV-cache decode == full forward on the pruned model
    ids = torch.randint(0, 40, (1, 12))
    cache = KVCache(new.cfg, 1)
    with torch.no_grad():
        inc = torch.cat([new(ids[:, :8], cache=cache).logits] + [new(ids[:, i:i + 1], cache=cache).logits
                                                                 for i in range(8, 12)], 1)
    assert torch.allclose(inc, _logits(new, ids), atol=1e-5)


def test_head_pruning_exact_for_zeroed_heads():
    """A query head whose o_proj columns are zero is removed without changing the output."""
    from text2llm.compress.prune import prune_heads
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer

    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layer=1, n_head=4, n_kv_head=2, max_seq_len=32)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # heads 1 and 2 (one in each K/V group) do nothing
        model.blocks[0].attn.o_proj.weight[:, 8:24] = 0
    new, info = prune_heads(model, 0.5)
    assert info["kept_heads"] == [[0, 3]]
    ids = torch.randint(0, 40, (2, 9))
    assert torch.allclose(_logits(model, ids), _logits(new, ids), atol=1e-5)


def test_heads_prune_checkpoint_and_moe_refused(tiny, tmp_path):
    import text2llm
    from text2llm.compress.prune import prune_checkpoint

    out = tmp_path / "heads"
    rep = prune_checkpoint(tiny["ckpt"], out, "heads", 0.5, report=False)
    model, _ = text2llm.load(out)
    assert (model.cfg.n_head, model.cfg.kv_heads) == (2, 2)
    assert rep["settings"]["params_removed"] > 0

    from text2llm.compress.prune import prune_model
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer

    moe = Transformer(ModelConfig(vocab_size=40, d_model=32, n_layer=1, n_head=4, n_experts=2, moe_top_k=1))
    with pytest.raises(UserError, match="Mixture-of-Experts"):
        prune_model(moe, "ffn", 0.3)


def test_prune_cli(tiny, tmp_path, capsys):
    import text2llm
    from text2llm.cli import main

    out = tmp_path / "ffn-cli"
    assert main(["compress", "prune", str(tiny["run"]), "--out", str(out), "--method", "ffn", "--sparsity", "0.5",
                 "--data", str(tiny["tokens"])]) == 0
    printed = capsys.readouterr().out
    assert "parameters" in printed and "val bits/byte" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["after"]["params"] < rep["before"]["params"] and rep["settings"]["importance"].startswith("taylor")
    model, _ = text2llm.load(out)
    assert model.cfg.ffn_hidden == 96
    assert main(["compress", "prune", str(tiny["run"]), "--out", str(tmp_path / "bad"), "--sparsity", "1.5"]) == 2
    assert main(["compress", "prune", str(tiny["run"]), "--out", str(out), "--method", "heads"]) == 2  # not empty


# ---- distillation -------------------------------------------------------------------------------------


def test_distill_loss_matches_definition():
    from text2llm.compress.distill import DistillLoss

    torch.manual_seed(0)

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.nn.Parameter(logits)

        def forward(self, x):
            from text2llm.model.transformer import ModelOutput

            return ModelOutput(logits=self.logits)

    s, t = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    y = torch.tensor([[1, 2, -100]])
    loss, ex = DistillLoss(Fixed(t), alpha=0.3, temperature=2.0)(Fixed(s), torch.zeros(1, 3, dtype=torch.long), y)
    ps, pt = (s[0, :2] / 2).log_softmax(-1), (t[0, :2] / 2).log_softmax(-1)
    kl = (pt.exp() * (pt - ps)).sum(-1).mean() * 4
    ce = torch.nn.functional.cross_entropy(s[0, :2], y[0, :2])
    assert torch.allclose(loss, 0.3 * kl + 0.7 * ce, atol=1e-6)
    assert torch.allclose(ex["kl"], kl, atol=1e-6)


def test_distillation_lowers_kl_to_teacher(tiny, tmp_path):
    import text2llm
    from text2llm.compress.distill import distill_checkpoint, kl_to_teacher
    from text2llm.config import load_config
    from text2llm.model.transformer import Transformer

    student = tmp_path / "student.toml"
    student.write_text("[model]\nd_model = 32\nn_layer = 1\nn_head = 2\nmax_seq_len = 64\n"
                       "[train]\nseq_len = 64\nbatch_size = 8\nmax_steps = 30\nwarmup_steps = 3\nlr = 3e-3\n"
                       "min_lr = 3e-4\neval_every = 0\neval_batches = 2\nthreads = 1\ndevice = \"cpu\"\n")
    teacher, _ = text2llm.load(tiny["ckpt"])
    cfg = load_config(student, [f"model.vocab_size={teacher.cfg.vocab_size}"])
    torch.manual_seed(cfg.train.seed)
    kl_init = kl_to_teacher(Transformer(cfg.model).eval(), teacher, tiny["tokens"])

    out = tmp_path / "distilled"
    rep = distill_checkpoint(tiny["ckpt"], student, out, overrides=["train.log_every=5"], alpha=0.7, temperature=2.0,
                             latency_kwargs=FAST_LATENCY, progress=False)
    assert rep["after"]["kl_to_teacher"] < 0.8 * kl_init
    assert rep["after"]["params"] < rep["before"]["params"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("kl" in r for r in logged)
    assert (out / "report.json").is_file()
    with pytest.raises(UserError, match="vocab_size"):
        distill_checkpoint(tiny["ckpt"], student, tmp_path / "bad", overrides=["model.vocab_size=999"])


def test_teacher_layer_init_copies_every_kth_block(tiny):
    import text2llm
    from text2llm.compress.distill import teacher_layer_init
    from text2llm.config import load_config
    from text2llm.model.transformer import Transformer

    teacher, _ = text2llm.load(tiny["ckpt"])
    same = load_config(tiny["ckpt"] / "config.toml")
    full = Transformer(same.model)
    full.load_state_dict(teacher_layer_init(teacher, same), strict=False)
    ids = torch.tensor([[1, 7, 9, 4]])
    assert torch.equal(_logits(full, ids), _logits(teacher, ids))  # all layers kept: the teacher itself
    half = load_config(tiny["ckpt"] / "config.toml", ["model.n_layer=1"])
    sd = teacher_layer_init(teacher, half)
    assert torch.equal(sd["blocks.0.mlp.up_proj.weight"], teacher.blocks[0].mlp.up_proj.weight)
    assert teacher_layer_init(teacher, load_config(tiny["ckpt"] / "config.toml", ["model.d_model=32", "model.n_head=2"])) is None
