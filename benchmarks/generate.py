"""Generation speed: PyTorch without / with KV cache, int8, ONNX Runtime fp32 / int8, transformers' generate, llama.cpp.

    flock /tmp/text2llm-bench.lock .venv/bin/python benchmarks/generate.py                 # random default + ~10M models
    flock /tmp/text2llm-bench.lock .venv/bin/python benchmarks/generate.py --ckpt runs/demo/train --models ckpt,10m

Prints one JSON object per line:
  {"case": "decode", "model", "engine", "batch", "prompt_tokens", "new_tokens", "tok_s", "seconds"}
      greedy generation of exactly ``new_tokens`` tokens (EOS ignored) after a short prompt;
      tok_s = batch * new_tokens / wall time (the short prefill included, as in HF's generate)
  {"case": "step", "model", "engine", "batch", "cached": 16 | 270, "ms"}   one decode step (no
      sampling) with that many tokens already cached, PyTorch eager / compiled / AOT and ORT fp32;
      ``torch-forward`` is the eager engine with ``fast_step=False`` (the model's ``forward`` for
      each step instead of ``infer/fast_step.py``), for comparison; ``torch-int8`` is the eager
      engine on the model quantized as ``compress quantize`` does it (decode steps through the
      native int8 kernel where it builds, text2llm/compress/native)
      ``llama-cpp`` (batch 1): llama.cpp through llama-cpp-python on the GGUF export of the same
      weights (``text2llm export gguf``, f32); when llama_cpp is not installed (``make
      test-interop`` installs it) the row is ``{"engine": "llama-cpp", "skipped": "<why>"}``
  {"case": "prefill", "model", "engine", "tokens": 512, "tok_s"}   one 512-token prompt, batch 1
  {"case": "summary", "model", ...ratios..., "targets": {...: true/false}}
Targets (issue 8): KV cache >= 5x no cache at 256 new tokens; our PyTorch path >= 1.5x
transformers' generate; ORT fp32 >= our PyTorch path. The summary checks them for each PyTorch
path: ``torch-cache`` (eager, the default), ``torch-compiled`` (``generate --compile``, timed
after a first run that compiles it, reported as ``{"case": "compile"}``) and ``torch-aot`` (the
step compiled ahead of time, ``text2llm export aot``; its compile is ``{"case": "aot_compile"}``,
its load in a new process ``{"case": "aot_load"}``).

Models: ``default`` = the ``text2llm run`` model shape (ModelConfig defaults, vocab 4096) with
random weights; ``10m`` = d_model 384, 5 layers, vocab 4096 (~10.4M parameters), random
weights; ``ckpt`` = the model of ``--ckpt``. Speed does not depend on the weights' values. A
rotary model whose ``max_seq_len`` is shorter than prompt + new tokens (or 512 for the prefill case)
gets longer rotary tables (the weights are unchanged), reported as ``context_extended_from``.
The HF model comes from ``text2llm.interop.hf.export_hf`` of the same weights; the first 32
greedy tokens of every engine are checked against our PyTorch path (``same_tokens``). One
near-tie flips the rest of a greedy row, so ``same_tokens`` is a smoke test; the fidelity figure is
  {"case": "agreement", "model", "engine", "text", "positions", "top1_agree"}
      teacher-forced along the decode path: every engine is fed the same 8 x 128 tokens (prefill of
      16, then one decode step per token) and its next-token argmax is compared with the eager
      PyTorch engine's at each position. ``text`` is "tinystories" (documents of
      ../shared/data/tinystories, encoded with the checkpoint's tokenizer) or "random" (token
      ids, for the random-weight models).
"""

from __future__ import annotations

import sys

