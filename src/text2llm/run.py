"""``text2llm run``: every stage in order, on the bundled corpus or the inputs the config names.

    OUT/clean      cleaned shards + stats.json          (text2llm.data.pipeline)
    OUT/tokenizer  the trained tokenizer                (text2llm.tokenizer)
    OUT/tokens     token shards + meta.json             (text2llm.pack)
    OUT/train      the run dir: checkpoints, metrics    (text2llm.train.trainer)
    OUT/summary.json and a summary table: documents, vocab, tokens, parameters, tokens/s,
    seconds per stage, validation loss and bits-per-byte, and a generated sample.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from text2llm.artifacts import load
from text2llm.data.pipeline import run_clean
from text2llm.data.readers import iter_cleaned
from text2llm.errors import UserError
from text2llm.evaluate import evaluate_tokens
from text2llm.files import check_output_dir
from text2llm.infer.generate import generate
from text2llm.pack import pack
from text2llm.tokenizer import train_tokenizer
from text2llm.train.trainer import train


def bundled_corpus() -> list[Path]:
    """The TinyStories sample shipped inside the package (see assets/README.md)."""
    root = resources.files("text2llm") / "assets" / "tinystories"
    files = sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".jsonl.gz"))
    if not files:
        raise UserError(f"{root}: the bundled corpus is missing (reinstall text2llm)")
    return files


class StageTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()
                print(f"\n== {name} ==", flush=True)

            def __exit__(self, *exc):
                timer.seconds[name] = round(time.perf_counter() - self.t0, 2)

        return _Ctx()


def run_pipeline(cfg, out_dir: str | Path, overwrite: bool = False, progress: bool = True) -> dict:
    """Run clean -> tokenizer -> pack -> train -> eval -> generate; return the summary dict."""
    out = check_output_dir(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out)
    inputs = [Path(p) for p in cfg.run.inputs] or bundled_corpus()
    t_all = time.perf_counter()
    timer = StageTimer()

    with timer("clean"):
        stats = run_clean(inputs, out / "clean", cfg.data, workers=cfg.pack.workers, overwrite=overwrite,
                          progress=progress)
    with timer("tokenizer"):
        tok = train_tokenizer((d.text for d in iter_cleaned(out / "clean")), out / "tokenizer", cfg.tokenizer,
                              overwrite=overwrite)
        print(f"trained {cfg.tokenizer.type} tokenizer, vocab {tok.vocab_size}")
    with timer("pack"):
        meta = pack(out / "clean", out / "tokenizer", out / "tokens", cfg.pack, overwrite=overwrite,
                    progress=progress)
        print(f"{meta['splits']['train']['tokens']:,} train tokens, {meta['splits']['val']['tokens']:,} val tokens")
    with timer("train"):
        result = train(cfg, out / "tokens", out / "train", overwrite=overwrite, progress=progress)
    with timer("eval"):
        model, tokenizer = load(result.last_checkpoint)
        ev = evaluate_tokens(model, out / "tokens", "val")
        print(f"val loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f}, bits/byte {ev['bits_per_byte']:.4f}")
    with timer("generate"):
        g = cfg.generate
        sample = generate(model, tokenizer, g.prompt, g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.seed)

    summary = {
        "documents_in": stats.get("docs_in"),
        "documents_kept": stats.get("docs_out"),
        "vocab_size": tok.vocab_size,
        "train_tokens": meta["splits"]["train"]["tokens"],
        "val_tokens": meta["splits"]["val"]["tokens"],
        "params": result.params,
        "steps": result.step,
        "train_tokens_per_s": round(result.train_tokens_per_s, 1),
        "val_loss": round(ev["loss"], 4),
        "val_perplexity": round(ev["perplexity"], 3),
        "val_bits_per_byte": round(ev["bits_per_byte"], 4),
        "stage_seconds": timer.seconds,
        "total_seconds": round(time.perf_counter() - t_all, 2),
        "checkpoint": str(result.last_checkpoint),
        "sample": sample,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print_summary(summary)
    return summary


def print_summary(s: dict) -> None:
    table = Table(title="text2llm run", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("documents kept", f"{s['documents_kept']:,} / {s['documents_in']:,}"),
        ("vocab size", f"{s['vocab_size']:,}"),
        ("tokens (train / val)", f"{s['train_tokens']:,} / {s['val_tokens']:,}"),
        ("parameters", f"{s['params']:,}"),
        ("training steps", f"{s['steps']:,}"),
        ("training tokens/s", f"{s['train_tokens_per_s']:,.0f}"),
        ("val loss", f"{s['val_loss']:.4f}"),
        ("val perplexity", f"{s['val_perplexity']:.2f}"),
        ("val bits/byte", f"{s['val_bits_per_byte']:.4f}"),
    ]
    rows += [(f"seconds: {k}", f"{v:.1f}") for k, v in s["stage_seconds"].items()]
    rows.append(("seconds: total", f"{s['total_seconds']:.1f}"))
    for k, v in rows:
        table.add_row(k, v)
    console = Console()
    console.print(table)
    console.print("[bold]sample:[/bold]")
    console.print(s["sample"], markup=False, highlight=False)
