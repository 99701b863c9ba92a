"""Sliding-window attention: which path is fastest where, training step time and memory, decode speed and KV-cache bytes.

    flock /tmp/text2llm-bench.lock .venv/bin/python benchmarks/attention.py [--cases paths,train,decode] [--quick]
    python3 benchmarks/attention.py --device cuda        (benchmarks/gpu.sh; FlexAttention joins the paths)

Cases (one JSON object per line, each naming the CPU or GPU; ratios are within one run, the cases
of a comparison interleaved step by step so that background load hits them alike):

  paths   one attention call, forward + backward (the fastest of the repeats), of the demo model's heads (B 4, H 4, Dh 48): dense
          causal SDPA (what a dense model runs), the band as a masked dense SDPA, the blocks path
          (text2llm/model/attention.py; FlexAttention on CUDA) at T = 192 .. 2048, windows 64, 128,
          256 and 512. ``BLOCKS_MIN_WINDOWS`` / ``BLOCKS_MIN_T`` in attention.py (which path runs
          where) are read off these.
  train   one training step (forward, loss, backward) of the demo model's shape (d 192, 4 layers,
          4 heads, vocab 4096, fp32) with B x T = 8192 tokens at T = 512, 1024, 2048: dense vs a
          window of 128 and of 256 in every layer; median step time over interleaved steps. Each
          twice: plain causal rows, and rows of 200-token documents under a document mask
          (``train.document_mask``: the dense model then runs a masked SDPA, no causal kernel).
          ``saved_mib``: the tensors autograd keeps for the backward (deduplicated by storage);
          ``peak_mib``: how far the process's peak RSS rises over one step, measured in a fresh
          process per case (CUDA: max_memory_allocated).
  decode  batch-1 greedy decoding at 4k context: a 4032-token prompt, then 64 new tokens through
          the engine's KV cache (TorchEngine, the fast decode step): tokens/s and KV-cache bytes,
          dense vs window 128 / 256 in every layer and 128 with "SSSL" (3 local + 1 global).

Targets (issue 20): at T = 2048 a window of 256 trains >= 1.5x faster than dense on the CPU; the
windowed KV cache takes <= window / context of the dense one's bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this dir holds scripts named like stdlib modules (tokenize.py): keep them from shadowing the stdlib
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from text2llm.infer.generate import TorchEngine  # noqa: E402
from text2llm.model import ModelConfig, Transformer  # noqa: E402
from text2llm.model.transformer import document_mask  # noqa: E402
from text2llm.train.mfu import cpu_name  # noqa: E402
from text2llm.model.attention import (block_attention, dense_band_attention, flex_available,  # noqa: E402
                                      flex_band_attention, pick_path)

VOCAB = 4096
SHAPE = dict(vocab_size=VOCAB, d_model=192, n_layer=4, n_head=4)  # the demo model (configs/tiny-cpu.toml)
WINDOWS = (128, 256)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_name()


def emit(rec: dict, dev: torch.device) -> None:
    rec = {"bench": "attention", **rec, "device": dev.type, "cpu" if dev.type == "cpu" else "gpu": device_name(dev),
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps(rec), flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, dev: torch.device, warmup: int = 1, stat=statistics.median) -> dict[str, float]:
    """``stat`` (median; min for single kernels) of each callable's seconds, run in turns (a, b, c, a, b, c, ...)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: stat(v) for k, v in times.items()}


# ---- paths --------------------------------------------------------------------------------------