# this dir holds other benchmarks (e.g. tokenize.py) that would shadow standard modules
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0]) and not p.endswith("/benchmarks")]

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from text2llm.config import Config
from text2llm.infer.decoding import SamplingParams, iter_tokens
from text2llm.infer.generate import TorchEngine
from text2llm.model.config import ModelConfig
from text2llm.model.transformer import Transformer


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def build_model(name: str, ckpt: str | None, need_len: int):
    """(model, checkpoint dir for the HF export, context it was extended from or None)."""
    extended = None
    if name == "ckpt":
        from text2llm.checkpoint import load_weights, read_checkpoint_config, resolve_checkpoint

        src = resolve_checkpoint(ckpt)
        cfg = read_checkpoint_config(src).model
        if cfg.max_seq_len < need_len and cfg.positions == "rope":
            extended, cfg = cfg.max_seq_len, cfg.model_copy(update={"max_seq_len": need_len})
        model = Transformer(cfg)
        load_weights(model, src / "model.safetensors")
        return model.eval(), src, extended
    if name == "default":
        cfg = ModelConfig(vocab_size=4096)
        if cfg.max_seq_len < need_len:
            extended, cfg = cfg.max_seq_len, cfg.model_copy(update={"max_seq_len": need_len})
    else:  # 10m
        cfg = ModelConfig(vocab_size=4096, d_model=384, n_layer=5, n_head=6, max_seq_len=max(1024, need_len))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    # a checkpoint dir so that export_hf sees exactly what a user would export
    from text2llm.train.checkpoint import save_checkpoint

    full = Config()
    full.train.seq_len = min(full.train.seq_len, cfg.max_seq_len)
    full.model = cfg
    tmp = Path(tempfile.mkdtemp(prefix="t2l-bench-"))
    src = save_checkpoint(tmp, 0, model, None, {}, full.to_toml(), None)
    return model, src, extended


class HFEngine:
    """transformers' generate on the HF export (greedy, exactly n new tokens)."""

    def __init__(self, src: Path, workdir: Path):
        from transformers import AutoModelForCausalLM

        from text2llm.interop.hf import export_hf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = export_hf(src, workdir / "hf", overwrite=True)
            self.model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()

    @torch.no_grad()
    def generate(self, prompts: np.ndarray, n: int) -> np.ndarray:
        ids = torch.from_numpy(prompts)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[:, ids.shape[1]:].numpy()

    @torch.no_grad()
    def prefill(self, ids: np.ndarray) -> None:
        self.model(torch.from_numpy(ids), use_cache=True)


