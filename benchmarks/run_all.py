"""Run the CPU benchmarks one after another (what `make bench` runs). One JSON object per line.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only clean,tokenize,...] [--ckpt RUN/train]

Each benchmark runs in its own process, under the benchmark lock (``/tmp/text2llm-bench.lock``,
so two benchmark runs on one machine never overlap), with its lines passed through as they come;
then a line ``{"case": "run_all", "benchmark": ..., "seconds": ..., "returncode": ...}``. The exit
status is non-zero when any benchmark failed.

Default (full) runs take long on a 2-core CPU: compress trains its own models (~1 h without
``--ckpt``), tokenize trains 12 tokenizers. ``--quick`` runs each one's short form: the data and
tokenizer benchmarks on 1 MB slices, the model/train/generate ones with few steps or tokens, and
compress on the demo shape only (int8 quantization, 50 training steps): minutes in all, for
checking that everything runs, not for figures. ``benchmarks/gpu.sh`` is the GPU counterpart.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCK = Path("/tmp/text2llm-bench.lock")


def plan(quick: bool, ckpt: str | None) -> dict[str, list[str]]:
    """Benchmark name -> its arguments (in run order)."""
    gen = ["--ckpt", ckpt] if ckpt else []
    comp = ["--ckpt", ckpt] if ckpt else []
    if not quick:
        return {"scaling": [], "clean": [], "tokenize": [], "model": [], "train": [], "parallel": [], "attention": [],
                "generate": gen,
                "compress": comp, "loss_compare": ["--work", str(Path("runs") / "bench-loss-compare")],
                "quality": ["--cases", "baseline,new", "--seeds", "1337,1338", "--work", str(Path("runs") / "bench-quality")]}
    return {
        "scaling": ["--repeats", "2"],
        "clean": ["--quick", "--repeats", "1"],
        "tokenize": ["--quick", "--types", "bpe,bytelevel", "--min-seconds", "0"],
        "model": ["--steps", "2"],
        "train": ["--steps", "5"],
        "parallel": ["--steps", "3", "--cases", "one,tp2,pp2-1f1b"],
        "attention": ["--quick"],
        "generate": [*gen, "--models", "ckpt" if ckpt else "default", "--new-tokens", "16", "--prefill-tokens", "64",
                     "--batches", "1", "--skip-nocache", "--no-hf"],
        "compress": [*comp, "--models", "demo", "--cases", "quantize", "--demo-steps", "50", "--batch-size", "8",
                     "--work", str(Path("runs") / "bench-compress-quick")],
        "loss_compare": ["--steps", "5", "--work", str(Path("runs") / "bench-loss-compare")],
        "quality": ["--cases", "baseline,new", "--budget-s", "10", "--work", str(Path("runs") / "bench-quality-quick")],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="each benchmark's short form (checks that all run)")
    ap.add_argument("--only", help="comma list of benchmarks to run (default: all)")
    ap.add_argument("--ckpt", help="a run's train dir (e.g. runs/demo/train): generate and compress use it")
    a = ap.parse_args(argv)
    todo = plan(a.quick, a.ckpt)
    if a.only:
        unknown = set(a.only.split(",")) - set(todo)
        if unknown:
            ap.error(f"--only: unknown benchmark(s) {', '.join(sorted(unknown))}; known: {', '.join(todo)}")
        todo = {k: v for k, v in todo.items() if k in a.only.split(",")}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    failed = 0
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, args in todo.items():
            t0 = time.perf_counter()
            rc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args], env=env).returncode
            failed += rc != 0
            print(json.dumps({"case": "run_all", "benchmark": name, "args": args,
                              "seconds": round(time.perf_counter() - t0, 1), "returncode": rc}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