def case_paths(dev: torch.device, quick: bool, repeats: int) -> None:
    B, H, Dh = 4, 4, 48
    grid = [(512, 128), (768, 128)] if quick else [(T, W) for W in (64, *WINDOWS, 512)
                                                    for T in (192, 256, 384, 512, 768, 1024, 1536, 2048) if T > W]
    for T, W in grid:
        q, k, v = (torch.randn(B, H, T, Dh, device=dev, requires_grad=True) for _ in range(3))
        g = torch.randn(B, H, T, Dh, device=dev)

        def fwd_bwd(fn):
            return lambda: torch.autograd.backward(fn(), g)

        fns = {"dense_causal": fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
               "dense_band": fwd_bwd(lambda: dense_band_attention(q, k, v, W)),
               "blocks": fwd_bwd(lambda: block_attention(q, k, v, W))}
        if dev.type == "cuda" and flex_available():
            fns["flex"] = fwd_bwd(lambda: flex_band_attention(q, k, v, W))
        t = interleaved(fns, repeats, dev, stat=min)  # (the least disturbed call of each)
        fastest_band = min((k_ for k_ in t if k_ != "dense_causal"), key=t.get)
        emit({"case": "paths", "T": T, "window": W, "T_over_window": round(T / W, 2),
              **{f"{k_}_ms": round(s * 1e3, 2) for k_, s in t.items()}, "fastest_windowed": fastest_band,
              "blocks_speedup_vs_dense_band": round(t["dense_band"] / t["blocks"], 3),
              "blocks_speedup_vs_dense_causal": round(t["dense_causal"] / t["blocks"], 3)}, dev)


# ---- train --------------------------------------------------------------------------------------


def make_model(window: int, T: int, dev: torch.device, pattern: str = "") -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPE, max_seq_len=max(T, 256), attention_window=window, window_pattern=pattern)
    return Transformer(cfg).to(dev).train()


def train_step(model: Transformer, x: torch.Tensor, y: torch.Tensor, amp: bool, mask=None) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x, attn_mask=mask).logits
    F.cross_entropy(logits.float().view(-1, VOCAB), y.reshape(-1)).backward()
    model.zero_grad(set_to_none=True)


