"""Training throughput and MFU of the real training loop (text2llm.train.trainer.train).

Cases (one JSON line each):

    default   the model `text2llm run` trains by default (Config() defaults), batch 16 x 256, fp32
    10m       the dense-10m preset (~11M parameters, vocab 4096), batch 16 x 256, fp32
    gpt2      GPT-2-124M shape (vocab 50257, context 1024), bf16 autocast + torch.compile (--device cuda)

MFU = tokens/s x model.flops_per_token(seq_len) / peak. On CPU the peak is an fp32 matmul
(2048^3) measured at the same thread count and cached in .bench-cache/peak_flops.json; on a
known GPU it is the spec-sheet dense bf16 peak (text2llm.train.mfu.GPU_BF16_PEAK).
Data: random token ids in a temporary token dir (throughput does not depend on the text).
Tokens/s is the median of the per-interval rates after the first third of the steps (warm-up and
compilation excluded).

    flock /tmp/text2llm-bench.lock .venv/bin/python benchmarks/train.py                  # CPU: default, 10m
    .venv/bin/python benchmarks/train.py --device cuda                                  # GPU: gpt2 (bf16, compile)
    .venv/bin/python benchmarks/train.py --cases 10m --compile --steps 60               # CPU with torch.compile
"""

from __future__ import annotations

import os
import sys

# benchmarks/ is sys.path[0] when this file runs as a script; a benchmarks/tokenize.py there would
# shadow the standard library's tokenize module (torch's import then fails), so take it off the path
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CASES = {
    #          model overrides                       batch  seq  vocab
    "default": ({},                                    16,  256, 4096),
    "10m":     ({"preset": "dense-10m"},               16,  256, 4096),
    "gpt2":    ({"preset": "gpt2-124m"},               16, 1024, 50257),
}


def make_random_tokens(root: Path, vocab: int, n_train: int, n_val: int) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    dtype = np.uint16 if vocab <= 65535 else np.uint32
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        rng.integers(3, vocab, size=n, dtype=np.int64).astype(dtype).tofile(root / f"{split}-00000.bin")
        splits[split] = {"shards": [f"{split}-00000.bin"], "tokens": n, "bytes": 4 * n, "documents": 1}
    meta = {"format": "text2llm-tokens/1", "mode": "packed", "dtype": np.dtype(dtype).name, "vocab_size": vocab,
            "bos_id": 1, "eos_id": 2, "pad_id": 0, "tokenizer_fingerprint": "random", "tokenizer_dir": "",
            "splits": splits}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def run_case(name: str, args, peak: float, peak_src: str) -> dict:
    from text2llm.config import load_config
    from text2llm.train.trainer import train

    model_over, batch, seq, vocab = CASES[name]
    batch = args.batch or batch
    over = [f"model.{k}={v}" for k, v in model_over.items()]
    over += [f"model.vocab_size={vocab}", f"model.max_seq_len={max(seq, 256)}", f"train.seq_len={seq}",
             f"train.batch_size={batch}", f"train.max_steps={args.steps}", "train.warmup_steps=1",
             "train.eval_every=0", "train.eval_batches=1", "train.log_every=5", "train.samples=0",
             "train.tensorboard=false", "train.plot=false", f"train.peak_flops={peak}",
             f"train.device={args.device}", f"train.precision={args.precision}",
             f"train.compile={'true' if args.compile else 'false'}", "train.time_budget_s=0"]
    cfg = load_config(None, over)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = make_random_tokens(Path(tmp) / "tokens", vocab, batch * (seq + 1) * 64, (seq + 1) * 4)
        t0 = time.perf_counter()
        r = train(cfg, tokens, Path(tmp) / "run", progress=False)
        wall = time.perf_counter() - t0
    rates = [h["tokens_per_s"] for h in r.history if "tokens_per_s" in h]
    steady = statistics.median(rates[len(rates) // 3:]) if rates else r.train_tokens_per_s
    fpt = _fpt_meta(cfg, seq)
    return {"case": name, "device": args.device, "threads": torch.get_num_threads(), "params": r.params,
            "batch": batch, "seq_len": seq, "steps": args.steps, "precision": args.precision, "compile": args.compile,
            "tokens_per_s": round(steady, 1), "flops_per_token": fpt,
            "achieved_gflops": round(steady * fpt / 1e9, 2), "peak_gflops": round(peak / 1e9, 1),
            "peak_source": peak_src, "mfu": round(steady * fpt / peak, 4), "wall_s": round(wall, 1),
            "final_loss": next((round(h["loss"], 4) for h in reversed(r.history) if "loss" in h), None)}


def _fpt_meta(cfg, seq: int) -> float:
    from text2llm.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(cfg.model).flops_per_token(seq)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cases", default=None, help="comma-separated: default,10m,gpt2 (default: default,10m on cpu; gpt2 on cuda)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per case (default 30 cpu, 200 cuda)")
    p.add_argument("--batch", type=int, default=None, help="override the micro-batch size")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile (default: on for cuda)")
    p.add_argument("--precision", default=None, help="fp32 / bf16 (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--peak-cache", default=".bench-cache/peak_flops.json",
                   help="CPU: where the measured peak is cached (re-measured each run unless --cached-peak)")
    p.add_argument("--cached-peak", action="store_true", help="CPU: reuse the cached peak instead of re-measuring")
    args = p.parse_args()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        print(json.dumps({"error": "--device cuda but no CUDA device"}))
        return 2
    args.cases = (args.cases or ("gpt2" if gpu else "default,10m")).split(",")
    args.steps = args.steps or (200 if gpu else 30)
    args.compile = gpu if args.compile is None else args.compile
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from text2llm.train.mfu import device_peak_flops

    dev = torch.device("cuda", 0) if gpu else torch.device("cpu")
    cache = Path(args.peak_cache)
    if not gpu and not args.cached_peak:
        cache.unlink(missing_ok=True)  # other load on the machine changes the peak: measure it now
    peak, src = device_peak_flops(dev, 0.0, cache)
    if peak is None:
        print(json.dumps({"error": f"no peak known: {src}"}))
        return 2
    for name in args.cases:
        print(json.dumps(run_case(name, args, peak, src)), flush=True)
    if not gpu:  # a second measurement shows whether the machine's load changed during the run
        from text2llm.train.mfu import measure_matmul_flops

        print(json.dumps({"case": "cpu_peak_check", "peak_gflops_start": round(peak / 1e9, 1),
                          "peak_gflops_end": round(measure_matmul_flops() / 1e9, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
