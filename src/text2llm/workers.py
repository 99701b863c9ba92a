"""Worker pools shared by the stages that fan work out to processes (``clean``, ``pack``)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import deque
from multiprocessing.pool import Pool
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


class QuietPool(Pool):
    """``multiprocessing.Pool`` whose worker-maintenance thread wakes only when a worker exits or
    the pool changes state. CPython's also wakes it whenever a result is waiting in the pipe, and it
    then spins (a new selector per turn) until the result thread has read it, CPU time taken from
    the workers on a machine with few cores."""

    def _get_sentinels(self):
        return [self._change_notifier._reader]


def bounded_imap(pool: Pool, fn: Callable, items: Iterable, max_in_flight: int) -> Iterator:
    """``pool.imap(fn, items)``: results in submission order (so the output does not depend on the
    worker count), but at most ``max_in_flight`` items are read ahead (``Pool.imap`` would queue the
    whole input in memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        while len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def batched(items: Iterable[T], max_items: int, max_size: int, size: Callable[[T], int]) -> Iterator[list[T]]:
    """Consecutive work units of at most ``max_items`` items, cut once their ``size`` reaches
    ``max_size``. The cut depends only on the input, never on the number of workers."""
    batch: list = []
    total = 0
    for item in items:
        batch.append(item)
        total += size(item)
        if len(batch) >= max_items or total >= max_size:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


# ---- how far 2 processes can scale on this machine ---------------------------------------------


def _python_loop(scale: float) -> int:
    s = 0
    for i in range(int(4_000_000 * scale)):
        s += i * i % 7
    return s


def _numpy_stream(scale: float) -> float:
    import numpy as np

    a = np.ones(8_000_000)  # 64 MB, far larger than the caches
    return float(sum(a.sum() for _ in range(max(1, int(30 * scale)))))


SCALING_WORK = {"python_loop": _python_loop, "numpy_stream": _numpy_stream}


def process_scaling(repeats: int = 3, scale: float = 1.0) -> list[dict]:
    """What 2 processes reach on this machine for perfectly independent work, per kind of work
    (:data:`SCALING_WORK`: interpreter arithmetic, and a numpy stream over memory):
    ``speedup_2_procs`` = 2 x (one alone) / (two at once), from the best of ``repeats``
    interleaved rounds. 2.0 means two independent cores; two vCPUs that share a physical core, or
    a busy host, give less, and no pipeline of worker processes (``clean``, ``pack``) can scale
    better on that machine. ``benchmarks/scaling.py`` prints it; the clean and pack benchmarks
    print it beside their 2-worker ratios. (Linux/macOS: the two processes are forked.)"""
    out = []
    for name, fn in SCALING_WORK.items():
        fn(scale)  # warm-up: imports, first page faults
        one, two = alone_and_two_at_once(lambda: fn(scale), repeats)
        out.append({"case": "machine_scaling", "work": name, "one_process_s": round(one, 3),
                    "two_processes_s": round(two, 3), "speedup_2_procs": round(2 * one / two, 2),
                    "repeats": repeats, "cpus": os.cpu_count(), "load_avg": round(os.getloadavg()[0], 2)})
    return out


def alone_and_two_at_once(work: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best seconds of ``work()`` run in this process, and of two forked processes running it at
    once (interleaved rounds). Raises if a forked run fails. Linux/macOS (fork)."""
    ctx = mp.get_context("fork")
    one = two = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        work()
        one = min(one, time.perf_counter() - t)
        procs = [ctx.Process(target=work) for _ in range(2)]
        t = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        two = min(two, time.perf_counter() - t)
        if any(p.exitcode for p in procs):
            raise RuntimeError("a forked run failed")
    return one, two
