"""Run reports: ``metrics.jsonl``, the loss / LR curve PNG, TensorBoard logs, a summary table.

``metrics.jsonl`` holds one JSON object per line. Training lines carry ``step`` and ``loss``
(plus ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu``, ``mem_mib``, ...); evaluation lines carry
``step`` and ``val_loss`` (plus ``val_perplexity``, ``val_bits_per_byte``). Read it with
:func:`read_metrics` or ``pandas.read_json(path, lines=True)``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from text2llm.errors import UserError, require

METRICS = "metrics.jsonl"
PLOT = "loss.png"


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl (a torn last line from a crash is skipped)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run rewrites the steps after its checkpoint)."""
    p = Path(path)
    if not p.is_file():
        return
    keep = [r for r in read_metrics(p) if r.get("step", 0) <= step]
    tmp = p.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
    tmp.replace(p)


class MetricsWriter:
    """Appends records to metrics.jsonl and mirrors numbers to TensorBoard (rank 0 only).

    TensorBoard is used when ``tensorboard`` is true and the package is installed (the
    ``tensorboard`` extra; without it, one note line says so); scalars go to ``RUN/tb`` under
    ``train/<key>`` or ``val/<key>``.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False):
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                require("tensorboard", "tensorboard", "train with train.tensorboard = true")
            except UserError as e:  # training goes on without it: one line, metrics.jsonl only
                print(f"note: {e} (metrics.jsonl is written as always; train.tensorboard=false silences this)",
                      file=sys.stderr)
            else:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            prefix = "val" if any(k.startswith("val_") for k in record) else "train"
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k.removeprefix('val_')}", v, step)
                elif isinstance(v, list):  # e.g. expert_load: [[share per expert] per MoE layer]
                    for i, x in enumerate(v):
                        for j, y in enumerate(x if isinstance(x, list) else [x]):
                            if isinstance(y, (int, float)):
                                self.tb.add_scalar(f"{prefix}/{k}/{i}" + (f"/{j}" if isinstance(x, list) else ""), y, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def plot_curves(metrics: str | Path | list[dict], out_png: str | Path) -> Path | None:
    """Write a PNG with train/val loss (left) and learning rate (right) against step.
    Returns the path, or None when there is nothing to plot yet."""
    records = metrics if isinstance(metrics, list) else read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and _finite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and _finite(r["val_loss"])]
    lr = [(r["step"], r["lr"]) for r in records if "lr" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        ax_loss.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax_loss.plot(*zip(*val), "o-", label="val", markersize=3)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    if lr:
        ax_lr.plot(*zip(*lr), color="tab:green", linewidth=1)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)  # a viewer never sees a half-written PNG
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column summary table (rich)."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def format_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")
