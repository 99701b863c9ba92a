"""Checks and speeds that need a CUDA GPU (CI has none): run on a GPU machine, one JSON line per case.

    python3 benchmarks/gpu_checks.py            # needs torch with CUDA; text2llm on PYTHONPATH or installed
    bash benchmarks/gpu.sh                       # this, then benchmarks/train.py --device cuda

Cases:
  parity      fp32 logits on the GPU == on the CPU (dense, GQA, MoE, learned positions)
  kv_cache    incremental decoding on the GPU == the full forward; packed weights == plain Linears
  cli_train   `text2llm train` on cuda (bf16 autocast, evaluation and checkpoints), then `--resume`
              to more steps: the user's path end to end, on random token shards
  decode      generation tokens/s with the KV cache, GPT-2-124M shape (random weights), fp32 and
              bf16 weights, batch 1 and 8, 256 new tokens after a 16-token prompt
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/tokenize.py would shadow the standard library's tokenize

import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def tiny_models():
    from text2llm.model.config import ModelConfig

    base = dict(vocab_size=211, d_model=64, n_layer=2, n_head=4, max_seq_len=128)
    return {
        "dense": ModelConfig(**base),
        "gqa": ModelConfig(**base, n_kv_head=2),
        "moe": ModelConfig(**base, n_experts=4, moe_top_k=2),
        "learned": ModelConfig(**base, positions="learned", norm="layernorm", activation="gelu", bias=True),
    }


def check_parity_and_cache(dev: torch.device) -> None:
    from text2llm.infer.packing import pack_weights
    from text2llm.model.transformer import KVCache, Transformer

    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 for the comparison
    torch.backends.cudnn.allow_tf32 = False
    for name, cfg in tiny_models().items():
        torch.manual_seed(0)
        cpu = Transformer(cfg).eval()
        gpu = Transformer(cfg).to(dev).eval()
        gpu.load_state_dict(cpu.state_dict())
        ids = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = cpu(ids).logits
            out = gpu(ids.to(dev)).logits.cpu()
            cache = KVCache(cfg, 3, device=dev)
            parts = [gpu(ids[:, :9].to(dev), cache=cache).logits]
            parts += [gpu(ids[:, t : t + 1].to(dev), cache=cache).logits for t in range(9, 40)]
            inc = torch.cat(parts, 1).cpu()
            pack_weights(gpu)
            cache.reset()
            fparts = [gpu(ids[:, :9].to(dev), cache=cache).logits]
            fparts += [gpu(ids[:, t : t + 1].to(dev), cache=cache).logits for t in range(9, 40)]
            fast = torch.cat(fparts, 1).cpu()
        d_cpu = (out - ref).abs().max().item()
        d_inc = (inc - out).abs().max().item()
        d_fast = (fast - out).abs().max().item()
        emit({"case": "parity", "model": name, "max_abs_gpu_vs_cpu": d_cpu, "pass": d_cpu <= 1e-4})
        emit({"case": "kv_cache", "model": name, "max_abs_incremental_vs_full": d_inc,
              "max_abs_fast_vs_plain": d_fast, "pass": d_inc <= 1e-4 and d_fast <= 1e-4})
    torch.backends.cuda.matmul.allow_tf32 = True


def make_tokens(root: Path, vocab: int, n_train: int, n_val: int) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    # a learnable stream: a repeated random "vocabulary" of 64-token phrases
    phrases = rng.integers(3, vocab, size=(200, 64))
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        stream = phrases[rng.integers(0, len(phrases), size=n // 64 + 1)].reshape(-1)[:n]
        stream.astype(np.uint16).tofile(root / f"{split}-00000.bin")
        splits[split] = {"shards": [f"{split}-00000.bin"], "tokens": n, "bytes": 4 * n, "documents": 1}
    meta = {"format": "text2llm-tokens/1", "mode": "packed", "dtype": "uint16", "vocab_size": vocab,
            "bos_id": 1, "eos_id": 2, "pad_id": 0, "tokenizer_fingerprint": "random", "tokenizer_dir": "",
            "splits": splits}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def run(cmd: list[str]) -> tuple[int, str, float]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode, (p.stdout + p.stderr)[-1500:], time.perf_counter() - t


def check_cli_train(tmp: Path) -> None:
    tokens = make_tokens(tmp / "tokens", 4096, 2_000_000, 50_000)
    run_dir = tmp / "run"
    common = ["model.d_model=384", "model.n_layer=6", "model.n_head=6", "model.vocab_size=4096",
              "model.max_seq_len=512", "train.seq_len=512", "train.batch_size=32", "train.device=cuda",
              "train.precision=bf16", "train.eval_every=50", "train.eval_batches=4", "train.checkpoint_every=50",
              "train.samples=0", "train.plot=false", "train.time_budget_s=0", "train.warmup_steps=10"]
    py = sys.executable
    code, out, dt = run([py, "-m", "text2llm", "train", "--data", str(tokens), "--out", str(run_dir), "-q",
                         "train.max_steps=100", *common])
    emit({"case": "cli_train", "steps": 100, "rc": code, "seconds": round(dt, 1), "tail": out[-400:]})
    code, out, dt = run([py, "-m", "text2llm", "train", "--resume", str(run_dir), "-q", "train.max_steps=150"])
    emit({"case": "cli_resume", "to_steps": 150, "rc": code, "seconds": round(dt, 1), "tail": out[-400:]})


def bench_decode(dev: torch.device) -> None:
    from text2llm.infer.decoding import SamplingParams, iter_tokens
    from text2llm.infer.generate import TorchEngine
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer

    cfg = ModelConfig(preset="gpt2-124m", vocab_size=50257, max_seq_len=1024)
    torch.manual_seed(0)
    base = Transformer(cfg).to(dev).eval()
    for dtype in (torch.float32, torch.bfloat16):
        model = base.to(dtype)
        for B in (1, 8):
            engine = TorchEngine(model)
            prompts = np.random.default_rng(0).integers(4, cfg.vocab_size, size=(B, 16))

            def go(n):
                p = SamplingParams(max_new_tokens=n, temperature=0)
                return list(iter_tokens(engine, [list(r) for r in prompts], p, eos_id=None, pad_id=0))

            go(16)
            torch.cuda.synchronize()
            t = time.perf_counter()
            go(256)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            emit({"case": "decode", "model": "gpt2-124m", "dtype": str(dtype).split(".")[-1], "batch": B,
                  "new_tokens": 256, "tok_s": round(B * 256 / dt, 1), "ms_per_step": round(dt / 256 * 1e3, 2)})


def main() -> int:
    if not torch.cuda.is_available():
        emit({"error": "no CUDA device"})
        return 2
    dev = torch.device("cuda", 0)
    emit({"case": "env", "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
          "cuda": torch.version.cuda})
    check_parity_and_cache(dev)
    bench_decode(dev)
    with tempfile.TemporaryDirectory() as tmp:
        check_cli_train(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
