"""Memory per process and step time of each parallel layout, against one process (CPU, gloo).

For a ~10M-parameter model (d_model 384, 4 layers, 6 heads, MLP 1024, vocab 4096, untied head so
that a pipeline can cut it), each case trains a few steps through the real trainer under torchrun
(one thread per process) and measures, on every process, the bytes it holds of

    params      the parameters' local tensors (a DTensor's shard, a pipeline stage's part)
    grads       their gradients, read just before an optimizer step
    optimizer   the AdamW state tensors (exp_avg, exp_avg_sq, step)

The line reports the largest process's sum and its ratio to one process. DDP's gradient buckets,
activations and the PyTorch runtime are not in these sums; ``rss_mib`` (peak resident memory of
the largest process) shows everything. Step time is the median interval between optimizer steps
after the first half of the steps. Pipeline cases add the bubble: in theory (p - 1) / (m + p - 1)
for GPipe and 1F1B, (p - 1) / (v m + p - 1) for interleaved 1F1B with v stages per process, and as
measured, 1 - T(one process) / (p x T(pipeline)) (this includes the stages' communication).
Every case takes the same global batch: 4 micro-batches of 4 x 256 tokens per step.

``--consolidate 8,24`` measures instead what rank 0 pays to write ``model.safetensors`` from a
sharded (DCP) checkpoint (``text2llm.train.checkpoint.consolidate``, one tensor at a time), against
loading the whole state dict and writing it with ``save_weights`` (what a gathered save holds):
the growth of peak resident memory and the seconds, for models of d_model 1024, vocab 32000
(the largest tensor, the embedding, is 125 MiB) and the given layer counts. The DCP dir is
written by one process, so each tensor is one chunk (the worst case for the consolidation).

    flock /tmp/text2llm-bench.lock .venv/bin/python benchmarks/parallel.py [--steps 8] [--cases one,tp2,...]
    flock /tmp/text2llm-bench.lock .venv/bin/python benchmarks/parallel.py --consolidate 8,24

``--setup 12`` measures what building the model costs each process (meta-device init,
``text2llm.train.materialize``): the growth of peak resident memory across the trainer's setup, for
a model of d_model 1024, vocab 32000 and the given layer count, under one process, FSDP2=2, tp=2
and pp=2, once as the trainer does it (``meta``: built on the meta device, split, then each process
fills its part) and once as before it (``eager``: every process builds the whole model, then
splits it; emulated by swapping the trainer's two builder functions).

    flock /tmp/text2llm-bench.lock .venv/bin/python benchmarks/parallel.py --setup 12
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # (see benchmarks/train.py: benchmarks/tokenize.py would shadow the stdlib module)

import argparse
import filecmp
import json
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

MODEL = {"d_model": 384, "n_layer": 4, "n_head": 6, "ffn_hidden": 1024, "max_seq_len": 256, "vocab_size": 4096,
         "tie_embeddings": "false"}
BATCH, SEQ, MICRO = 4, 256, 4  # micro-batch rows, tokens per row, micro-batches per step (over all replicas)

CASES = {  # name: (processes, train overrides)
    "one": (1, {}),
    "ddp2": (2, {"distributed": "ddp"}),
    "fsdp2": (2, {"distributed": "fsdp"}),
    "tp2": (2, {"tp": 2}),
    "pp2-gpipe": (2, {"pp": 2, "pp_schedule": "gpipe"}),
    "pp2-1f1b": (2, {"pp": 2, "pp_schedule": "1f1b"}),
    "pp2-interleaved": (2, {"pp": 2, "pp_schedule": "interleaved-1f1b"}),
}


def local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def worker(case: str, tokens: Path, run_dir: Path, steps: int) -> None:
    """One process of a case: train ``steps`` steps, measure, rank 0 prints the line."""
    from text2llm.config import load_config
    from text2llm.pack import read_meta
    from text2llm.train import distributed as D
    from text2llm.train.trainer import Trainer

    nproc, train_over = CASES[case]
    dp = nproc // (train_over.get("tp", 1) * train_over.get("pp", 1))
    over = [f"model.{k}={v}" for k, v in MODEL.items()]
    over += [f"train.{k}={json.dumps(v)}" for k, v in train_over.items()]
    over += [f"train.batch_size={BATCH}", f"train.seq_len={SEQ}", f"train.grad_accum={MICRO // dp}",
             f"train.max_steps={steps}", "train.warmup_steps=1", "train.eval_every=0", "train.log_every=1",
             "train.samples=0", "train.tensorboard=false", "train.plot=false", "train.peak_flops=1e11",
             "train.time_budget_s=0", "train.threads=1"]
    cfg = load_config(None, over)
    env = D.init_distributed(cfg.train)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, read_meta(tokens), tokens, run_dir, env, progress=False)
    seen: dict = {"t": []}

    def before_step(optimizer, args, kwargs):
        seen["t"].append(time.perf_counter())
        if len(seen["t"]) == 2:  # the optimizer state exists from the first step on
            params = list(trainer.model.parameters())
            seen["params"] = sum(local_bytes(p) for p in params)
            seen["grads"] = sum(local_bytes(p.grad) for p in params if p.grad is not None)
            seen["optimizer"] = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values()
                                    if torch.is_tensor(v))

    trainer.optimizer.register_step_pre_hook(before_step)
    trainer.run()
    seen["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = seen.pop("t")
    gaps = [b - a for a, b in zip(t, t[1:])]
    seen["step_s"] = statistics.median(gaps[len(gaps) // 2:])
    everyone = D.all_gather_objects(seen, env)
    if env.is_main:
        top = max(everyone, key=lambda r: r["params"] + r["grads"] + r["optimizer"])
        line = {"case": case, "processes": nproc, "tp": env.tp, "pp": env.pp, "dp": env.dp,
                "distributed": env.mode, "params_bytes": top["params"], "grads_bytes": top["grads"],
                "optimizer_bytes": top["optimizer"], "state_bytes": top["params"] + top["grads"] + top["optimizer"],
                "per_process_state_bytes": [r["params"] + r["grads"] + r["optimizer"] for r in everyone],
                "rss_mib": round(max(r["rss_mib"] for r in everyone), 1),
                "step_s": round(max(r["step_s"] for r in everyone), 4), "params": trainer.params}
        print("RESULT " + json.dumps(line), flush=True)
    D.shutdown(env, barrier=True)


SETUP_MODEL = {"d_model": 1024, "n_head": 16, "ffn_hidden": 2816, "max_seq_len": 256, "vocab_size": 32000,
               "tie_embeddings": "false"}


def setup_worker(case: str, how: str, n_layer: int, tokens: Path, run_dir: Path) -> None:
    """One process: the trainer's setup of the big model ``how`` = meta | eager; prints its peak-RSS growth."""
    from text2llm.config import load_config
    from text2llm.model.transformer import Transformer
    from text2llm.pack import read_meta
    from text2llm.train import distributed as D
    from text2llm.train import trainer as T

    nproc, train_over = CASES[case]
    over = [f"model.{k}={v}" for k, v in {**SETUP_MODEL, "n_layer": n_layer}.items()]
    over += [f"train.{k}={json.dumps(v)}" for k, v in train_over.items()]
    over += ["train.batch_size=1", "train.seq_len=256", f"train.grad_accum={MICRO}", "train.max_steps=1",
             "train.eval_every=0", "train.samples=0", "train.tensorboard=false", "train.plot=false",
             "train.time_budget_s=0", "train.threads=1"]
    cfg = load_config(None, over)
    env = D.init_distributed(cfg.train)
    if how == "eager":  # before meta-device init: every process builds the whole model, then splits it
        def eager_model(model_cfg):
            torch.manual_seed(cfg.train.seed)
            return Transformer(model_cfg)

        T.meta_model, T.materialize = eager_model, (lambda *args, **kw: None)
    import torch.distributed.fsdp  # noqa: F401  (imported before the baseline: their code is not the model's memory)
    import torch.distributed.pipelining  # noqa: F401
    import torch.distributed.tensor.parallel  # noqa: F401

    run_dir.mkdir(parents=True, exist_ok=True)
    before, t0 = peak_rss_mib(), time.perf_counter()
    trainer = T.Trainer(cfg, read_meta(tokens), tokens, run_dir, env, progress=False)
    mine = {"grew_mib": peak_rss_mib() - before, "s": time.perf_counter() - t0,
            "held_mib": sum(local_bytes(p) for p in trainer.model.parameters()) / 2**20}
    everyone = D.all_gather_objects(mine, env)
    if env.is_main:
        print("RESULT " + json.dumps({"params": trainer.params, "model_mib": round(trainer.params * 4 / 2**20, 1),
                                      "peak_growth_mib": round(max(r["grew_mib"] for r in everyone), 1),
                                      "held_mib": round(max(r["held_mib"] for r in everyone), 1),
                                      "setup_s": round(max(r["s"] for r in everyone), 2)}), flush=True)
    D.shutdown(env, barrier=True)


