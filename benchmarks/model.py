"""Training-step throughput of the model on this machine: dense vs Mixture-of-Experts.

    flock /tmp/text2llm-bench.lock .venv/bin/python benchmarks/model.py [--steps 8 --batch 8 --seq 256 --threads 2]

Cases (presets from text2llm/model/config.py, vocab 4096):
  dense      ``dense-10m``: d_model 384, 6 layers, SwiGLU 1024                      (~11.2M params)
  moe        ``moe-8x2-10m``: the same with 8 experts of width 512, top-2 in every layer
             (same active parameters as dense, ~8x the MLP parameters)
  moe-cap    moe with capacity_factor 1.25 (drops overflow tokens)

One step = forward + cross-entropy (+ MoE aux loss) + backward, fp32. Steps of the cases are
interleaved (dense, moe, moe-cap, dense, ...) so background load hits all cases alike; each case
reports its median step time. GFLOP/s uses ``Transformer.flops_per_token`` (6 x active matmul
params + attention), the number an MFU figure would use. Prints one JSON object per case, then a
summary line with the MoE/dense step-time ratio (target <= 1.5). ``cpu_s`` is the process CPU time
per step: steadier than wall time when other work shares the cores (then OpenMP threads wait for
each other at every parallel region, which hurts the MoE's many smaller matmuls more).
"""

from __future__ import annotations

import sys
from pathlib import Path

# this dir holds scripts named like stdlib modules (tokenize.py): keep them from shadowing the stdlib
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from text2llm.model import ModelConfig, Transformer  # noqa: E402

VOCAB = 4096
CASES = {
    "dense": dict(preset="dense-10m"),
    "moe": dict(preset="moe-8x2-10m"),
    "moe-cap1.25": dict(preset="moe-8x2-10m", capacity_factor=1.25),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per case (after 2 warm-up steps)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (a.batch, a.seq + 1), generator=gen)
    inp, tgt = x[:, :-1], x[:, 1:]
    models = {}
    for name, kw in CASES.items():
        torch.manual_seed(0)
        models[name] = Transformer(ModelConfig(vocab_size=VOCAB, max_seq_len=a.seq, **kw)).train()

    def step(model) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(inp)
        loss = F.cross_entropy(out.logits.view(-1, VOCAB), tgt.reshape(-1))
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0

    times: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    for i in range(a.steps + 2):
        for name, model in models.items():
            dt, dc = step(model)
            if i >= 2:
                times[name].append(dt)
                cpu[name].append(dc)

    tokens = a.batch * a.seq
    results = {}
    for name, model in models.items():
        med = statistics.median(times[name])
        fpt = model.flops_per_token(a.seq)
        rec = {"case": name, "params": model.num_params(), "active_params": model.num_params(active_only=True),
               "batch": a.batch, "seq_len": a.seq, "threads": a.threads, "steps": a.steps,
               "step_s": round(med, 4), "step_s_min": round(min(times[name]), 4),
               "cpu_s": round(statistics.median(cpu[name]), 4),
               "tokens_per_s": round(tokens / med, 1), "gflop_per_token_fwd_bwd": round(fpt / 1e9, 4),
               "gflops": round(fpt * tokens / med / 1e9, 2)}
        results[name] = rec
        print(json.dumps(rec), flush=True)
    ratio = results["moe"]["step_s"] / results["dense"]["step_s"]
    ratio_cap = results["moe-cap1.25"]["step_s"] / results["dense"]["step_s"]
    ratio_cpu = results["moe"]["cpu_s"] / results["dense"]["cpu_s"]
    print(json.dumps({"summary": "moe_vs_dense_step_time", "threads": a.threads, "moe_over_dense": round(ratio, 3),
                      "moe_cap_over_dense": round(ratio_cap, 3), "moe_over_dense_cpu_time": round(ratio_cpu, 3),
                      "target": 1.5, "pass": ratio <= 1.5,
                      "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
