"""ONNX export + onnxruntime generation: logits == PyTorch (prefill and 20 decode steps, padded
batch included), greedy text == PyTorch, int8 close to fp32, and the runtime path (CLI included)
works with torch made unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from test_generate import PROMPTS, shared_checkpoint, shared_export
from text2llm.infer.decoding import SamplingParams, complete, left_pad

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import text2llm

    ckpt = shared_checkpoint(tmp_path_factory)
    model, tok = text2llm.load(ckpt)
    return ckpt, shared_export(tmp_path_factory), model, tok


def test_export_dir_contents(exported):
    _, out, model, _ = exported
    meta = json.loads((out / "text2llm-onnx.json").read_text())
    assert meta["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    assert (out / "tokenizer" / "tokenizer.model").is_file()
    assert not list(out.glob("*.data"))  # weights inside the .onnx files
    g = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(g)
    names = [i.name for i in g.graph.input]
    assert names == meta["inputs"] and names[:3] == ["input_ids", "attention_mask", "past.0.key"]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.graph.input}
    assert all(isinstance(d, str) for d in dims["input_ids"])  # batch and sequence are dynamic
    assert isinstance(dims["past.0.key"][0], str) and isinstance(dims["past.0.key"][2], str)
    assert dims["past.0.key"][1] == model.cfg.kv_heads and dims["past.0.key"][3] == model.cfg.head_dim


def test_ort_logits_match_torch_prefill_and_20_steps(exported):
    from text2llm.infer.generate import TorchEngine
    from text2llm.infer.ort_runtime import OrtEngine

    _, out, model, tok = exported
    ids, mask = left_pad([[tok.bos_id] + tok.encode(p) for p in PROMPTS], tok.pad_id)  # padded batch of 3
    ort_e, pt_e = OrtEngine.load(out), TorchEngine(model)
    a, b = ort_e.prefill(ids, mask), pt_e.prefill(ids, mask)
    assert np.abs(a - b).max() <= 1e-4
    for _ in range(20):
        nxt = b.argmax(-1)
        a, b = ort_e.step(nxt), pt_e.step(nxt)
        assert np.abs(a - b).max() <= 1e-4
    # the graph returns the last position's logits only; every prompt position shows in the cache:
    # each layer's keys and values at the real (not padded) positions equal PyTorch's
    cache = ort_e.new_cache(3, ids.shape[1])
    last = ort_e.run(ids, mask, ort_e.bind(cache))
    assert last.shape == (3, 1, model.cfg.vocab_size)
    assert np.abs(last[:, 0] - pt_e.prefill(ids, mask)).max() <= 1e-4
    real = mask.astype(bool)
    for i in range(model.cfg.n_layer):
        for got, want in ((cache[2 * i], pt_e.cache.k[i]), (cache[2 * i + 1], pt_e.cache.v[i])):
            diff = (got.numpy() - want[:, :, : ids.shape[1]].numpy()).transpose(0, 2, 1, 3)[real]
            assert np.abs(diff).max() <= 1e-4


@pytest.mark.parametrize("kw", [dict(positions="learned", n_head=4, n_kv_head=2),  # head dim 8
                                dict(positions="rope", n_head=2, n_kv_head=1)])      # 16: the op does RoPE
def test_ort_gqa_positions_and_in_place_cache(tmp_path, kw):
    """Grouped-query heads (K < H), learned positions, and RoPE done inside onnxruntime's attention
    op (head dims that are multiples of 16) match PyTorch on a left-padded batch; the runtime's
    buffers are written in place, each token's keys at its position, zeros beyond."""
    import torch

    from text2llm.infer.generate import TorchEngine
    from text2llm.interop.onnx import export_model
    from text2llm.infer.ort_runtime import OrtEngine
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, d_model=32, n_layer=2, max_seq_len=64, **kw)).eval()
    out = export_model(model, tmp_path / "onnx")
    rng = np.random.default_rng(0)
    ids, mask = left_pad([list(rng.integers(3, 97, size=n)) for n in (7, 3, 5)], 0)
    ort_e, pt_e = OrtEngine.load(out), TorchEngine(model)
    T, n = ids.shape[1], 10
    a, b = ort_e.prefill(ids, mask, total_len=T + n + 2), pt_e.prefill(ids, mask, total_len=T + n + 2)
    buffers = list(ort_e.past)
    assert np.abs(a - b).max() <= 1e-4
    for _ in range(n):
        nxt = b.argmax(-1)
        a, b = ort_e.step(nxt), pt_e.step(nxt)
        assert np.abs(a - b).max() <= 1e-4
    assert all(x is y for x, y in zip(ort_e.past, buffers))  # the same buffers, never reallocated
    keys = ort_e.past[0].numpy()  # (B, K, capacity, Dh)
    assert keys.shape == (3, model.cfg.kv_heads, T + n + 2, model.cfg.head_dim)
    want = pt_e.cache.k[0][:, :, : T + n].numpy()
    real = mask.astype(bool)  # padded positions hold keys nobody attends to
    assert np.abs((keys[:, :, :T] - want[:, :, :T]).transpose(0, 2, 1, 3)[real]).max() <= 1e-4
    assert np.abs(keys[:, :, T : T + n] - want[:, :, T:]).max() <= 1e-4 and not keys[:, :, T + n :].any()
    ort_e.step(nxt), ort_e.step(nxt)  # fills the capacity exactly
    with pytest.raises(ValueError, match="cache capacity"):
        ort_e.step(nxt)


