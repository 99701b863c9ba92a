"""Loss, perplexity and bits-per-byte of a checkpoint on token shards or on raw text.

Bits-per-byte makes models with different tokenizers comparable::

    bpb = (total cross-entropy in nats over the predicted tokens) / ln 2 / (UTF-8 bytes of the text)

The token loss, the ignored (padding) targets and bits-per-byte are defined once, in
:mod:`text2llm.loss`.

On raw text every document is encoded as BOS ... EOS and scored in windows of the model's
context (non-overlapping), so every token after the first of a window is predicted once.
On token shards the whole val split is walked the same way, and bytes come from meta.json.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import torch

from text2llm.errors import UserError
from text2llm.loss import IGNORE_INDEX, bits_per_byte, count_targets, ignore_padding, token_nll_sum
from text2llm.pack import read_meta


def read_text_documents(path: str | Path) -> list[str]:
    """A UTF-8 .txt file (one document) or .jsonl / .jsonl.gz with a "text" field per line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file")
    name = p.name.lower()
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            docs = []
            with opener(p, "rt", encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise UserError(f"{p}:{n}: expected a JSON object with a \"text\" field") from None
                    if not isinstance(text, str):
                        raise UserError(f"{p}:{n}: \"text\" is not a string")
                    docs.append(text)
            return docs
        return [p.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{p}: cannot read ({e})") from None


@torch.no_grad()
def score_stream(model, ids: torch.Tensor, window: int, batch_size: int = 8) -> tuple[float, int]:
    """Sum of next-token NLL (nats) and count of predicted tokens over a 1-D id stream."""
    n = ids.numel()
    starts = list(range(0, max(1, n - 1), window))
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        chunk = [ids[s : s + window + 1] for s in starts[i : i + batch_size]]
        chunk = [c for c in chunk if c.numel() >= 2]
        if not chunk:
            continue
        L = max(c.numel() for c in chunk)
        xy = torch.full((len(chunk), L), IGNORE_INDEX, dtype=torch.long)
        for j, c in enumerate(chunk):
            xy[j, : c.numel()] = c
        x, y = xy[:, :-1].clamp(min=0), xy[:, 1:]
        total += token_nll_sum(model(x).logits, y).item()
        count += int(count_targets(y))
    return total, count


def _result(nll: float, count: int, n_bytes: int) -> dict:
    loss = nll / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "bits_per_byte": bits_per_byte(nll, 1, n_bytes),
            "tokens": count, "bytes": n_bytes}


def evaluate_text(model, tokenizer, path: str | Path, window: int | None = None) -> dict:
    docs = read_text_documents(path)
    if not docs or not any(d for d in docs):
        raise UserError(f"{path}: holds no text")
    window = window or model.cfg.max_seq_len
    stream = []
    for ids in tokenizer.encode_batch(docs, add_bos=True, add_eos=True):
        stream.extend(ids)
    nll, count = score_stream(model, torch.tensor(stream, dtype=torch.long), window)
    return _result(nll, count, sum(len(d.encode("utf-8")) for d in docs))


def evaluate_tokens(model, tokens_dir: str | Path, split: str = "val", window: int | None = None) -> dict:
    import numpy as np

    meta = read_meta(tokens_dir)
    info = meta["splits"].get(split)
    if not info or not info["tokens"]:
        raise UserError(f"{tokens_dir}: split '{split}' holds no tokens")
    arr = np.concatenate([np.fromfile(Path(tokens_dir) / f, dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
                          for f in info["shards"]])
    if meta.get("mode") == "padded":  # rows of row_len tokens: score each row, padding targets ignored
        nll, count = score_rows(model, torch.from_numpy(arr.astype(np.int64)), int(meta["row_len"]),
                                int(meta.get("pad_id", 0)))
        return _result(nll, count, info["bytes"])
    window = window or model.cfg.max_seq_len
    nll, count = score_stream(model, torch.from_numpy(arr.astype(np.int64)), window)
    return _result(nll, count, info["bytes"])


@torch.no_grad()
def score_rows(model, ids: torch.Tensor, row_len: int, pad_id: int, batch_size: int = 8) -> tuple[float, int]:
    """Sum of next-token NLL and count of predicted tokens over padded rows (row_len tokens each)."""
    rows = ids[: ids.numel() // row_len * row_len].view(-1, row_len)
    rows = rows[:, : model.cfg.max_seq_len + 1]
    total, count = 0.0, 0
    for i in range(0, rows.size(0), batch_size):
        chunk = rows[i : i + batch_size]
        x, y = chunk[:, :-1], ignore_padding(chunk[:, 1:], pad_id)
        total += token_nll_sum(model(x).logits, y).item()
        count += int(count_targets(y))
    return total, count


def val_batches(loader, n_batches: int):
    """The first ``n_batches`` (x, y) batches of a sequential
    :class:`~text2llm.loader.TokenLoader`, restarted from its beginning (fewer when the split is short)."""
    loader.pos = loader.lo
    for _ in range(max(1, min(n_batches, loader.num_windows() // loader.B or 1))):
        yield next(loader)


@torch.no_grad()
def loader_nll(model, loader, n_batches: int, device, amp_dtype=None, attn_mask_fn=None,
               nll_fn=token_nll_sum) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token NLL in nats, number of predicted tokens) over ``n_batches`` batches of a
    sequential :class:`~text2llm.loader.TokenLoader`, restarted from its beginning; both are tensors
    on ``device`` so a distributed caller can all-reduce them before dividing. Padding targets (the
    loader sets them to the ignore index) do not count. The model is put in eval mode and back in train mode. ``nll_fn(logits,
    targets)`` is the summed token NLL (tensor parallel training passes one over vocab-split logits)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in val_batches(loader, n_batches):
        x, y = x.to(device), y.to(device)
        kwargs = {"attn_mask": attn_mask_fn(x)} if attn_mask_fn is not None else {}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x, **kwargs).logits
        total += nll_fn(logits, y).double()
        count += count_targets(y)
    model.train(was_training)
    return total, count

