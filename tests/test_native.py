"""The native int8 decode kernel (text2llm.compress.native): exact against a torch emulation of the
same arithmetic, its fallbacks, its build cache, and an int8 model decoding through it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from text2llm.compress import native


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The kernel state forgotten before and after, the build cache in a temp dir."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native.reset()
    yield native
    native.reset()


def _lib():
    lib = native.load()
    if lib is None:
        pytest.skip(f"native int8 kernel not available here: {native.reason()}")
    return lib


@pytest.fixture(params=native.available_paths() or ["none"])
def path_lib(request, monkeypatch):
    """The kernel built for each path this CPU runs, forced with TEXT2LLM_INT8_KERNEL."""
    if request.param not in native.available_paths():
        pytest.skip(f"this CPU cannot run the {request.param} kernel")
    monkeypatch.setenv(native.ENV, request.param)
    native.reset()
    lib = _lib()
    assert native.path() == request.param and request.param in native.describe()
    yield lib
    monkeypatch.delenv(native.ENV)
    native.reset()


def _emulate(x, q, scale, bias=None, res=None):
    """The kernel's arithmetic in torch: each row quantized to int8 (symmetric, round half to even),
    an exact integer product, then the two scales."""
    amax = x.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(x * inv)
    acc = (xq.double() @ q.double().t())  # exact: integers far below 2^53
    y = (acc.float() * ((amax / 127.0) * scale[None, :]))
    if bias is not None:
        y = y + bias
    if res is not None:
        y = y + res
    return y


@pytest.mark.parametrize("n_out,n_in", [(576, 192), (1, 1), (63, 5), (65, 190), (200, 7), (4096, 64)])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])  # tiles of 4 rows: 1, 3, 4, 4+4+1
def test_kernel_matches_its_arithmetic_and_fp32(path_lib, n_out, n_in, rows):
    lib = path_lib
    g = torch.Generator().manual_seed(n_out * 1000 + n_in + rows)
    w = torch.randn(n_out, n_in, generator=g) * 0.05
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    bias, res = torch.randn(n_out, generator=g), torch.randn(rows, n_out, generator=g)
    x = torch.randn(rows, n_in, generator=g)
    mm = native.Int8Gemv(lib, q, scale, bias)
    y = mm(x)
    torch.testing.assert_close(y, _emulate(x, q, scale, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mm.add_to(res, x), _emulate(x, q, scale, bias, res), rtol=1e-5, atol=1e-5)
    # and close to the fp32 product of the dequantized weights (activation quantization: ~1%)
    ref = x @ (q.float() * scale[:, None]).t() + bias
    assert ((y - ref).norm() / ref.norm()) < 0.02
    # a non-contiguous input gives the same numbers
    wide = torch.zeros(rows, 2 * n_in)
    wide[:, ::2] = x
    torch.testing.assert_close(mm(wide[:, ::2]), y)


@pytest.mark.parametrize("n_out,n_in", [(64, 256), (33, 1024), (7, 4)])
def test_extreme_values_are_exact(path_lib, n_out, n_in):
    """Weights at -128 and +127 against activations at +-127 (the AVX2 path's int16 pair sums at
    their largest: |w| * |x| * 2 = 32512): the integer sums stay exact, so the result is the
    emulation's to float rounding."""
    g = torch.Generator().manual_seed(n_out + n_in)
    q = torch.where(torch.rand(n_out, n_in, generator=g) < 0.5, -128, 127).to(torch.int8)
    q[0] = -128
    x = torch.where(torch.rand(3, n_in, generator=g) < 0.5, -1.0, 1.0)  # every xq is +-127
    x[1] = -x[0]
    scale = torch.full((n_out,), 1e-3)
    mm = native.Int8Gemv(path_lib, q, scale)
    y = mm(x)
    acc = x.double() @ q.double().t() * 127  # the exact integer sums
    assert torch.equal(y, (acc.float() * ((1.0 / 127.0) * scale)[None, :]))
    torch.testing.assert_close(y, _emulate(x, q, scale), rtol=1e-6, atol=0)