def saved_bytes(model: Transformer, x: torch.Tensor, y: torch.Tensor, amp: bool, mask=None) -> int:
    """Bytes of the tensors autograd saves for the backward of one step (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x, attn_mask=mask).logits
        loss = F.cross_entropy(logits.float().view(-1, VOCAB), y.reshape(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def batch(T: int, tokens: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    xy = torch.randint(0, VOCAB, (max(1, tokens // T), T + 1), generator=g).to(dev)
    return xy[:, :-1], xy[:, 1:]


def doc_mask(x: torch.Tensor) -> torch.Tensor:
    """A document mask for rows of 200-token documents (about a TinyStories story)."""
    doc_BT = (torch.arange(x.size(1), device=x.device) // 200).expand_as(x)
    return document_mask(doc_BT)


def peak_mib(window: int, T: int, tokens: int, dev: torch.device, amp: bool, docs: bool) -> float:
    """Peak memory growth of one training step: in a fresh process on the CPU (ru_maxrss only ever
    grows), max_memory_allocated on CUDA."""
    if dev.type == "cuda":
        model, (x, y) = make_model(window, T, dev), batch(T, tokens, dev)
        mask = doc_mask(x) if docs else None
        train_step(model, x, y, amp, mask)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(model, x, y, amp, mask)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    out = subprocess.run([sys.executable, __file__, "--peak-of", f"{window},{T},{tokens},{int(docs)}",
                          "--threads", str(torch.get_num_threads())], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def peak_child(spec: str) -> None:
    window, T, tokens, docs = map(int, spec.split(","))
    dev = torch.device("cpu")
    model, (x, y) = make_model(window, T, dev), batch(T, tokens, dev)
    base = _rss_kib()
    train_step(model, x, y, False, doc_mask(x) if docs else None)
    print(round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, 1))


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def case_train(dev: torch.device, quick: bool, repeats: int, tokens: int) -> None:
    amp = dev.type == "cuda"
    for T in ((512,) if quick else (512, 1024, 2048)):
        x, y = batch(T, tokens, dev)
        models = {"dense": make_model(0, T, dev), **{f"window{w}": make_model(w, T, dev) for w in WINDOWS if w < T}}
        for docs in (False, True):  # plain causal rows, and rows of several documents (train.document_mask)
            mask = doc_mask(x) if docs else None
            t = interleaved({k: (lambda m=m: train_step(m, x, y, amp, mask)) for k, m in models.items()}, repeats, dev)
            for name, model in models.items():
                w = model.cfg.attention_window
                path = pick_path(T, T, w, dev) if w else "dense (masked SDPA)" if docs else "dense causal SDPA"
                emit({"case": "train", "model": name, "window": w, "document_mask": docs, "T": T,
                      "batch": x.size(0), "tokens": x.numel(), "step_s": round(t[name], 4),
                      "tokens_per_s": round(x.numel() / t[name], 1), "speedup_vs_dense": round(t["dense"] / t[name], 3),
                      "saved_mib": round(saved_bytes(model, x, y, amp, mask) / 2**20, 1),
                      "peak_mib": round(peak_mib(w, T, tokens, dev, amp, docs), 1),
                      "attention_path": path, "steps": repeats}, dev)


# ---- decode -------------------------------------------------------------------------------------


def case_decode(dev: torch.device, quick: bool, new_tokens: int) -> None:
    context = 1024 if quick else 4096
    prompt_len = context - new_tokens
    cases = {"dense": (0, ""), "window128": (128, ""), "window256": (256, ""), "window128-SSSL": (128, "SSSL")}
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, VOCAB, size=(1, prompt_len))
    engines = {}
    for name, (w, pattern) in cases.items():
        model = make_model(w, context, dev, pattern).eval()
        engines[name] = TorchEngine(model)

    def decode(eng):  # prefill (untimed), then new_tokens greedy steps
        logits = eng.prefill(prompt, np.ones_like(prompt), context)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            logits = eng.step(logits.argmax(-1))
        sync(dev)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(3):  # interleaved rounds; the fastest of each counts
        for name, eng in engines.items():
            times[name].append(decode(eng))
    dense_bytes = engines["dense"].cache.nbytes
    dense_s = min(times["dense"])
    for name, eng in engines.items():
        s = min(times[name])
        w = eng.model.cfg.attention_window
        rec = {"case": "decode", "model": name, "window": w, "pattern": eng.model.cfg.pattern, "context": context,
               "prompt_tokens": prompt_len, "new_tokens": new_tokens, "batch": 1,
               "tokens_per_s": round(new_tokens / s, 1), "speedup_vs_dense": round(dense_s / s, 3),
               "kv_cache_bytes": eng.cache.nbytes, "kv_bytes_over_dense": round(eng.cache.nbytes / dense_bytes, 4),
               "fast_step": eng.fast_step is not None}
        if w and "L" not in eng.model.cfg.pattern:
            rec["target_window_over_context"] = round(w / context, 4)
            rec["pass"] = eng.cache.nbytes <= dense_bytes * w / context
        emit(rec, dev)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="paths,train,decode", help="comma list of paths, train, decode")
    ap.add_argument("--quick", action="store_true", help="one small shape per case: checks that all runs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls / steps per variant")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per training step (B = tokens / T)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: one case's peak memory, in a fresh process
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.peak_of:
        peak_child(a.peak_of)
        return 0
    dev = torch.device(a.device)
    repeats = 1 if a.quick else a.repeats
    for case in a.cases.split(","):
        if case == "paths":
            case_paths(dev, a.quick, repeats)
        elif case == "train":
            case_train(dev, a.quick, repeats, 2048 if a.quick else a.tokens)
        elif case == "decode":
            case_decode(dev, a.quick, 16 if a.quick else a.new_tokens)
        else:
            ap.error(f"--cases: unknown case {case!r} (paths, train, decode)")
    emit({"case": "done", "load_avg_1m": round(os.getloadavg()[0], 2)}, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