def setup_case(case: str, n_layer: int, tokens: Path, root: Path) -> dict:
    nproc = CASES[case][0]
    line = {"case": f"setup-{case}", "n_layer": n_layer, "processes": nproc}
    for how in ("meta", "eager"):
        args = [os.path.abspath(__file__), "--setup-worker", f"{case}:{how}", "--setup", str(n_layer),
                "--tokens", str(tokens), "--out", str(root / f"{case}-{how}")]
        cmd = [sys.executable, *args] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
        p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        found = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if not found:
            return {**line, "error": (p.stdout + p.stderr)[-1500:]}
        r = json.loads(found[0][7:])
        line.update(params=r["params"], model_mib=r["model_mib"],
                    **{f"{how}_{k}": v for k, v in r.items() if k not in ("params", "model_mib")})
    line["meta_vs_eager_peak"] = round(line["meta_peak_growth_mib"] / line["eager_peak_growth_mib"], 3)
    return line


def run_case(case: str, tokens: Path, root: Path, steps: int) -> dict:
    nproc = CASES[case][0]
    here = os.path.abspath(__file__)
    args = [here, "--worker", case, "--tokens", str(tokens), "--out", str(root / case), "--steps", str(steps)]
    cmd = [sys.executable, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"case": case, "error": (p.stdout + p.stderr)[-1500:]}


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would include the parent's, across fork and exec)."""
    try:
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def consolidate_worker(how: str, n_layer: int, root: Path) -> None:
    """One process: ``make`` a DCP dir of the model, or write model.safetensors from it ``how`` =
    streamed | whole, printing the peak-RSS growth."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from text2llm.checkpoint import save_weights
    from text2llm.model.config import ModelConfig
    from text2llm.model.transformer import Transformer
    from text2llm.train.checkpoint import consolidate

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    if how == "make":
        cfg = ModelConfig(vocab_size=32000, d_model=1024, n_layer=n_layer, n_head=16, ffn_hidden=2816,
                          max_seq_len=256, tie_embeddings=False)
        sd = Transformer(cfg).state_dict()
        dcp.save({"model": sd}, checkpoint_id=root / "dcp", no_dist=True)
        print("RESULT " + json.dumps({"params": sum(v.numel() for v in sd.values()),
                                      "model_mib": round(sum(v.nbytes for v in sd.values()) / 2**20, 1),
                                      "largest_tensor_mib": round(max(v.nbytes for v in sd.values()) / 2**20, 1)}))
        return
    before, t0 = peak_rss_mib(), time.perf_counter()
    if how == "streamed":
        consolidate(root / "dcp", root / f"{how}.safetensors", {"step": 1}, tie_embeddings=False)
    else:
        entries = dcp.FileSystemReader(str(root / "dcp")).read_metadata().state_dict_metadata
        sd = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()
              if isinstance(m, TensorStorageMetadata)}
        dcp.load({"model": sd}, checkpoint_id=root / "dcp", no_dist=True)
        save_weights(sd, root / f"{how}.safetensors", {"step": 1}, tie_embeddings=False)
    grew = peak_rss_mib() - before
    print("RESULT " + json.dumps({f"{how}_peak_growth_mib": round(grew, 1), f"{how}_s": round(time.perf_counter() - t0, 2)}))


def consolidate_case(n_layer: int, root: Path) -> dict:
    line = {"case": f"consolidate-{n_layer}-layers"}
    for how in ("make", "streamed", "whole"):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--consolidate-worker", how,
                            "--consolidate", str(n_layer), "--out", str(root)],
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        found = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if not found:
            return {**line, "error": (p.stdout + p.stderr)[-1500:]}
        line.update(json.loads(found[0][7:]))
    line["identical_files"] = filecmp.cmp(root / "streamed.safetensors", root / "whole.safetensors", shallow=False)
    return line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokens", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--consolidate", default=None, metavar="LAYERS",
                   help="comma list of layer counts: the memory of writing model.safetensors from DCP shards")
    p.add_argument("--consolidate-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--setup", default=None, metavar="LAYERS",
                   help="the peak memory of building a d_model-1024 model of LAYERS layers, meta-device vs eager")
    p.add_argument("--setup-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.setup_worker:
        case, how = a.setup_worker.split(":")
        setup_worker(case, how, int(a.setup), Path(a.tokens), Path(a.out))
        sys.stdout.flush()
        os._exit(0)
    if a.worker:
        worker(a.worker, Path(a.tokens), Path(a.out), a.steps)
        sys.stdout.flush()
        os._exit(0)  # (the CLI's reason: text2llm.train.distributed.joined_process_group)
    if a.consolidate_worker:
        consolidate_worker(a.consolidate_worker, int(a.consolidate), Path(a.out))
        return 0
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("train.py"))
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)  # benchmarks/train.py: make_random_tokens

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if a.consolidate:
        for n_layer in map(int, a.consolidate.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                r = consolidate_case(n_layer, Path(tmp))
            print(json.dumps({**r, "cpu": cpu, "torch": torch.__version__}), flush=True)
        return 0
    if a.setup:
        with tempfile.TemporaryDirectory() as tmp:
            tokens = bench_train.make_random_tokens(Path(tmp) / "tokens", SETUP_MODEL["vocab_size"], 64 * 257, 4 * 257)
            for case in ("one", "fsdp2", "tp2", "pp2-gpipe"):
                r = setup_case(case, int(a.setup), tokens, Path(tmp))
                print(json.dumps({**r, "cpu": cpu, "torch": torch.__version__}), flush=True)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tokens = bench_train.make_random_tokens(Path(tmp) / "tokens", MODEL["vocab_size"], 64 * BATCH * MICRO * (SEQ + 1),
                                    4 * (SEQ + 1))
        results = {}
        for case in a.cases.split(","):
            r = results[case] = run_case(case, tokens, Path(tmp), a.steps)
            base = results.get("one")
            if base and "error" not in r and "error" not in base:
                r["state_vs_one"] = round(r["state_bytes"] / base["state_bytes"], 3)
                r["step_vs_one"] = round(r["step_s"] / base["step_s"], 3)
                if r["pp"] > 1:
                    v = 2 if "interleaved" in case else 1
                    r["bubble_theory"] = round((r["pp"] - 1) / (v * MICRO + r["pp"] - 1), 3)
                    r["bubble_measured"] = round(1 - base["step_s"] / (r["pp"] * r["step_s"]), 3)
            r.update(cpu=cpu, torch=torch.__version__, steps=a.steps)
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
