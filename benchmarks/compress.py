"""Compression benchmark: int8 quantization, structured pruning + fine-tune, distillation vs scratch.

Prints one JSON line per (model, case) to stdout; library tables and progress go to stderr.

    flock /tmp/text2llm-bench.lock .venv/bin/python benchmarks/compress.py \\
        --ckpt runs/demo/train --data runs/demo/tokens          # the default `text2llm run` model
    flock /tmp/text2llm-bench.lock .venv/bin/python benchmarks/compress.py   # trains its own models

Models:
  demo  the model the default `text2llm run` trains (--ckpt; without it, the same shape is trained
        here for --demo-steps on the bundled TinyStories sample, which is less converged than a real run)
  10m   the `dense-10m` preset (~11M parameters with a 4K vocab): --ckpt-10m, or trained for --steps-10m

Cases and targets (issue 7):
  quantize      int8 decode >= 1.5x faster than fp32, val bits-per-byte +<= 2% relative
  int8-bound    (not in the default --cases) the decode step's time without its matmuls: the most
                any int8 kernel could gain on this CPU (see case_int8_bound)
  int8-kernels  (not in the default --cases) us per call of fp32, fbgemm, _weight_int8pack_mm and
                the native kernel on the decode step's matrices
  prune-ffn     30% of the FFN channels removed + --finetune-steps: bits-per-byte within 5% of the original
  prune-heads   a quarter/third of the heads removed + fine-tune (reported, no target)
  magnitude     50% unstructured sparsity + fine-tune (reported, no target)
  distill       student with half the layers: distilled beats the same student from scratch, same steps
                (the student starts from the teacher's embeddings and every 2nd block, as the CLI default)
  distill-random-init  the same with a randomly initialised student: what the KL loss alone gains
                over the scratch run, which also starts at random

Runtime (1 thread, measured step rates on the 2-core CPU with other work running): the demo shape
trains at ~1 s/step at batch 8 and ~2 s/step at batch 16, dense-10m ~3x slower. With --ckpt of a
demo run (batch 16) the demo cases take ~20 min (3 fine-tunes of 100 steps, distill + scratch of
200 steps). Training both models here with the defaults adds ~20 min (demo) + ~30 min (10m).
Shorter: `--models demo`, `--cases quantize,prune-ffn`, fewer steps, `--batch-size 8`.
Latencies use --threads torch threads (default 1); before/after models take turns in every repeat
and the best of 7 counts, so the ratios hold up under load better than the absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import sys
import time
from pathlib import Path

# `python benchmarks/compress.py` puts benchmarks/ first on sys.path, where benchmarks/tokenize.py
# would shadow the standard library's tokenize (which torch needs): keep the dir off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

LATENCY = {"prefill_len": 128, "decode_tokens": 64, "repeats": 7}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def build_data(work: Path) -> Path:
    """Tokenizer (SentencePiece BPE 4096, as the default run) + token shards of the bundled sample."""
    from text2llm.config import PackConfig, TokenizerConfig
    from text2llm.pack import pack
    from text2llm.run import bundled_corpus
    from text2llm.tokenizer import train_tokenizer

    tokens = work / "tokens"
    if (tokens / "meta.json").is_file():
        return tokens
    texts = []
    for f in bundled_corpus():
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh if line.strip()]
    train_tokenizer(iter(texts), work / "tokenizer", TokenizerConfig(vocab_size=4096), overwrite=True)
    pack(texts, work / "tokenizer", tokens, PackConfig(), overwrite=True, progress=False)
    return tokens


def train_model(work: Path, name: str, overrides: list[str], data: Path) -> Path:
    from text2llm.config import load_config
    from text2llm.checkpoint import list_checkpoints
    from text2llm.train.trainer import train

    run = work / name
    if list_checkpoints(run):
        return list_checkpoints(run)[-1]
    t0 = time.perf_counter()
    # a fixed number of steps (no time budget), so the stand-in models are the same on any machine
    res = train(load_config(None, ["train.time_budget_s=0", *overrides]), data, run, overwrite=True, progress=False)
    log(f"trained {name}: {res.step} steps in {time.perf_counter() - t0:.0f}s, val bpb {res.val_bits_per_byte}")
    return res.last_checkpoint


def case_quantize(name, ckpt, data, work):
    from text2llm.compress.quantize import quantize_checkpoint

    rep = quantize_checkpoint(ckpt, work / f"{name}-int8", data=data, overwrite=True, latency_kwargs=LATENCY)
    b, a, d = rep["before"], rep["after"], rep["delta"]
    speed = d["decode_ms_per_token"]["ratio"]
    bpb_rel = d["val_bits_per_byte"]["rel"]
    return {"case": "quantize", "model": name, "size_mb_fp32": b["size_bytes"] / 1e6, "size_mb_int8": a["size_bytes"] / 1e6,
            "decode_ms_fp32": b["decode_ms_per_token"], "decode_ms_int8": a["decode_ms_per_token"], "decode_speedup": speed,
            "prefill_ms_per_token_fp32": b["prefill_ms_per_token"], "prefill_ms_per_token_int8": a["prefill_ms_per_token"],
            "prefill_speedup": d["prefill_ms_per_token"]["ratio"],
            "bpb_fp32": b["val_bits_per_byte"], "bpb_int8": a["val_bits_per_byte"], "bpb_rel_change": bpb_rel,
            "target": "decode_speedup >= 1.5 and bpb_rel_change <= 0.02",
            "pass": bool(speed >= 1.5 and bpb_rel <= 0.02)}


def case_int8_bound(name, ckpt, data, work):
    """How much faster could int8 make this model's decode step on this CPU, whatever the kernel?

    Times, batch 1 at positions ``prefill_len`` .. ``+decode_tokens``, through infer/fast_step.py
    (the path generation takes), the models taking turns, best of ``repeats``:
    * ``fp32``: the float model's step;
    * ``int8``: the int8 model's step as ``compress quantize`` makes it (the kernels torch has);
    * ``no_matmul``: the float step with every matmul replaced by a ready-made output (the
      norms, RoPE, cache writes, attention and residual adds stay): what is left when matmuls cost
      nothing.
    ``bound_free_matmul`` = fp32 / no_matmul is the most that faster matmuls alone could give;
    ``bound_quarter_matmul`` = fp32 / (no_matmul + matmul / 4) is what a kernel as fast as reading a
    quarter of the bytes (int8 instead of fp32 weights, no fixed cost per call) would give. (The
    native int8 kernel also applies the RMSNorms in front of its matmuls, which ``no_matmul`` still
    runs, so ``int8`` may beat ``bound_quarter_matmul``.)
    """
    import torch.nn.functional as F

    import text2llm
    from text2llm.compress.common import load_fp32
    from text2llm.compress.quantize import quantize_model
    from text2llm.infer.fast_step import FastDecodeStep
    from text2llm.infer.packing import pack_weights
    from text2llm.model.transformer import KVCache

    fp, _ = text2llm.load(ckpt)
    q8 = quantize_model(load_fp32(ckpt).fresh_model())
    cfg = fp.cfg
    for m in (fp, q8):
        pack_weights(m.eval())
    step_fp, step_q8 = FastDecodeStep.build(fp), FastDecodeStep.build(q8)
    mlp = fp.blocks[0].mlp
    hidden = mlp.up_proj.out_features
    qkv_out = torch.randn(1, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim)
    up_out = torch.randn(1, 2 * hidden if mlp.swiglu else hidden)
    logits = torch.randn(1, cfg.vocab_size)

    def mlp_in(h):  # the activation stays, the matmul goes
        if mlp.swiglu:
            gate, up = up_out.chunk(2, dim=-1)
            return F.silu(gate).mul_(up)
        return F.gelu(up_out, approximate="tanh")

    step_null = FastDecodeStep.__new__(FastDecodeStep)
    step_null.__dict__.update(step_fp.__dict__)
    step_null.layers = [(n1, lambda h: qkv_out, lambda r, y: r, n2, mlp_in, lambda r, h: r)
                        for n1, _, _, n2, _, _ in step_fp.layers]
    step_null.head = lambda h: logits
    start, n = LATENCY["prefill_len"], LATENCY["decode_tokens"]
    ids = torch.randint(0, cfg.vocab_size, (n, 1), generator=torch.Generator().manual_seed(0))
    caches = {k: KVCache(cfg, 1, start + n) for k in ("fp32", "int8", "no_matmul")}
    steps = {"fp32": step_fp, "int8": step_q8, "no_matmul": step_null}

    def ms(key):
        cache, step = caches[key], steps[key]
        t0 = time.perf_counter()
        for i in range(n):
            step(ids[i], start + i, cache)
        return (time.perf_counter() - t0) * 1e3 / n

    best = {k: float("inf") for k in steps}
    with torch.inference_mode():
        for k in steps:
            ms(k)  # warm-up
        for _ in range(LATENCY["repeats"]):
            for k in steps:
                best[k] = min(best[k], ms(k))
    mm = best["fp32"] - best["no_matmul"]
    quarter = best["fp32"] / (best["no_matmul"] + mm / 4)
    return {"case": "int8-bound", "model": name, "decode_ms_fp32": best["fp32"], "decode_ms_int8": best["int8"],
            "decode_ms_no_matmul": best["no_matmul"], "matmul_share": mm / best["fp32"],
            "int8_speedup": best["fp32"] / best["int8"], "bound_free_matmul": best["fp32"] / best["no_matmul"],
            "bound_quarter_matmul": quarter, "target_speedup": 1.5, "reachable_with_quarter_matmul": bool(quarter >= 1.5)}


def case_int8_kernels(name, ckpt, data, work):
    """Microseconds per call of each kernel on the matrices of this model's decode step (q/k/v,
    o, gate/up, down of every layer, and the head), one row, the matrices taken in turn as a
    step does (so weights come from memory, not from a cache warmed by the previous call):
    fp32 ``torch.mm``, fbgemm ``quantized::linear_dynamic``, ``aten._weight_int8pack_mm``, and
    the native kernel (text2llm/compress/native) where it builds."""
    import warnings

    import text2llm
    from text2llm.compress import native
    from text2llm.infer.packing import pack_weights, packed_matmul

    fp, _ = text2llm.load(ckpt)
    pack_weights(fp.eval())
    groups = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
    ws = [packed_matmul(getattr(b, "attn" if g[0][0] in "qkvo" else "mlp"), g).w_IO.t().contiguous()
          for b in fp.blocks for g in groups] + [packed_matmul(fp, ("lm_head",)).w_IO.t().contiguous()]
    qs = []
    for w in ws:
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        qs.append((torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale))
    xs = [torch.randn(1, w.shape[1]) for w in ws]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fb = [torch.ops.quantized.linear_prepack(torch._make_per_channel_quantized_tensor(
            q, s.double(), torch.zeros(len(s), dtype=torch.long), 0), None) for q, s in qs]
    kernels = {
        "fp32": lambda: [torch.mm(x, w.t()) for x, w in zip(xs, ws)],
        "fbgemm": lambda: [torch.ops.quantized.linear_dynamic(x, p, True) for x, p in zip(xs, fb)],
        "weight_int8pack_mm": lambda: [torch.ops.aten._weight_int8pack_mm(x, q, s) for x, (q, s) in zip(xs, qs)],
    }
    lib = native.load()
    if lib is not None:
        nat = [native.Int8Gemv(lib, q, s) for q, s in qs]
        kernels["native"] = lambda: [m(x) for m, x in zip(nat, xs)]
    best = {k: float("inf") for k in kernels}
    with torch.inference_mode():
        for k, f in kernels.items():
            f()
        for _ in range(LATENCY["repeats"]):
            for k, f in kernels.items():
                t0 = time.perf_counter()
                for _ in range(20):
                    f()
                best[k] = min(best[k], (time.perf_counter() - t0) / 20 / len(ws) * 1e6)
    return {"case": "int8-kernels", "model": name, "matrices": len(ws), "rows": 1,
            "us_per_call": {k: round(v, 1) for k, v in best.items()},
            "vs_fp32": {k: round(best["fp32"] / v, 2) for k, v in best.items()}, "native": native.describe()}


def case_prune(name, ckpt, data, work, method, sparsity, steps):
    from text2llm.compress.prune import prune_checkpoint

    rep = prune_checkpoint(ckpt, work / f"{name}-{method}", method, sparsity, finetune_steps=steps, data=data,
                           overwrite=True, latency_kwargs=LATENCY, progress=False)
    b, a = rep["before"], rep["after"]
    p = rep.get("pruned", {})
    rel = a["val_bits_per_byte"] / b["val_bits_per_byte"] - 1
    out = {"case": f"prune-{method}", "model": name, "sparsity": sparsity, "finetune_steps": steps,
           "params_before": b["params"], "params_after": a["params"], "params_removed_share": 1 - a["params"] / b["params"],
           "decode_ms_before": b["decode_ms_per_token"], "decode_ms_after": a["decode_ms_per_token"],
           "prefill_speedup": b["prefill_ms_per_token"] / a["prefill_ms_per_token"],
           "bpb_before": b["val_bits_per_byte"], "bpb_pruned_no_finetune": p.get("val_bits_per_byte"),
           "bpb_after_finetune": a["val_bits_per_byte"], "bpb_rel_change": rel,
           "shape": {k: v for k, v in rep["settings"].items() if k in ("ffn_hidden", "n_head", "n_kv_head", "sparsity")}}
    if method == "ffn":
        out.update(target="bpb_rel_change <= 0.05", **{"pass": bool(rel <= 0.05)})
    return out


_SCRATCH: dict = {}  # (model, steps, checkpoint) -> (seconds, bpb, KL to teacher) of the scratch student


def case_distill(name, ckpt, data, work, steps, alpha, temperature, init="teacher"):
    import text2llm
    from text2llm.compress.distill import distill_checkpoint, kl_to_teacher
    from text2llm.config import load_config
    from text2llm.evaluate import evaluate_tokens
    from text2llm.checkpoint import read_checkpoint_config, resolve_checkpoint
    from text2llm.train.trainer import train

    ckpt = resolve_checkpoint(ckpt)
    t_cfg = read_checkpoint_config(ckpt)
    layers = max(1, t_cfg.model.n_layer // 2)
    over = [f"model.n_layer={layers}", f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
            "train.eval_every=0", "train.checkpoint_every=0", f"train.threads={torch.get_num_threads()}",
            "train.time_budget_s=0"]  # (a run's time budget would cut the two runs to different step counts)
    teacher, _ = text2llm.load(ckpt)
    t0 = time.perf_counter()
    rep = distill_checkpoint(ckpt, ckpt / "config.toml", work / f"{name}-distilled-{init}", overrides=over, data=data,
                             alpha=alpha, temperature=temperature, overwrite=True, latency_kwargs=LATENCY, progress=False,
                             init=init)
    t_distill = time.perf_counter() - t0
    key = (name, steps, str(ckpt))
    if key not in _SCRATCH:  # the scratch student is the same for both distill cases: trained once
        t0 = time.perf_counter()
        res = train(load_config(ckpt / "config.toml", over), data, work / f"{name}-scratch", overwrite=True, progress=False)
        t_scratch = time.perf_counter() - t0
        scratch, _ = text2llm.load(res.last_checkpoint)
        _SCRATCH[key] = (t_scratch, evaluate_tokens(scratch, data)["bits_per_byte"], kl_to_teacher(scratch, teacher, data))
    t_scratch, s_bpb, s_kl = _SCRATCH[key]
    d_bpb = rep["after"]["val_bits_per_byte"]
    return {"case": "distill" if init == "teacher" else f"distill-{init}-init", "model": name, "teacher_layers": t_cfg.model.n_layer, "student_layers": layers,
            "steps": steps, "alpha": alpha, "temperature": temperature,
            "teacher_params": rep["before"]["params"], "student_params": rep["after"]["params"],
            "bpb_teacher": rep["before"]["val_bits_per_byte"], "bpb_distilled": d_bpb, "bpb_scratch": s_bpb,
            "kl_distilled": rep["after"]["kl_to_teacher"], "kl_scratch": s_kl,
            "decode_ms_teacher": rep["before"]["decode_ms_per_token"], "decode_ms_student": rep["after"]["decode_ms_per_token"],
            "student_init": rep["settings"]["init"], "scratch_init": "random",
            "seconds_distill": round(t_distill, 1), "seconds_scratch": round(t_scratch, 1),
            "target": "bpb_distilled < bpb_scratch", "pass": bool(d_bpb < s_bpb)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="run dir or checkpoint of the default `text2llm run` model (e.g. runs/demo/train)")
    ap.add_argument("--data", help="its token shards (e.g. runs/demo/tokens); default: the run's own, or built here")
    ap.add_argument("--ckpt-10m", help="a trained ~10M-parameter checkpoint (default: train dense-10m here)")
    ap.add_argument("--models", default="demo,10m", help="comma list of: demo, 10m")
    ap.add_argument("--cases", default="quantize,prune-ffn,prune-heads,magnitude,distill,distill-random-init")
    ap.add_argument("--work", default="runs/bench-compress", help="scratch dir for data, models and outputs")
    ap.add_argument("--demo-steps", type=int, default=600, help="steps when training the demo-shaped model here")
    ap.add_argument("--steps-10m", type=int, default=300, help="steps when training the 10M model here")
    ap.add_argument("--batch-size", type=int, default=16, help="batch size when training models here (default run: 16)")
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--distill-steps", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = set(a.cases.split(","))
    t_all = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        from text2llm.compress.common import run_data_dir
        from text2llm.checkpoint import resolve_checkpoint

        models = {}
        data = Path(a.data) if a.data else (run_data_dir(resolve_checkpoint(a.ckpt)) if a.ckpt else None)
        if data is None:
            data = build_data(work)
        train_common = [f"train.threads={a.threads}", "train.eval_every=0", "train.device=cpu",
                        f"train.batch_size={a.batch_size}"]
        if "demo" in a.models:
            models["demo"] = resolve_checkpoint(a.ckpt) if a.ckpt else train_model(
                work, "demo", train_common + [f"train.max_steps={a.demo_steps}", "train.warmup_steps=50"], data)
        if "10m" in a.models:
            models["10m"] = resolve_checkpoint(a.ckpt_10m) if a.ckpt_10m else train_model(
                work, "dense-10m", train_common + ["model.preset=dense-10m", f"train.max_steps={a.steps_10m}",
                                                   "train.warmup_steps=30", "train.lr=2e-3",
                                                   "train.min_lr=2e-4"], data)
    for name, ckpt in models.items():
        jobs = []
        if "quantize" in cases:
            jobs.append(lambda: case_quantize(name, ckpt, data, work))
        if "int8-bound" in cases:
            jobs.append(lambda: case_int8_bound(name, ckpt, data, work))
        if "int8-kernels" in cases:
            jobs.append(lambda: case_int8_kernels(name, ckpt, data, work))
        if "prune-ffn" in cases:
            jobs.append(lambda: case_prune(name, ckpt, data, work, "ffn", 0.3, a.finetune_steps))
        if "prune-heads" in cases:
            jobs.append(lambda: case_prune(name, ckpt, data, work, "heads", 0.3, a.finetune_steps))
        if "magnitude" in cases:
            jobs.append(lambda: case_prune(name, ckpt, data, work, "magnitude", 0.5, a.finetune_steps))
        if "distill" in cases:
            jobs.append(lambda: case_distill(name, ckpt, data, work, a.distill_steps, a.alpha, a.temperature))
        if "distill-random-init" in cases:
            jobs.append(lambda: case_distill(name, ckpt, data, work, a.distill_steps, a.alpha, a.temperature, "random"))
        for job in jobs:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                row = job()
            row.update(checkpoint=str(ckpt), threads=a.threads, seconds=round(time.perf_counter() - t0, 1))
            emit(row)
    log(f"total {time.perf_counter() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