def test_runtime_refuses_a_version_1_export(exported, tmp_path):
    from text2llm.errors import UserError
    from text2llm.infer.ort_runtime import OrtEngine

    _, out, _, _ = exported
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((out / "text2llm-onnx.json").read_text())
    (old / "text2llm-onnx.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(UserError, match="export the checkpoint again"):
        OrtEngine.load(old)


def test_ort_greedy_text_equals_torch(exported):
    from text2llm.infer.generate import generate_batch
    from text2llm.infer.ort_runtime import OrtEngine

    _, out, model, tok = exported
    p = SamplingParams(max_new_tokens=40, temperature=0)
    ort_text = [c.text for c in complete(OrtEngine.load(out), tok, PROMPTS, p)]
    assert ort_text == generate_batch(model, tok, PROMPTS, 40, temperature=0)
    # sampling draws from the same logits with the same numpy RNG: same text for the same seed
    p = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=20, seed=5)
    assert [c.text for c in complete(OrtEngine.load(out), tok, PROMPTS, p)] == \
        generate_batch(model, tok, PROMPTS, 20, temperature=1.0, top_k=20, seed=5)


def test_int8_close_to_fp32(exported):
    from text2llm.infer.ort_runtime import OrtEngine

    _, out, _, tok = exported
    ids, mask = left_pad([[tok.bos_id] + tok.encode(p) for p in PROMPTS], tok.pad_id)
    f32, i8 = OrtEngine.load(out), OrtEngine.load(out, int8=True)
    a, b = f32.prefill(ids, mask), i8.prefill(ids, mask)
    scale = np.abs(a).max()
    assert np.abs(a - b).max() <= 0.05 * scale
    pa, pb = _softmax(a), _softmax(b)
    assert 0.5 * np.abs(pa - pb).sum(-1).max() < 0.05  # total variation distance of next-token distributions
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 2 / 3
    q = onnx.load(str(out / "model.int8.onnx"))
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in q.graph.initializer) >= 2 * 7  # q,k,v,o,gate,up,down
    assert (out / "model.int8.onnx").stat().st_size < 0.9 * (out / "model.onnx").stat().st_size


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


NO_TORCH = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'torch' or name.startswith('text2llm.model'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, _Blocked())
"""


def run_without_torch(code: str, **kw) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a subprocess where torch and text2llm.model cannot be imported."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", NO_TORCH + code], capture_output=True, text=True, env=env,
                          timeout=120, **kw)


def test_onnx_cli_runs_without_torch(exported):
    from text2llm.infer.generate import generate

    _, out, model, tok = exported
    want = generate(model, tok, "Once upon a time", 25, temperature=0)
    code = (f"from text2llm.cli import main\n"
            f"rc = main(['generate', {str(out)!r}, '--engine', 'onnx', '--prompt', 'Once upon a time',"
            f" '--max-new-tokens', '25', '--temperature', '0', '--stream'])\n"
            f"assert 'torch' not in sys.modules and 'text2llm.model' not in sys.modules, 'torch was imported'\n"
            f"sys.exit(rc)\n")
    r = run_without_torch(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    # the guard works: the same runner fails on the PyTorch engine
    r = run_without_torch(f"from text2llm.cli import main\nmain(['generate', {str(out)!r}, '--engine', 'torch'])")
    assert r.returncode != 0 and "blocked for this test" in r.stderr


def test_export_cli_refuses_non_empty_dir_and_runtime_names_bad_dirs(exported, tmp_path, capsys):
    from text2llm.cli import main

    ckpt, out, _, _ = exported
    assert main(["export", "onnx", str(ckpt), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["generate", str(ckpt), "--engine", "onnx"]) == 2
    assert "not an ONNX export dir" in capsys.readouterr().err
    # a torch-engine `generate` handed an export dir runs it with onnxruntime
    assert main(["generate", str(out), "--prompt", "Tom", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Tom")
