"""Model quality per wall-clock second: each case trains for the same budget and is scored on val bits-per-byte.

Every case is the default run (``configs/tiny-cpu.toml`` = the built-in defaults, or a case's own
``config``) with a few config overrides, trained for ``--budget-s`` seconds of training
(``train.time_budget_s``, default: the default run's 330 s) on a corpus, then its final weights
are scored on the *whole* val split (``evaluate.evaluate_tokens``, not the few batches the run
logs). One JSON line per case and seed, then one summary line per run::

    flock /tmp/text2llm-bench.lock .venv/bin/python benchmarks/quality.py --cases en --seeds 1337,1338
    flock /tmp/text2llm-bench.lock .venv/bin/python benchmarks/quality.py --cases baseline,new --budget-s 120

``--cases`` takes case names and group names (a group selects all its cases). Cases of one group
share a corpus; its data stages (clean, tokenizer, pack) run once under ``--work`` and are reused.
A case's ``budget_frac`` scales the budget (e.g. 0.6: does the new default reach the baseline's
final bpb in 0.6x of the time?). A case's ``corpus`` is ``"bundled"`` (the TinyStories sample in
the package) or a path to text files / a directory, and ``config`` a TOML file the overrides apply
to (None = the built-in defaults): a new language is a new group with its corpus and config.

Two ways to spend the budget (``--mode``):

* ``budget``: exactly what the default run does: ``train.time_budget_s`` times the first steps and
  fixes ``max_steps`` from them. On a machine that other work loads, a case whose probe steps hit a
  busy moment trains far fewer steps, so its val bpb says more about the load than the case.
* ``probe`` (default): first measure the case's step time in ``--probe-repeats`` short timing runs
  (``--probe-steps`` steps each, no evals; the fastest run is the least-loaded one), then train
  exactly the steps that the budget rule (``trainer._steps_within_budget``, evals included) allows
  at that speed, with ``time_budget_s = 0``. The val bpb is then what the case reaches in the
  budget on the unloaded machine, whatever the load during training; ``wall_s`` still records the
  wall time it really took.

The summary line compares every case with the group's ``baseline`` case (same seeds): mean val
bpb, its change in percent, and the spread over seeds. Each line records ``os.getloadavg()`` at
the start and end of the case and the CPU (``train.mfu.cpu_name``): figures measured while other
work loaded the machine are not comparable.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/tokenize.py would shadow the standard library's tokenize: keep this dir off sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

# The default run's training budget (train.time_budget_s of configs/tiny-cpu.toml); --budget-s overrides it.
DEFAULT_BUDGET_S = 330.0

# name -> case. group: what --cases selects by group name; corpus: "bundled" or a path; config: a TOML
# file or None (built-in defaults); overrides: config overrides (key=value, as on the command line);
# budget_frac: share of --budget-s this case trains for.
EN = dict(group="en", corpus="bundled", config=None)
CASES: dict[str, dict] = {
    "baseline": {**EN, "overrides": [], "note": "today's default run"},
    # each change alone
    "muon": {**EN, "overrides": ["train.optimizer=muon"], "note": "Muon on hidden matrices, AdamW on the rest"},
    "muon-lr05": {**EN, "overrides": ["train.optimizer=muon", "train.muon_lr=0.05"], "note": "Muon, muon_lr 0.05"},
    "qk_norm": {**EN, "overrides": ["model.qk_norm=true"], "note": "RMSNorm on q and k per head"},
    "relu2": {**EN, "overrides": ["model.activation=relu2"], "note": "ungated ReLU^2 MLP (4d hidden)"},
    "untied": {**EN, "overrides": ["model.tie_embeddings=false"], "note": "separate output head"},
    "softcap": {**EN, "overrides": ["model.logit_softcap=15"], "note": "logits soft-capped at 15"},
    "zero_init": {**EN, "overrides": ["model.zero_init_output=true"], "note": "zero-init o_proj / down_proj"},
    "bos": {**EN, "overrides": ["train.loader=bos"], "note": "BOS-aligned best-fit rows"},
    # the combination of the changes that won alone (90 s ablation, benchmarks/results/quality-2026-12-04-ablation.jsonl)
    "new": {**EN, "overrides": ["train.optimizer=muon", "model.activation=relu2", "model.tie_embeddings=false"],
            "note": "muon + relu2 + untied head"},
    "new-0.6x": {**EN, "overrides": ["train.optimizer=muon", "model.activation=relu2", "model.tie_embeddings=false"],
                 "budget_frac": 0.6, "note": "the combination in 0.6x of the budget"},
}


def case(name: str) -> dict:
    c = CASES[name]
    return {"overrides": [], "budget_frac": 1.0, "note": "", **c}


def select(spec: str) -> list[str]:
    """Case names from a comma list of case and group names, in registry order, each once."""
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    groups = {c["group"] for c in CASES.values()}
    unknown = [w for w in wanted if w not in CASES and w not in groups]
    if unknown:
        raise SystemExit(f"quality.py: unknown case or group {', '.join(unknown)} "
                         f"(cases: {', '.join(CASES)}; groups: {', '.join(sorted(groups))})")
    return [n for n in CASES if n in wanted or CASES[n]["group"] in wanted]


def corpus_paths(corpus: str) -> list[Path]:
    from text2llm.run import bundled_corpus

    if corpus == "bundled":
        return bundled_corpus()
    return [Path(corpus)]


def prepare(work: Path, c: dict, cfg) -> Path:
    """Token shards of the case's corpus under ``work`` (built once per corpus + data config, reused)."""
    from text2llm.data.pipeline import run_clean
    from text2llm.data.readers import iter_cleaned
    from text2llm.pack import pack
    from text2llm.tokenizer import train_tokenizer

    key = json.dumps([c["corpus"], cfg.data.model_dump(), cfg.tokenizer.model_dump(), cfg.pack.model_dump()],
                     sort_keys=True, default=str)
    root = work / f"data-{c['group']}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    tokens = root / "tokens"
    if (tokens / "meta.json").is_file():
        return tokens
    run_clean(corpus_paths(c["corpus"]), root / "clean", cfg.data, workers=1, overwrite=True, progress=False)
    train_tokenizer((d.text for d in iter_cleaned(root / "clean")), root / "tokenizer", cfg.tokenizer, overwrite=True)
    pack(root / "clean", root / "tokenizer", tokens, cfg.pack, overwrite=True, progress=False)
    return tokens