def test_zero_row_and_bad_input(path_lib):
    lib = path_lib
    q = torch.randint(-127, 128, (70, 9), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    scale, bias = torch.rand(70) + 0.1, torch.randn(70)
    mm = native.Int8Gemv(lib, q, scale, bias)
    torch.testing.assert_close(mm(torch.zeros(2, 9)), bias.expand(2, 70))  # max|x| = 0: no division by zero
    with pytest.raises(ValueError, match="fp32 rows of 9"):
        mm(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="fp32 rows of 9"):
        mm(torch.zeros(1, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="residual"):
        mm.add_to(torch.zeros(1, 69), torch.zeros(1, 9))
    with pytest.raises(ValueError, match="2-D int8"):
        native.Int8Gemv(lib, q.float(), scale)


def test_fallback_takes_the_other_rows():
    lib = _lib()
    q = torch.randint(-127, 128, (16, 8), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    calls = []

    def fallback(x):
        calls.append(x.shape[0])
        return torch.full((x.shape[0], 16), 7.0)

    mm = native.Int8Gemv(lib, q, torch.ones(16), fallback=fallback, max_rows=2)
    mm(torch.randn(2, 8))
    assert calls == []
    assert torch.equal(mm(torch.randn(3, 8)), torch.full((3, 16), 7.0))
    assert torch.equal(mm.add_to(torch.ones(5, 16), torch.randn(5, 8)), torch.full((5, 16), 8.0))
    mm(torch.randn(1, 8, dtype=torch.float64))
    assert calls == [3, 5, 1]


def test_switched_off_and_failed_build_fall_back(fresh_native, monkeypatch, tmp_path):
    monkeypatch.setenv("TEXT2LLM_NATIVE", "0")
    assert native.load() is None and "TEXT2LLM_NATIVE=0" in native.reason()
    monkeypatch.delenv("TEXT2LLM_NATIVE")
    native.reset()
    if native._compiler() is None or native.load() is None:
        pytest.skip(f"no kernel build possible here: {native.reason()}")
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    native.reset()
    assert native.load() is None  # a compiler error is a reason, not a crash
    assert "failed" in native.reason()
    files = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files == ["int8_gemv.so"]  # the good build of before; the failed one left no temp file


def test_build_is_cached(fresh_native, tmp_path):
    _lib()
    built = list((tmp_path / "cache" / "text2llm" / "native").glob("*/int8_gemv.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native.reset()
    _lib()
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not compiled again
    assert [p.name for p in built[0].parent.iterdir()] == ["int8_gemv.so"]  # no temp files left
    # a damaged cache entry is built again (in a new process: this one has the library mapped)
    built[0].unlink()
    built[0].write_bytes(b"not a shared library")
    code = "from text2llm.compress import native; assert native.load() is not None, native.reason()"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert built[0].stat().st_size > 1000


def test_int8_model_decodes_the_same_with_and_without_the_kernel(monkeypatch):
    """An int8 model's greedy decode through the eager engine, native kernel on and off (torch's
    int8 kernels): the same int8 weights, activation quantization per row in both."""
    import numpy as np

    from text2llm.compress import quantize as Q
    from text2llm.infer.generate import TorchEngine
    from text2llm.model.config import ModelConfig
    from text2llm.infer.packing import packed_matmul
    from text2llm.model.transformer import Transformer

    _lib()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64)
    q = Q.quantize_model(Transformer(cfg).eval())
    ids = np.random.default_rng(0).integers(3, 300, size=(2, 9))

    def run():
        eng = TorchEngine(q)
        logits = [eng.prefill(ids, np.ones_like(ids), 20)]
        for _ in range(8):
            logits.append(eng.step(logits[-1].argmax(-1)))
        return np.stack(logits), eng

    def qkv():
        return packed_matmul(q.blocks[0].attn, ("q_proj", "k_proj", "v_proj"))

    with_kernel, _ = run()
    assert isinstance(qkv(), native.Int8Gemv)
    monkeypatch.setenv("TEXT2LLM_NATIVE", "0")
    native.reset()
    try:
        without, _ = run()
        assert not isinstance(qkv(), native.Int8Gemv)
    finally:
        monkeypatch.delenv("TEXT2LLM_NATIVE")
        native.reset()
    rel = np.linalg.norm(with_kernel - without) / np.linalg.norm(without)
    assert rel < 0.02
    assert (with_kernel.argmax(-1) == without.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("rows", [1, 5, 12])  # 12 > MAX_ROWS: torch's norm, then the fallback
def test_rmsnorm_fused_into_the_kernel(path_lib, rows):
    lib = path_lib
    g = torch.Generator().manual_seed(rows)
    q = torch.randint(-127, 128, (100, 48), dtype=torch.int8, generator=g)
    scale, bias = torch.rand(100, generator=g) * 0.01 + 1e-3, torch.randn(100, generator=g)
    weight = torch.rand(48, generator=g) + 0.5
    x = torch.randn(rows, 48, generator=g) * 3
    mm = native.Int8Gemv(lib, q, scale, bias, fallback=lambda h: _emulate(h, q, scale, bias))
    fused = mm.with_rmsnorm(weight, 1e-5)
    h = torch.nn.functional.rms_norm(x, (48,), weight, 1e-5)
    # the same numbers as norm-then-kernel, up to the float rounding of the norm (which may move a
    # quantized activation by one step at a rounding boundary)
    ref = mm(h) if rows <= native.MAX_ROWS else _emulate(h, q, scale, bias)
    assert ((fused(x) - ref).norm() / ref.norm()) < 1e-3
    with pytest.raises(ValueError, match="expected \\(48,\\)"):
        mm.with_rmsnorm(torch.ones(47), 1e-5)


def test_fast_decode_step_moves_the_norms_into_the_int8_kernel():
    """With the native kernel the int8 decode step calls no norm before q/k/v, the MLP and the
    head (the kernel applies them); its logits stay those of the model's forward."""
    from text2llm.compress import quantize as Q
    from text2llm.infer.fast_step import FastDecodeStep
    from text2llm.infer.packing import pack_weights
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import KVCache, Transformer

    _lib()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64)
    q = pack_weights(Q.quantize_model(Transformer(cfg).eval()))
    step = FastDecodeStep.build(q)
    assert step.final_norm is None and all(layer[0] is None and layer[3] is None for layer in step.layers)
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        c1, c2 = KVCache(cfg, 2), KVCache(cfg, 2)
        q(ids[:, :5], cache=c1)
        q(ids[:, :5], cache=c2)
        for t in range(5, 8):
            a = step(ids[:, t], c1.pos, c1)
            b = q(ids[:, t : t + 1], cache=c2).logits[:, -1]
            assert ((a - b).norm() / b.norm()) < 1e-3


AVX512 = {"avx512f", "avx512bw", "avx512_vnni", "avx2", "fma"}


def test_dispatch_rule():
    """The best path a CPU's flags allow, ``TEXT2LLM_INT8_KERNEL`` forcing one, and an error for a
    path the CPU lacks or an unknown name."""
    ap = native.available_paths
    assert ap(AVX512, "x86_64") == ["avx512vnni", "avx2"]
    assert ap({"avx2", "fma", "avx_vnni"}, "x86_64") == ["avxvnni", "avx2"]
    assert ap({"avx2", "fma"}, "AMD64") == ["avx2"]
    assert ap({"avx", "sse4_2"}, "x86_64") == [] and ap({"avx2"}, "x86_64") == []  # AVX2 without FMA
    assert ap({"asimd", "asimddp"}, "aarch64") == ["neon"] and ap({"asimd"}, "aarch64") == []
    assert ap(AVX512, "aarch64") == [] and ap({"asimddp"}, "x86_64") == []
    choose = native.choose_path
    assert choose(None, ["avx512vnni", "avx2"]) == "avx512vnni" and choose("auto", ["avx2"]) == "avx2"
    assert choose(" AVX2 ", ["avx512vnni", "avx2"]) == "avx2"
    assert choose("off", ["avx2"]) is None and choose("auto", []) is None
    with pytest.raises(native.UserError, match="TEXT2LLM_INT8_KERNEL=avxvnni: this CPU cannot run it"):
        choose("avxvnni", ["avx512vnni", "avx2"])
    with pytest.raises(native.UserError, match="unknown kernel"):
        choose("sse9", ["avx2"])


def test_forced_path_via_the_environment(fresh_native, monkeypatch):
    have = native.available_paths()
    monkeypatch.setenv(native.ENV, "off")
    assert native.load() is None and "TEXT2LLM_INT8_KERNEL=off" in native.reason() and native.path() is None
    missing = next((p for p in native.PATHS if p not in have), None)
    if missing:
        monkeypatch.setenv(native.ENV, missing)
        native.reset()
        with pytest.raises(native.UserError, match=f"{missing}: this CPU cannot run it"):
            native.load()
    if native._compiler() is None or not have:
        pytest.skip("no kernel path or compiler here")
    built = set()
    for p in have:
        monkeypatch.setenv(native.ENV, p)
        native.reset()
        _lib()
        assert native.path() == p
        built |= {d.name for d in (fresh_native.cache_dir()).iterdir()}
    assert len(built) == len(have)  # one build (and cache key) per path


@pytest.mark.parametrize("path", ["avx512vnni", "avxvnni", "avx2"])
def test_every_x86_path_compiles(path, tmp_path):
    """Paths this CPU cannot run are compile-tested at least (the compiler must know the flags)."""
    cc = native._compiler()
    if cc is None or native.platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("needs an x86-64 C compiler")
    flags = ["-mavx512f", "-mavx512bw", "-mavx512vnni", "-mfma"] if path == "avx512vnni" else None
    try:  # (for avx512vnni the explicit flags: -march=native would not enable AVX-512 on a CPU without it)
        native.compile_source(cc, path, tmp_path / "k.so", extra=flags)
    except RuntimeError as e:
        if "unrecognized" in str(e) or "unknown" in str(e):
            pytest.skip(f"this compiler lacks {path}: {e}")
        raise
    assert (tmp_path / "k.so").stat().st_size > 1000


DRIVER = r"""
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
typedef struct { int64_t K, N; const int8_t *wp; const int32_t *colsum; const float *scale, *bias; } t2l_mat;
void t2l_pack_i8(const int8_t *, int64_t, int64_t, int8_t *, int32_t *);
void t2l_gemv_i8(const t2l_mat *, const float *, int64_t, const float *, float *, const void *);
int t2l_block_cols(void);
int main(int argc, char **argv) {  /* in: M N K, w (N*K int8), scale (N), bias (N), x (M*K); out: y (M*N) */
    FILE *f = fopen(argv[1], "rb"), *o = fopen(argv[2], "wb");
    int64_t d[3];
    if (!f || !o || fread(d, 8, 3, f) != 3) return 1;
    const int64_t M = d[0], N = d[1], K = d[2], BW = t2l_block_cols(), NP = (N + BW - 1) / BW * BW;
    int8_t *w = malloc(N * K), *wp = malloc(NP * ((K + 3) / 4) * 4);
    int32_t *cs = malloc(NP * 4);
    float *sc = malloc(N * 4), *b = malloc(N * 4), *x = malloc(M * K * 4), *y = malloc(M * N * 4);
    if (fread(w, 1, N * K, f) != (size_t)(N * K) || fread(sc, 4, N, f) != (size_t)N || fread(b, 4, N, f) != (size_t)N
        || fread(x, 4, M * K, f) != (size_t)(M * K)) return 2;
    t2l_pack_i8(w, N, K, wp, cs);
    t2l_mat mat = {K, N, wp, cs, sc, b};
    t2l_gemv_i8(&mat, x, M, 0, y, 0);
    fwrite(y, 4, M * N, o);
    return fclose(o);
}
"""


def test_neon_path_cross_compiled_and_run_under_emulation(tmp_path):
    """The aarch64 dot-product path, cross-compiled (aarch64-linux-gnu-gcc) and run under
    qemu-aarch64 where they are installed: the same numbers as the emulation."""
    import shutil

    import numpy as np

    cc = shutil.which("aarch64-linux-gnu-gcc")
    if cc is None:
        pytest.skip("no aarch64 cross compiler (apt-get install gcc-aarch64-linux-gnu)")
    (tmp_path / "driver.c").write_text(DRIVER)
    exe = tmp_path / "drv"
    r = subprocess.run([cc, "-O2", "-static", *native.PATH_FLAGS["neon"], "-DT2L_PATH_NEON", "-o", str(exe),
                        str(tmp_path / "driver.c"), str(native.SOURCE), "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if qemu is None:
        pytest.skip("compiled; no qemu-aarch64 to run it (apt-get install qemu-user)")
    g = torch.Generator().manual_seed(5)
    for m, n, k in [(3, 70, 33), (5, 16, 256), (1, 1, 1)]:
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        scale, bias = torch.rand(n, generator=g) * 0.01 + 1e-3, torch.randn(n, generator=g)
        x = torch.randn(m, k, generator=g)
        (tmp_path / "in").write_bytes(np.array([m, n, k], dtype=np.int64).tobytes() + q.numpy().tobytes()
                                      + scale.numpy().tobytes() + bias.numpy().tobytes() + x.numpy().tobytes())
        subprocess.run([qemu, str(exe), str(tmp_path / "in"), str(tmp_path / "out")], check=True, timeout=60)
        y = torch.from_numpy(np.fromfile(tmp_path / "out", dtype=np.float32).reshape(m, n))
        torch.testing.assert_close(y, _emulate(x, q, scale, bias), rtol=1e-5, atol=1e-5)
