"""The before/after report every compression command ends with.

One :func:`measure` per model gives::

    size_bytes        bytes of the weight files on disk (model.safetensors, or the int8 tensors)
    params            stored parameters (a tied head counts once; int8 weights count as parameters too)
    prefill_ms_per_token   forward over a prompt of ``prefill_len`` tokens (batch 1), divided by its length
    decode_ms_per_token    one new token with a KV cache after the prompt (batch 1)
    val_loss, val_bits_per_byte   on the val split of token shards (text2llm.evaluate.evaluate_tokens)

Latencies are the best (minimum) of several repeats on the current torch thread count, which the
report records: the minimum is the least disturbed by other processes on a shared CPU (as ``timeit``
advises); they are still wall-clock numbers and move with the machine's load.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from text2llm.evaluate import evaluate_tokens
from text2llm.infer.fast_step import FastDecodeStep
from text2llm.infer.packing import pack_weights
from text2llm.model.cache import KVCache
from text2llm.model.transformer import Transformer

METRICS = [  # key, label, format (lower is better for all)
    ("size_bytes", "size on disk (MB)", lambda v: f"{v / 1e6:.2f}"),
    ("params", "parameters", lambda v: f"{v:,}"),
    ("prefill_ms_per_token", "prefill ms/token", lambda v: f"{v:.4f}"),
    ("decode_ms_per_token", "decode ms/token", lambda v: f"{v:.3f}"),
    ("val_loss", "val loss", lambda v: f"{v:.4f}"),
    ("val_bits_per_byte", "val bits/byte", lambda v: f"{v:.4f}"),
    ("kl_to_teacher", "KL to teacher (nats/token)", lambda v: f"{v:.4f}"),
]


LATENCY_KEYS = ("prefill_ms_per_token", "decode_ms_per_token", "prefill_len", "decode_tokens", "threads")


def weights_size(ckpt_dir: str | Path) -> int:
    """Bytes of the tensor files of a checkpoint (safetensors), not counting optimizer state."""
    return sum(p.stat().st_size for p in Path(ckpt_dir).glob("*.safetensors"))


def count_params(model: torch.nn.Module) -> int:
    """Parameters of a float or int8 model: float parameters plus the weights and biases packed
    inside quantized Linear layers (which ``model.parameters()`` does not list)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    for mod in model.modules():
        if hasattr(mod, "_packed_params") and callable(getattr(mod, "weight", None)):
            n += mod.weight().numel() + (mod.bias().numel() if mod.bias() is not None else 0)
    if getattr(model, "int8_tied_embedding", False):  # stored once, as the int8 head
        n -= model.embed.weight.numel()
    return n


@torch.inference_mode()  # what the generation engine runs under (TorchEngine)
def latencies(models: list, prefill_len: int = 128, decode_tokens: int = 32, repeats: int = 5, seed: int = 0) -> list[dict]:
    """Best-of-``repeats`` CPU latency per token of a prefill (1 x prefill_len) and of KV-cache decode
    steps, for each model. The models take turns within every repeat, so a change in the machine's
    load hits all of them alike and the before/after ratio stays fair."""
    cfg = models[0].cfg
    prefill_len = max(1, min(prefill_len, min(m.cfg.max_seq_len for m in models) - decode_tokens - 1))
    decode_tokens = max(1, min(decode_tokens, cfg.max_seq_len - prefill_len))
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (1, prefill_len), generator=g)
    step_ids = torch.randint(0, cfg.vocab_size, (decode_tokens, 1, 1), generator=g)

    def prefill_ms(model) -> float:
        t0 = time.perf_counter()
        model(prompt, last_only=True)
        return (time.perf_counter() - t0) * 1e3

    def decode_ms(model, cache, fast_step) -> float:
        cache.reset()
        model(prompt, cache=cache, last_only=True)
        t0 = time.perf_counter()
        for ids in step_ids:
            if fast_step is not None:
                fast_step(ids[:, 0], cache.pos, cache)
            else:
                model(ids, cache=cache, last_only=True)
        return (time.perf_counter() - t0) * 1e3

    # time the path generation takes (TorchEngine): packed Linears, the last position's logits,
    # and each decode step through infer/fast_step.py where it covers the model
    for m in models:
        m.eval()
        if isinstance(m, Transformer):
            pack_weights(m)
    steps = [FastDecodeStep.build(m) for m in models]
    caches = [KVCache(m.cfg, batch_size=1, max_len=prefill_len + decode_tokens) for m in models]
    best = [[float("inf"), float("inf")] for _ in models]
    for m, c, st in zip(models, caches, steps):  # warm-up: allocations, packed-weight caches
        prefill_ms(m), decode_ms(m, c, st)
    for _ in range(repeats):
        for i, (m, c, st) in enumerate(zip(models, caches, steps)):
            best[i][0] = min(best[i][0], prefill_ms(m))
            best[i][1] = min(best[i][1], decode_ms(m, c, st))
    return [dict(zip(LATENCY_KEYS, (p / prefill_len, d / decode_tokens, prefill_len, decode_tokens,
                                    torch.get_num_threads()))) for p, d in best]