def probe_speed(name: str, cfg, tokens: Path, args) -> tuple[float, list[float]]:
    """Seconds per optimizer step of ``cfg``: the fastest of ``--probe-repeats`` timing runs of
    ``--probe-steps`` steps (no evals, no checkpoints), each the median step time after the first
    third (one-off costs excluded)."""
    from text2llm.train.trainer import train

    times = []
    for i in range(args.probe_repeats):
        pc = cfg.model_copy(deep=True)
        for k, v in dict(max_steps=args.probe_steps, time_budget_s=0.0, eval_every=0, eval_batches=1,
                         log_every=1, checkpoint_every=0).items():
            setattr(pc.train, k, v)
        with contextlib.redirect_stdout(sys.stderr):
            r = train(pc, tokens, Path(args.work) / "probe" / name, overwrite=True, progress=False)
        rates = [h["tokens_per_s"] for h in r.history if "tokens_per_s" in h]
        tps = statistics.median(rates[len(rates) // 3:])
        times.append(cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum / tps)
    return min(times), times


def run_case(name: str, seed: int, args) -> dict:
    import torch

    from text2llm.checkpoint import load_model
    from text2llm.config import load_config
    from text2llm.evaluate import evaluate_tokens
    from text2llm.train.mfu import cpu_name
    from text2llm.train.trainer import _steps_within_budget, train

    c = case(name)
    budget = args.budget_s * c["budget_frac"]
    over = list(c["overrides"]) + [f"train.seed={seed}", f"train.time_budget_s={budget}", "train.samples=0",
                                   "train.plot=false", "train.tensorboard=false", f"train.threads={args.threads}"]
    cfg = load_config(c["config"], over)
    tokens = prepare(Path(args.work), c, cfg)
    load0 = os.getloadavg()
    extra = {}
    if args.mode == "probe":
        if name not in _PROBED:
            _PROBED[name] = probe_speed(name, cfg, tokens, args)
        sec, all_times = _PROBED[name]
        steps = max(1, _steps_within_budget(cfg.train, 0, 0.0, sec))
        cfg.train.max_steps, cfg.train.time_budget_s = steps, 0.0
        extra = {"probe_s_per_step": round(sec, 4), "probe_runs_s_per_step": [round(t, 4) for t in all_times],
                 "probe_tokens_per_s": round(cfg.train.batch_size * cfg.train.seq_len / sec, 1)}
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's notes: stdout holds only the JSON lines
        r = train(cfg, tokens, Path(args.work) / "runs" / f"{name}-s{seed}", overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    model, _ = load_model(r.last_checkpoint)
    with torch.no_grad():
        val = evaluate_tokens(model, tokens, "val")
    return {"bench": "quality", "case": name, "group": c["group"], "seed": seed, "budget_s": round(budget, 1),
            "val_bpb": round(val["bits_per_byte"], 4), "val_loss": round(val["loss"], 4),
            "run_val_bpb": r.val_bits_per_byte and round(r.val_bits_per_byte, 4), "steps": r.step,
            "tokens_per_s": round(r.train_tokens_per_s, 1), "mfu": r.mfu and round(r.mfu, 4),
            "params": r.params, "wall_s": round(wall, 1), "threads": args.threads or torch.get_num_threads(),
            "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "cpu": cpu_name(), "mode": args.mode, **extra, "overrides": c["overrides"], "note": c["note"]}


_PROBED: dict[str, tuple[float, list[float]]] = {}  # case -> its probed step time (once per run, for every seed)


def summarize(recs: list[dict]) -> dict:
    """Per case: mean / min / max val bpb over seeds and the change against its group's baseline."""
    by_case: dict[str, list[dict]] = {}
    for r in recs:
        by_case.setdefault(r["case"], []).append(r)
    out = {}
    for name, rs in by_case.items():
        bpbs = [r["val_bpb"] for r in rs]
        base = by_case.get("baseline" if CASES[name]["group"] == "en" else f"{CASES[name]['group']}-baseline")
        row = {"val_bpb_mean": round(statistics.mean(bpbs), 4), "val_bpb_spread": round(max(bpbs) - min(bpbs), 4),
               "seeds": [r["seed"] for r in rs], "val_bpb": bpbs, "steps": [r["steps"] for r in rs],
               "tokens_per_s_mean": round(statistics.mean(r["tokens_per_s"] for r in rs), 1)}
        if base and name != base[0]["case"]:
            paired = {r["seed"]: r["val_bpb"] for r in base}
            deltas = [100 * (r["val_bpb"] / paired[r["seed"]] - 1) for r in rs if r["seed"] in paired]
            if deltas:
                row["vs_baseline_pct"] = [round(d, 2) for d in deltas]
                row["wins_every_seed"] = all(d < 0 for d in deltas)
        out[name] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="en", help="comma-separated case and group names (default: en)")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help=f"training seconds per case (train.time_budget_s; default {DEFAULT_BUDGET_S:g}, the default run's)")
    ap.add_argument("--seeds", default="1337", help="comma-separated train.seed values (default 1337)")
    ap.add_argument("--work", default=".bench-cache/quality", help="data stages (reused) and runs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", help="also append every JSON line to this file")
    ap.add_argument("--mode", choices=["probe", "budget"], default="probe",
                    help="probe: steps from the case's fastest timing run (load-robust); budget: train.time_budget_s as is")
    ap.add_argument("--probe-steps", type=int, default=24, help="probe mode: steps per timing run")
    ap.add_argument("--probe-repeats", type=int, default=2, help="probe mode: timing runs per case (the fastest counts)")
    ap.add_argument("--probe-from", help="probe mode: reuse the step times of the cases in this JSONL (an earlier "
                                         "run's --out at the same budget) instead of timing them again")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.list:
        for n in CASES:
            c = case(n)
            print(json.dumps({"case": n, "group": c["group"], "overrides": c["overrides"],
                              "budget_frac": c["budget_frac"], "note": c["note"]}))
        return 0
    names = select(a.cases)
    if a.probe_from:
        for line in Path(a.probe_from).read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r.get("case") and "probe_s_per_step" in r:
                _PROBED.setdefault(r["case"], (r["probe_s_per_step"], r["probe_runs_s_per_step"]))
    seeds = [int(s) for s in a.seeds.split(",")]
    recs = []

    def emit(rec: dict) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    for seed in seeds:  # seed-major: a load spike hits one seed of every case, not every seed of one
        for name in names:
            rec = run_case(name, seed, a)
            recs.append(rec)
            emit(rec)
    emit({"bench": "quality", "summary": summarize(recs), "budget_s": a.budget_s, "seeds": seeds, "mode": a.mode})
    return 0


if __name__ == "__main__":
    sys.exit(main())