class LlamaCppEngine:
    """llama.cpp (llama-cpp-python) on the GGUF export of the same weights (``text2llm export
    gguf``, f32): greedy, exactly n new tokens, one row at a time (batch 1 only)."""

    def __init__(self, src: Path, workdir: Path, n_ctx: int, threads: int | None):
        import llama_cpp

        from text2llm.interop.gguf import export_gguf

        path = export_gguf(src, workdir / "model.gguf", overwrite=True)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, verbose=False,
                                   n_threads=threads or os.cpu_count())

    def generate(self, prompts: np.ndarray, n: int) -> np.ndarray:
        rows = []
        for row in prompts:
            out = []
            for t in self.llm.generate([int(x) for x in row], temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                out.append(t)
                if len(out) == n:
                    break
            rows.append(out)
        return np.array(rows)


def llama_cpp_skipped(cfg) -> str | None:
    """Why the llama.cpp row cannot run here (one line), or None."""
    import importlib.util

    from text2llm.errors import UserError
    from text2llm.interop.gguf import check_gguf

    if importlib.util.find_spec("llama_cpp") is None:
        return ("llama_cpp (llama-cpp-python) is not installed: `make test-interop` installs it "
                "(it builds llama.cpp from source, ~13 min on 2 cores)")
    try:
        check_gguf(cfg)
    except UserError as e:
        return str(e)
    return None


def run_ours(engine, prompts: np.ndarray, n: int) -> np.ndarray:
    p = SamplingParams(max_new_tokens=n, temperature=0)
    steps = list(iter_tokens(engine, [list(r) for r in prompts], p, eos_id=None, pad_id=0))
    return np.stack(steps, 1)


def teacher_forced_top1(engine, ids_BN: np.ndarray, prompt: int) -> np.ndarray:
    """(B, N - prompt) next-token argmax of ``engine`` fed ``ids_BN``: prefill of the first
    ``prompt`` tokens, then one decode step per reference token."""
    B, N = ids_BN.shape
    logits = engine.prefill(ids_BN[:, :prompt], np.ones((B, prompt), np.int64), total_len=N)
    out = [logits.argmax(-1)]
    for t in range(prompt, N - 1):
        out.append(engine.step(ids_BN[:, t]).argmax(-1))
    return np.stack(out, 1)


def agreement_text(ckpt: Path | None, vocab: int, B: int = 8, N: int = 128) -> tuple[str, np.ndarray]:
    """(label, (B, N) token ids): TinyStories documents through the checkpoint's tokenizer, else
    random ids."""
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"
    tok_dir = ckpt / "tokenizer" if ckpt is not None else None
    shards = sorted(data.glob("*.jsonl.gz"))
    if tok_dir is not None and tok_dir.is_dir() and shards:
        import gzip

        from text2llm.tokenizer import Tokenizer

        tok = Tokenizer.load(tok_dir)
        rows = []
        with gzip.open(shards[-1], "rt", encoding="utf-8") as f:
            for line in f:
                ids = tok.encode(json.loads(line)["text"])
                if len(ids) >= N:
                    rows.append(ids[:N])
                if len(rows) == B:
                    return "tinystories", np.array(rows, dtype=np.int64)
    return "random", np.random.default_rng(1).integers(4, vocab, size=(B, N))


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


STEP_REPEATS = 40

_AOT_LOAD = """
import time
import torch
t = time.perf_counter()
from text2llm.infer.aot import load_step
load_step({path!r})
print(time.perf_counter() - t)
"""


def aot_load_seconds(aot_dir: Path) -> float:
    """Seconds to load the AOT package in a fresh process, after ``import torch`` (inductor's import
    included): what ``generate DIR`` pays where ``--compile`` would compile."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _AOT_LOAD.format(path=str(aot_dir))], capture_output=True,
                         text=True, check=True).stdout
    return round(float(out.split()[-1]), 2)



def step_ms(engine, prompts: np.ndarray) -> float:
    """Milliseconds per decode step with ``prompts.shape[1]`` tokens cached: best of 3 rounds of
    STEP_REPEATS steps (the engine's step alone: no sampling)."""
    B, P = prompts.shape
    best = float("inf")
    nxt = prompts[:, -1].astype(np.int64)
    for _ in range(3):
        engine.prefill(prompts, np.ones_like(prompts), total_len=P + STEP_REPEATS + 1)
        engine.step(nxt)
        t = time.perf_counter()
        for _ in range(STEP_REPEATS - 1):
            engine.step(nxt)
        best = min(best, (time.perf_counter() - t) / (STEP_REPEATS - 1))
    return best * 1e3


def bench_model(name: str, args) -> None:
    from text2llm.interop.onnx import export_model
    from text2llm.infer.ort_runtime import OrtEngine

    need = max(args.prompt_tokens + args.new_tokens, args.prefill_tokens)
    model, src, extended = build_model(name, args.ckpt, need)
    cfg = model.cfg
    info = {"model": name, "params": model.num_params(), "d_model": cfg.d_model, "n_layer": cfg.n_layer,
            "vocab": cfg.vocab_size, "context_extended_from": extended}
    emit({"case": "model", **info})
    work = Path(tempfile.mkdtemp(prefix="t2l-bench-"))
    t = time.perf_counter()
    export_model(model, work / "onnx", int8=True)
    emit({"case": "export", "model": name, "onnx_and_int8_seconds": round(time.perf_counter() - t, 1)})
    from text2llm.infer.aot import compile_step

    t = time.perf_counter()
    compile_step(model, work / "aot", max_batch=max(args.batches))
    emit({"case": "aot_compile", "model": name, "seconds": round(time.perf_counter() - t, 1)})
    emit({"case": "aot_load", "model": name, "seconds_new_process": aot_load_seconds(work / "aot")})
    import copy

    from text2llm.compress.quantize import quantize_model

    int8_model = quantize_model(copy.deepcopy(model))  # as `compress quantize` makes it (in memory)
    engines = {
        "torch-nocache": TorchEngine(model, use_cache=False),
        "torch-cache": TorchEngine(model),
        "torch-int8": TorchEngine(int8_model),
        "torch-compiled": TorchEngine(model, compile=True),
        "torch-aot": TorchEngine(model, aot_dir=work / "aot"),
        # onnxruntime as deployed (an onnxruntime-only process): spinning worker threads. The
        # engines run one after another, never interleaved, so they do not slow torch here.
        "ort-fp32": OrtEngine.load(work / "onnx", spinning=True),
        "ort-int8": OrtEngine.load(work / "onnx", int8=True, spinning=True),
    }
    forward_engine = TorchEngine(model, fast_step=False)  # (step case only)
    hf = None if args.no_hf else HFEngine(src, work)
    llama = None
    if 1 in args.batches:
        if (why := llama_cpp_skipped(cfg)) is None:
            llama = LlamaCppEngine(src, work, need, args.threads)
        else:
            emit({"case": "decode", "model": name, "engine": "llama-cpp", "batch": 1, "skipped": why})
    others = {"hf-generate": hf, "llama-cpp": llama}  # engines outside text2llm's decoding loop
    rng = np.random.default_rng(0)
    tps: dict[tuple[str, int], float] = {}
    for B in args.batches:
        prompts = rng.integers(4, cfg.vocab_size, size=(B, args.prompt_tokens))
        check = min(32, args.new_tokens)  # greedy tokens compared with the eager engine's
        ref = run_ours(engines["torch-cache"], prompts, check)
        runs = {k: (lambda e=e: run_ours(e, prompts, args.new_tokens)) for k, e in engines.items()}
        for k, e in others.items():
            if e is not None and (k != "llama-cpp" or B == 1):
                runs[k] = lambda e=e: e.generate(prompts, args.new_tokens)
        for k, fn in runs.items():
            if k == "torch-nocache" and args.skip_nocache:
                continue
            # warm-up + correctness: the first 32 greedy tokens (the compiled engine's warm-up is a
            # whole timed-length run, which compiles its program for this batch; reported)
            if k == "torch-compiled":
                t = time.perf_counter()
                first = fn()[:, :check]
                emit({"case": "compile", "model": name, "batch": B, "first_run_seconds": round(time.perf_counter() - t, 1)})
            else:
                first = run_ours(engines[k], prompts, check) if k in engines else others[k].generate(prompts, check)
            same = float((first == ref).mean())
            dt = timed(fn)
            tps[(k, B)] = B * args.new_tokens / dt
            emit({"case": "decode", "model": name, "engine": k, "batch": B, "prompt_tokens": args.prompt_tokens,
                  "new_tokens": args.new_tokens, "tok_s": round(tps[(k, B)], 1), "seconds": round(dt, 2),
                  "same_tokens": same})
    # one decode step after 16 and after 270 cached tokens: what a step costs as the cache grows
    for B in args.batches:
        for cached in (16, 270):
            if cached + 1 + STEP_REPEATS > cfg.max_seq_len:
                continue
            prompts = rng.integers(4, cfg.vocab_size, size=(B, cached))
            for k in ("torch-cache", "torch-forward", "torch-int8", "torch-compiled", "torch-aot", "ort-fp32"):
                ms = step_ms(engines[k] if k != "torch-forward" else forward_engine, prompts)
                emit({"case": "step", "model": name, "engine": k, "batch": B, "cached": cached, "ms": round(ms, 3)})
    # prefill: one prompt of --prefill-tokens tokens
    ids = rng.integers(4, cfg.vocab_size, size=(1, args.prefill_tokens))
    mask = np.ones_like(ids)
    pre = {k: (lambda e=e: e.prefill(ids, mask)) for k, e in engines.items()
           if k not in ("torch-nocache", "torch-compiled")}  # (the compiled engine's prefill is the eager one)
    if hf is not None:
        pre["hf-forward"] = lambda: hf.prefill(ids)
    for k, fn in pre.items():
        fn()
        dt = timed(fn, repeat=3)
        emit({"case": "prefill", "model": name, "engine": k, "tokens": args.prefill_tokens,
              "tok_s": round(args.prefill_tokens / dt, 1), "seconds": round(dt, 4)})
    # fidelity: teacher-forced top-1 agreement with the eager engine along the decode path (after
    # the timed runs, so that the compiled engine's batch-8 program is already built)
    label, text = agreement_text(src if name == "ckpt" else None, cfg.vocab_size)
    ref = teacher_forced_top1(engines["torch-cache"], text, 16)
    agree = {}
    for k, e in engines.items():
        if k != "torch-cache":
            agree[k] = round(float((teacher_forced_top1(e, text, 16) == ref).mean()), 4)
            emit({"case": "agreement", "model": name, "engine": k, "text": label, "positions": int(ref.size),
                  "top1_agree": agree[k]})
    # ratios and targets
    summary = {"case": "summary", "model": name, "new_tokens": args.new_tokens, "top1_agree": agree}
    targets = {}
    for B in args.batches:
        r = lambda a, b: tps[(a, B)] / tps[(b, B)] if (a, B) in tps and (b, B) in tps else None
        i8 = r("ort-int8", "ort-fp32")
        summary[f"b{B}_ortint8_vs_ortfp32"] = None if i8 is None else round(i8, 2)
        i8 = r("torch-int8", "torch-cache")
        summary[f"b{B}_torchint8_vs_eager"] = None if i8 is None else round(i8, 2)
        if B == 1:
            lc = r("llama-cpp", "torch-cache")
            summary["b1_llamacpp_vs_eager"] = None if lc is None else round(lc, 2)
        for path, eng in (("compiled", "torch-compiled"), ("aot", "torch-aot")):  # what each gains over eager
            gain = r(eng, "torch-cache")
            summary[f"{path}_b{B}_vs_eager"] = None if gain is None else round(gain, 2)
        # the targets, once for each PyTorch path: eager (the default), compiled (--compile), AOT
        for path, eng in (("eager", "torch-cache"), ("compiled", "torch-compiled"), ("aot", "torch-aot")):
            for key, ratio, lo in ((f"b{B}_cache_vs_nocache", r(eng, "torch-nocache"), 5.0),
                                   (f"b{B}_torch_vs_hf", r(eng, "hf-generate"), 1.5),
                                   (f"b{B}_ortfp32_vs_torch", r("ort-fp32", eng), 1.0)):
                summary[f"{path}_{key}"] = None if ratio is None else round(ratio, 2)
                if ratio is not None:  # judged unrounded (0.998 is a miss, though printed as 1.0)
                    targets.setdefault(path, {})[key + f">={lo}"] = ratio >= lo
    summary["targets"] = targets
    emit(summary)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    if name != "ckpt":
        shutil.rmtree(src.parent.parent, ignore_errors=True)  # the temporary checkpoint's run dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="a checkpoint or run dir (adds the 'ckpt' model; e.g. runs/demo-*/train)")
    ap.add_argument("--models", default=None, help="comma list of default,10m,ckpt (default: ckpt,10m with --ckpt, "
                                                   "else default,10m)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads (default: all cores)")
    ap.add_argument("--skip-nocache", action="store_true", help="skip the slow no-cache baseline")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    models = (args.models or ("ckpt,10m" if args.ckpt else "default,10m")).split(",")
    if "ckpt" in models and not args.ckpt:
        ap.error("--models ckpt needs --ckpt")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    emit({"case": "env", "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
          "loadavg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__})
    for m in models:
        bench_model(m, args)
    emit({"case": "env_end", "loadavg_1m": round(os.getloadavg()[0], 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
