"""Documents -> token shards (``text2llm pack``).

Two layouts (``pack.mode``), both flat little-endian ``uint16`` files (``uint32`` when the vocab
needs it)::

    OUT/train-00000.bin  OUT/val-00000.bin  OUT/meta.json

* ``packed`` (default): each document becomes ``BOS ... EOS`` and documents are written back to
  back; the loader cuts windows anywhere in the stream.
* ``padded`` (the seed's fixed-length rows): each document becomes rows of ``seq_len + 1``
  tokens (``BOS ... EOS`` then ``<pad>``), so a row gives ``seq_len`` inputs and ``seq_len``
  targets; the loader turns targets at padding into the ignore index (-100). A longer document
  is truncated, or with ``pack.split_long`` cut into several rows that overlap by one token (so
  every token is a target exactly once). ``meta.json`` holds ``seq_len`` and ``row_len``.

The train/val split is by document and deterministic: a document goes to val when a hash of
(seed, document id) falls under ``val_fraction`` -- the same document lands in the same split on
every run and with any number of workers. Documents are tokenised in ``pack.workers``
processes in fixed-size chunks whose results are written in order, so the output is
byte-identical for any worker count. ``meta.json`` records dtype, vocab size, special ids,
the tokenizer fingerprint and, per split, tokens (not counting padding), documents, UTF-8 bytes
of the text the tokens spell (for bits-per-byte) and the shard files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from text2llm.errors import UserError, read_json_file

META = "meta.json"
CHUNK_DOCS, CHUNK_BYTES = 512, 1 << 20  # a work unit: this many documents or bytes, whichever comes first
_tok = None  # the tokenizer of this (worker) process
_job: dict = {}  # what every chunk needs: dtype, split and mode settings


def _init_worker(tok_dir: str, job: dict, in_pool: bool = True) -> None:
    global _tok, _job
    if in_pool:  # one thread per worker process (never changed in the caller's own process)
        for var in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS"):
            os.environ.setdefault(var, "1")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from text2llm.tokenizer import Tokenizer

    _tok, _job = Tokenizer.load(tok_dir), job


def is_val(doc_id: str, seed: int, val_fraction: float) -> bool:
    """Deterministic split by document: hash(seed, id) -> [0, 1) < val_fraction."""
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def _rows(ids: list[int], row_len: int, split_long: bool, pad_id: int) -> tuple[list[list[int]], int]:
    """Padded mode: rows of ``row_len`` for one document's ``BOS ... EOS`` ids, and how many of
    its tokens were kept (less than ``len(ids)`` only when truncated)."""
    T = row_len - 1
    if len(ids) <= row_len:
        return [ids + [pad_id] * (row_len - len(ids))], len(ids)
    if not split_long:
        return [ids[:row_len]], row_len
    rows = []
    for start in range(0, len(ids) - 1, T):  # windows overlap by one token: each token is a target once
        row = ids[start : start + row_len]
        rows.append(row + [pad_id] * (row_len - len(row)))
    return rows, len(ids)


def _encode_chunk(chunk: list[tuple[str, str]]) -> dict:
    """Tokenise one chunk of (id, text); return per split the token array and counts."""
    j = _job
    encoded = _tok.encode_batch([t for _, t in chunk], add_bos=True, add_eos=True, num_threads=1)
    out = {s: {"ids": [], "lens": [], "tokens": 0, "documents": 0, "bytes": 0} for s in ("train", "val")}
    for (doc_id, text), ids in zip(chunk, encoded):
        acc = out["val" if is_val(doc_id, j["seed"], j["val_fraction"]) else "train"]
        if j["mode"] == "padded":
            rows, kept = _rows(ids, j["row_len"], j["split_long"], _tok.pad_id)
            for r in rows:
                acc["ids"].extend(r)
            acc["lens"].append(len(rows) * len(rows[0]))
            acc["tokens"] += kept
            if kept < len(ids):  # truncated: count the bytes of the text that was kept
                acc["bytes"] += len(_tok.decode(ids[:kept]).encode("utf-8"))
            else:
                acc["bytes"] += len(text.encode("utf-8"))
        else:
            acc["ids"].extend(ids)
            acc["lens"].append(len(ids))
            acc["tokens"] += len(ids)
            acc["bytes"] += len(text.encode("utf-8"))
        acc["documents"] += 1
    for acc in out.values():
        acc["ids"] = np.asarray(acc["ids"], dtype=j["dtype"])
        acc["lens"] = np.asarray(acc["lens"], dtype=np.int64)
    return out


class ShardWriter:
    """Appends token arrays to ``{split}-00000.bin``, starting a new shard once one holds
    ``shard_tokens`` (at a document boundary: a document's tokens or rows never span two shards)."""

    def __init__(self, out: Path, split: str, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.files: list[str] = []
        self.tokens = self.documents = self.bytes = self.stored = 0
        self._fh = None
        self._in_shard = 0

    def write(self, part: dict) -> None:
        ids = part["ids"].astype(part["ids"].dtype.newbyteorder("<"), copy=False)
        ends = np.cumsum(part["lens"])
        start = 0
        while start < len(ids):
            if self._fh is None or self._in_shard >= self.shard_tokens:
                self._open()
            # write the documents that fit before this shard is full (at least one)
            room = self.shard_tokens - self._in_shard
            first = int(np.searchsorted(ends, start, side="right"))  # the next document
            last = max(first, int(np.searchsorted(ends, start + room, side="right")) - 1)
            stop = int(ends[last])
            self._fh.write(ids[start:stop].tobytes())
            self._in_shard += stop - start
            start = stop
        self.stored += len(ids)
        self.tokens += part["tokens"]
        self.documents += part["documents"]
        self.bytes += part["bytes"]

    def _open(self) -> None:
        if self._fh:
            self._fh.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        self.files.append(name)
        self._fh = open(self.out / name, "wb")
        self._in_shard = 0

    def close(self) -> dict:
        if self._fh:
            self._fh.close()
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes, "shards": self.files}


def _chunks(docs: Iterable, skipped: list[int]) -> Iterator[list[tuple[str, str]]]:
    """(id, text) pairs in work units; empty documents are skipped and counted."""
    chunk, size = [], 0
    for n, d in enumerate(docs):
        doc_id, text = (str(n), d) if isinstance(d, str) else (str(d.id), d.text)
        if not text:
            skipped[0] += 1
            continue
        chunk.append((doc_id, text))
        size += len(text)
        if len(chunk) >= CHUNK_DOCS or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def pack(docs: Iterable, tokenizer_dir: str | Path, out_dir: str | Path, cfg, overwrite: bool = False,
         progress: bool = True) -> dict:
    """Tokenise ``docs`` (objects with ``id`` and ``text``, or plain strings) into token shards;
    return meta.json's dict.

    ``cfg`` is a :class:`text2llm.config.PackConfig`. With ``cfg.workers`` > 1 the tokenising
    runs in that many processes (one thread each) while this one reads and writes.
    """
    from text2llm.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: output dir is not empty (pass --overwrite to replace it)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    row_len = cfg.seq_len + 1
    job = {"dtype": np.dtype(dtype).name, "seed": cfg.seed, "val_fraction": cfg.val_fraction,
           "mode": cfg.mode, "row_len": row_len, "split_long": cfg.split_long}
    writers = {s: ShardWriter(tmp, s, cfg.shard_tokens) for s in ("train", "val")}
    skipped = [0]
    chunks = _chunks(docs, skipped)

    from tqdm import tqdm

    bar = tqdm(desc="pack", unit=" docs", disable=not progress, mininterval=0.5)
    t0 = time.perf_counter()

    def encoded() -> Iterator[dict]:
        if cfg.workers <= 1:
            _init_worker(str(tok.path), job, in_pool=False)
            yield from map(_encode_chunk, chunks)
            return
        # fork starts a worker in milliseconds (spawn re-imports numpy and the backend, ~0.3 s of
        # CPU each, a third of the work on a 5 MB corpus); workers touch neither torch nor threads
        # of this process, so fork is safe where the platform has it
        ctx = get_context("fork" if sys.platform == "linux" else "spawn")
        with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(str(tok.path), job)) as pool:
            # results are taken in submission order, so the output is identical for any worker
            # count; at most 2 chunks per worker are in flight, so memory stays bounded
            # (Pool.imap would read the whole corpus ahead)
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_encode_chunk, (chunk,)))
                if len(pending) >= 2 * cfg.workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

    tokens = 0
    try:
        for res in encoded():
            for split, part in res.items():
                writers[split].write(part)
                tokens += part["tokens"]
            bar.update(res["train"]["documents"] + res["val"]["documents"])
            bar.set_postfix_str(f"{tokens / max(1e-9, time.perf_counter() - t0):,.0f} tok/s", refresh=False)
    finally:
        bar.close()
        splits = {s: w.close() for s, w in writers.items()}
    if cfg.mode == "padded":
        for s, w in writers.items():
            splits[s]["rows"] = w.stored // row_len
            splits[s]["padding"] = w.stored - w.tokens - (w.stored // row_len - w.documents if cfg.split_long else 0)
    if splits["train"]["tokens"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError("pack: no documents to pack (is the input empty?)")
    if cfg.val_fraction > 0 and splits["val"]["documents"] < cfg.val_min_docs:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"pack: only {splits['val']['documents']} validation documents (pack.val_min_docs={cfg.val_min_docs}); "
            f"raise pack.val_fraction or give more documents"
        )
    seconds = time.perf_counter() - t0
    meta = {
        "format": "text2llm-tokens/1",
        "mode": cfg.mode,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
        "tokenizer_fingerprint": tok.fingerprint,
        "tokenizer_dir": str(Path(tok.path).resolve()),
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "splits": splits,
        "skipped_empty": skipped[0],
        "workers": cfg.workers,
        "seconds": round(seconds, 3),
        "mb_per_s": round((splits["train"]["bytes"] + splits["val"]["bytes"]) / 1e6 / max(seconds, 1e-9), 3),
    }
    if cfg.mode == "padded":
        meta.update({"seq_len": cfg.seq_len, "row_len": row_len, "split_long": cfg.split_long})
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return meta


def read_meta(tokens_dir: str | Path) -> dict:
    return read_json_file(Path(tokens_dir) / META,
                          f"{tokens_dir}: not a token dir (no {META}); make one with `text2llm pack`")
