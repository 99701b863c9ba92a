"""What 2 processes give on this machine for perfectly independent work: the ceiling against which
the "2 workers >= 1.7x one" targets of `clean` (issue 3) and `pack` (issue 4) are to be read.

    flock /tmp/text2llm-bench.lock .venv/bin/python benchmarks/scaling.py [--repeats 5]

Cases (one JSON line each): ``python_loop`` (integer arithmetic in the interpreter: no memory
traffic, nothing shared) and ``numpy_stream`` (sums over a 64 MB array: memory bandwidth). Each
runs alone in one process, then as two processes at once; ``speedup_2_procs`` = 2 x (one alone) /
(two at once), from the best of ``--repeats`` interleaved rounds. 2.0 means two independent cores;
a VM whose two vCPUs share a physical core, or a busy host, gives less, and no pipeline of
separate worker processes can scale better than this on the same machine.

``benchmarks/clean.py`` and ``benchmarks/tokenize.py`` print the same case (``machine_scaling``)
before their own, so that every results file carries the ceiling of the session it was measured in.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time


def _python_loop(n: int = 4_000_000) -> int:
    s = 0
    for i in range(n):
        s += i * i % 7
    return s


def _numpy_stream(n: int = 30) -> float:
    import numpy as np

    a = np.ones(8_000_000)  # 64 MB, far larger than the caches
    return float(sum(a.sum() for _ in range(n)))


CASES = {"python_loop": _python_loop, "numpy_stream": _numpy_stream}


def _two_at_once(fn) -> float:
    ctx = mp.get_context("fork")  # (the targets need not be importable: run_path callers)
    procs = [ctx.Process(target=fn) for _ in range(2)]
    t = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return time.perf_counter() - t


def machine_scaling(repeats: int = 3) -> list[dict]:
    """One record per case: best 1-process and 2-process seconds over ``repeats`` interleaved rounds."""
    out = []
    for name, fn in CASES.items():
        one = two = float("inf")
        fn()  # warm-up: imports, first page faults
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            one = min(one, time.perf_counter() - t)
            two = min(two, _two_at_once(fn))
        out.append({"case": "machine_scaling", "work": name, "one_process_s": round(one, 3),
                    "two_processes_s": round(two, 3), "speedup_2_procs": round(2 * one / two, 2),
                    "repeats": repeats, "cpus": os.cpu_count(), "load_avg": round(os.getloadavg()[0], 2)})
    return out


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    for rec in machine_scaling(ap.parse_args().repeats):
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
