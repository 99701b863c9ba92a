"""Loss-exact check for refactors (torchtitan's scripts/loss_compare.py, our size).

Trains the default config (``configs/tiny-cpu.toml`` = the built-in defaults) for ``--steps``
steps on the bundled corpus, logging every step, and prints one JSON line with the losses.
A change that should not alter the math must reproduce them bitwise::

    python benchmarks/loss_compare.py --work /tmp/lc --save before.json      # on the old code
    python benchmarks/loss_compare.py --work /tmp/lc --against before.json   # on the new code

``--work`` keeps the cleaned corpus, tokenizer and token shards between the two runs, so only
training runs again (the data stages are covered by their own tests). Exit status 1 when
``--against`` finds a differing loss.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/tokenize.py would shadow the standard library's tokenize: keep this dir off sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402


def prepare(work: Path, cfg) -> Path:
    """Token shards of the bundled corpus under ``work`` (built once, reused)."""
    from text2llm.data.pipeline import run_clean
    from text2llm.data.readers import iter_cleaned
    from text2llm.pack import pack
    from text2llm.run import bundled_corpus
    from text2llm.tokenizer import train_tokenizer

    tokens = work / "tokens"
    if (tokens / "meta.json").is_file():
        return tokens
    run_clean(bundled_corpus(), work / "clean", cfg.data, workers=1, overwrite=True, progress=False)
    train_tokenizer((d.text for d in iter_cleaned(work / "clean")), work / "tokenizer", cfg.tokenizer, overwrite=True)
    pack(work / "clean", work / "tokenizer", tokens, cfg.pack, overwrite=True, progress=False)
    return tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="dir for the data stages' outputs (reused) and the run")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the same reduction order every run)")
    ap.add_argument("--save", help="write the losses to this JSON file")
    ap.add_argument("--against", help="compare with the losses in this JSON file (bitwise)")
    a = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from text2llm.config import load_config
    from text2llm.train.mfu import cpu_name
    from text2llm.train.trainer import train

    work = Path(a.work)
    cfg = load_config(None, [f"train.max_steps={a.steps}", "train.time_budget_s=0", "train.log_every=1",
                             f"train.threads={a.threads}", "train.samples=0", "train.plot=false"])
    tokens = prepare(work, cfg)
    t0 = time.perf_counter()
    result = train(cfg, tokens, work / "run", overwrite=True, progress=False)
    losses = [r["loss"] for r in result.history if "loss" in r]
    rec = {"bench": "loss_compare", "steps": a.steps, "threads": a.threads, "cpu": cpu_name(),
           "seconds": round(time.perf_counter() - t0, 1), "final_loss": losses[-1], "val_loss": result.val_loss,
           "losses": losses}
    if a.save:
        Path(a.save).write_text(json.dumps(rec) + "\n", encoding="utf-8")
    if a.against:
        ref = json.loads(Path(a.against).read_text(encoding="utf-8"))
        diff = [i + 1 for i, (x, y) in enumerate(zip(losses, ref["losses"])) if x != y]
        rec["against"] = a.against
        rec["bitwise_equal"] = not diff and len(losses) == len(ref["losses"]) and result.val_loss == ref["val_loss"]
        rec["first_differing_step"] = diff[0] if diff else None
    print(json.dumps({k: v for k, v in rec.items() if k != "losses"}))
    return 0 if rec.get("bitwise_equal", True) else 1


if __name__ == "__main__":
    sys.exit(main())