def latency(model, **kwargs) -> dict:
    """:func:`latencies` of one model."""
    return latencies([model], **kwargs)[0]


def measure(model, ckpt_dir: str | Path | None, tokens_dir: str | Path | None, latency_kwargs: dict | None = None,
            timing: bool = True) -> dict:
    """All report metrics of one model (val metrics only when ``tokens_dir`` is given; latencies
    unless ``timing=False``, for :func:`retime` to add them side by side with another model)."""
    model.eval()
    row = {"size_bytes": weights_size(ckpt_dir) if ckpt_dir else None, "params": count_params(model)}
    if timing:
        row.update(latency(model, **(latency_kwargs or {})))
    if tokens_dir is not None:
        ev = evaluate_tokens(model, tokens_dir, "val")
        row.update(val_loss=ev["loss"], val_bits_per_byte=ev["bits_per_byte"], val_tokens=ev["tokens"])
    return row


def retime(rows: list[dict], models: list, latency_kwargs: dict | None = None) -> None:
    """Add interleaved latencies (:func:`latencies`) of ``models`` to the matching ``rows``."""
    for row, lat in zip(rows, latencies(models, **(latency_kwargs or {}))):
        row.update(lat)


def compare(rows: dict[str, dict]) -> dict:
    """``{"before": ..., [...,] "after": ...}`` plus deltas of ``after`` against ``before``:
    absolute difference, relative change, and for sizes/latencies the ratio before/after (x smaller/faster)."""
    before, after = rows["before"], rows["after"]
    deltas = {}
    for key, _, _ in METRICS:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        d = {"abs": a - b, "rel": (a - b) / b if b else None}
        if key in ("size_bytes", "params", "prefill_ms_per_token", "decode_ms_per_token") and a:
            d["ratio"] = b / a  # e.g. 3.9 = 3.9x smaller / faster
        deltas[key] = d
    return {**rows, "delta": deltas}


def format_table(report: dict, title: str) -> str:
    """A plain-text table: one row per metric, one column per model, and the change."""
    cols = [k for k in report if k not in ("delta", "method", "settings")]
    header = ["metric"] + cols + ["change"]
    lines = [header]
    for key, label, fmt in METRICS:
        if all(report[c].get(key) is None for c in cols):
            continue
        cells = [label] + [fmt(report[c][key]) if report[c].get(key) is not None else "-" for c in cols]
        d = report["delta"].get(key)
        if d is None:
            cells.append("-")
        elif "ratio" in d:
            cells.append(f"{d['ratio']:.2f}x")
        else:
            cells.append(f"{d['abs']:+.4f} ({100 * d['rel']:+.2f}%)" if d["rel"] is not None else f"{d['abs']:+.4f}")
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out.append("  ".join("-" * w for w in widths))
    for row in lines[1:]:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(out)


def write_report(report: dict, out_dir: str | Path, title: str, echo: bool = True,
                 final_dir: str | Path | None = None) -> Path:
    """Write ``report.json`` into ``out_dir`` and print the table. ``final_dir``: where the file
    will be once ``out_dir`` (a staging dir) is renamed into place, for the message."""
    path = Path(out_dir) / "report.json"
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if echo:
        print(format_table(report, title))
        print(f"report -> {Path(final_dir) / 'report.json' if final_dir else path}")
    return path
