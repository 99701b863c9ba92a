"""Documents -> token shards (``text2llm pack``).

Two layouts (``pack.mode``), both flat little-endian ``uint16`` files (``uint32`` when the vocab
needs it)::

    OUT/train-00000.bin  OUT/val-00000.bin  OUT/meta.json

* ``packed`` (default): each document becomes ``BOS ... EOS`` and documents are written back to
  back; the loader cuts windows anywhere in the stream.
* ``padded`` (the seed's fixed-length rows): each document becomes rows of ``seq_len + 1``
  tokens (``BOS ... EOS`` then ``<pad>``), so a row gives ``seq_len`` inputs and ``seq_len``
  targets; the loader turns targets at padding into the ignore index. A longer document
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
import sys
import time
from itertools import chain, compress, repeat
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from text2llm.data.readers import cleaned_files, iter_cleaned_lines, parse_cleaned_line
from text2llm.errors import UserError
from text2llm.files import read_metadata, staged_output
from text2llm.tokenizer import Tokenizer
from text2llm.workers import QuietPool, batched, bounded_imap

META = "meta.json"
# a work unit: this many documents or bytes of UTF-8 text (estimated, see _size), whichever comes
# first. Small enough that the last units keep every worker busy and large documents spread over
# them, large enough that the per-unit cost (one batch call, one result sent back) stays small
# next to the tokenising (benchmarks/tokenize.py measures both)
CHUNK_DOCS, CHUNK_BYTES = 512, 1 << 18
_tok = None  # the tokenizer of this (worker) process
_job: dict = {}  # what every chunk needs: dtype, split and mode settings
_docs: Sequence | None = None  # the caller's list of documents, which forked workers read by index
_spilled = 0  # units this worker process has written to spill files


def _init_worker(tok_dir: str, job: dict) -> None:
    """Pool initializer: one thread per worker process (never changed in the caller's own
    process), and the tokenizer (a forked worker has the caller's already)."""
    global _tok, _job
    for var in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _tok is None or str(_tok.path) != tok_dir:
        _tok = Tokenizer.load(tok_dir)
    _job = job


def _set_state(tok=None, job: dict | None = None, docs: Sequence | None = None) -> None:
    """What :func:`_encode_chunk` uses in this process (and forked workers inherit); no
    arguments: forget it all, so a finished ``pack`` keeps nothing of the caller's alive."""
    global _tok, _job, _docs
    _tok, _job, _docs = tok, job or {}, docs


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


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))  # isascii() is O(1) in CPython


def _size(text: str) -> int:
    """UTF-8 bytes of ``text``, estimated in O(1) (exact for ASCII and for CJK), to cut work units
    without encoding every document in the process that hands them out."""
    return len(text) if text.isascii() else 3 * len(text)


def _flat(encoded: Iterable[list[int]], n: int, dtype, bos: int, eos: int) -> np.ndarray:
    """``BOS ids EOS`` of each document back to back as one array of ``n`` tokens (the flattening
    runs in C: no per-token or per-document Python code)."""
    return np.fromiter(chain.from_iterable(chain.from_iterable(zip(repeat((bos,)), encoded, repeat((eos,))))),
                       dtype=dtype, count=n)


def _encode_chunk(chunk: list[tuple[str, str]] | tuple[int, int] | list[tuple[str, int, bytes]]) -> dict:
    """Tokenise one chunk of (id, text), the documents ``_docs[start:stop]``, or raw cleaned-shard
    lines (file, line number, JSON bytes) parsed here; return per split the token array and
    counts, and ``skipped`` empty documents of raw lines."""
    j, tok = _job, _tok
    skipped = 0
    if isinstance(chunk, tuple):
        start, stop = chunk
        chunk = [p for p in map(_pair, range(start, stop), _docs[start:stop]) if p[1]]
    elif chunk and isinstance(chunk[0][1], int):  # raw lines: the JSON is parsed in the worker
        docs = [parse_cleaned_line(*line) for line in chunk]
        chunk = [(d.id, d.text) for d in docs if d.text]
        skipped = len(docs) - len(chunk)
    all_texts = [t for _, t in chunk]
    encoded = tok.encode_batch(all_texts, num_threads=1)  # BOS/EOS are added below
    seed, frac = j["seed"], j["val_fraction"]
    val = [is_val(doc_id, seed, frac) for doc_id, _ in chunk] if frac > 0 else [False] * len(chunk)
    out = {}
    for split, want in (("train", False), ("val", True)):
        keep = [v == want for v in val]
        n_docs = sum(keep)
        if n_docs == len(chunk):
            docs, texts = encoded, all_texts
        elif n_docs:
            docs, texts = list(compress(encoded, keep)), list(compress(all_texts, keep))
        else:
            docs, texts = [], []
        if j["mode"] == "padded":
            out[split] = _padded(docs, texts, j)
            continue
        lens = np.fromiter(map(len, docs), dtype=np.int64, count=n_docs) + 2
        n = int(lens.sum())
        out[split] = {"ids": _flat(docs, n, j["dtype"], tok.bos_id, tok.eos_id), "lens": lens, "tokens": n,
                      "documents": n_docs, "bytes": sum(map(_utf8_len, texts))}
    if j.get("spill"):
        _spill(out, j["spill"])
    if skipped:
        out["skipped"] = skipped
    return out


def _spill(out: dict, folder: str) -> None:
    """Worker processes: write the unit's token ids to a file of this worker's own and send back
    only where they are. The result then crosses the pipe in a few KB, so a worker never waits for
    the parent to read it, and the parent copies the tokens into the shards in the kernel."""
    global _spilled
    path = os.path.join(folder, f".unit-{os.getpid()}-{_spilled}.bin")
    _spilled += 1
    offset = 0
    with open(path, "wb") as f:
        for part in out.values():
            ids = part.pop("ids")
            f.write(ids.astype(ids.dtype.newbyteorder("<"), copy=False).data)
            part["spill"] = (path, offset, ids.itemsize, len(ids))
            offset += ids.nbytes


def _padded(docs: list[list[int]], texts: list[str], j: dict) -> dict:
    """Padded mode: the rows of each document (see :func:`_rows`) and their counts."""
    tok = _tok
    acc = {"ids": [], "lens": [], "tokens": 0, "documents": len(docs), "bytes": 0}
    for body, text in zip(docs, texts):
        ids = [tok.bos_id, *body, tok.eos_id]
        rows, kept = _rows(ids, j["row_len"], j["split_long"], tok.pad_id)
        for r in rows:
            acc["ids"].extend(r)
        acc["lens"].append(len(rows) * len(rows[0]))
        acc["tokens"] += kept
        if kept < len(ids):  # truncated: count the bytes of the text that was kept
            acc["bytes"] += len(tok.decode(ids[:kept]).encode("utf-8"))
        else:
            acc["bytes"] += _utf8_len(text)
    acc["ids"] = np.asarray(acc["ids"], dtype=j["dtype"])
    acc["lens"] = np.asarray(acc["lens"], dtype=np.int64)
    return acc


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
        """Append a unit's tokens: ``part["ids"]`` (an array), or ``part["spill"]`` (where a
        worker wrote them: path, byte offset, bytes per token, tokens)."""
        if "ids" in part:
            ids = part["ids"].astype(part["ids"].dtype.newbyteorder("<"), copy=False)
            n, src = len(ids), None
        else:
            path, offset, itemsize, n = part["spill"]
            src = open(path, "rb", buffering=0) if n else None
        ends = np.cumsum(part["lens"])
        start = 0
        try:
            while start < n:
                if self._fh is None or self._in_shard >= self.shard_tokens:
                    self._open()
                # write the documents that fit before this shard is full (at least one)
                room = self.shard_tokens - self._in_shard
                first = int(np.searchsorted(ends, start, side="right"))  # the next document
                last = max(first, int(np.searchsorted(ends, start + room, side="right")) - 1)
                stop = int(ends[last])
                if src is None:
                    _write_all(self._fh.fileno(), ids[start:stop].data)
                else:
                    _copy_range(src.fileno(), offset + start * itemsize, (stop - start) * itemsize, self._fh.fileno())
                self._in_shard += stop - start
                start = stop
        finally:
            if src is not None:
                src.close()
        self.stored += n
        self.tokens += part["tokens"]
        self.documents += part["documents"]
        self.bytes += part["bytes"]

    def _open(self) -> None:
        if self._fh:
            self._fh.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        self.files.append(name)
        self._fh = open(self.out / name, "wb", buffering=0)  # whole units at a time: no buffer
        self._in_shard = 0

    def close(self) -> dict:
        if self._fh:
            self._fh.close()
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes, "shards": self.files}


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        view = view[os.write(fd, view):]


def _copy_range(src: int, offset: int, n: int, dst: int) -> None:
    """Append ``n`` bytes of file ``src`` from ``offset`` to ``dst`` (in the kernel where it can)."""
    while n > 0:
        k = 0
        if hasattr(os, "copy_file_range"):
            try:
                k = os.copy_file_range(src, dst, n, offset)
            except OSError:  # a file system or kernel without it: copy through memory
                k = 0
        if k <= 0:
            data = os.pread(src, min(n, 1 << 24), offset)
            if not data:
                raise RuntimeError("pack: a worker's token file is shorter than it said")
            _write_all(dst, data)
            k = len(data)
        offset += k
        n -= k


def _pair(n: int, d) -> tuple[str, str]:
    """(id, text) of the ``n``-th document (a plain string's id is its position)."""
    return (str(n), d) if isinstance(d, str) else (str(d.id), d.text)


def _chunks(docs: Iterable, skipped: list[int]) -> Iterator[list[tuple[str, str]]]:
    """(id, text) pairs in work units; empty documents are skipped and counted."""
    def pairs():
        for n, d in enumerate(docs):
            doc_id, text = _pair(n, d)
            if text:
                yield doc_id, text
            else:
                skipped[0] += 1

    return batched(pairs(), CHUNK_DOCS, CHUNK_BYTES, lambda pair: _size(pair[1]))


def _line_chunks(path: str | Path) -> Iterator[list[tuple[str, int, bytes]]]:
    """Raw JSON lines of a cleaned-shard dir (or file) in work units: this process only reads and
    splits lines, the workers parse them (JSON decoding was the parent's bottleneck)."""
    names: dict = {}  # one str per file: pickled once per unit
    lines = ((names.setdefault(f, str(f)), n, line) for f, n, line in iter_cleaned_lines(path))
    return batched(lines, CHUNK_DOCS, CHUNK_BYTES, lambda rec: len(rec[2]))


def _ranges(docs: Sequence, skipped: list[int], workers: int) -> list[tuple[int, int]]:
    """Work units of a list of documents as ``(start, stop)`` positions (empty documents inside are
    skipped by the worker, counted here). The whole size is known, so units shrink towards the end
    (to a quarter of the work left per worker, at least CHUNK_BYTES / 8): the workers then finish
    within a small unit of each other instead of one large one."""
    # (one pass without per-document tuples: this runs before the workers start, so it is serial time)
    sizes = list(map(_size, (d if isinstance(d, str) else d.text for d in docs)))
    skipped[0] += sizes.count(0)
    left = sum(sizes)
    units, start, count, size = [], 0, 0, 0
    target = CHUNK_BYTES
    for n, b in enumerate(sizes):
        if not b:
            continue
        count, size = count + 1, size + b
        if count >= CHUNK_DOCS or size >= target:
            units.append((start, n + 1))
            left -= size
            start, count, size = n + 1, 0, 0
            target = max(CHUNK_BYTES // 8, min(CHUNK_BYTES, left // (4 * workers)))
    if count:
        units.append((start, len(docs)))
    return units


def pack(docs: Iterable | str | Path, tokenizer_dir: str | Path, out_dir: str | Path, cfg, overwrite: bool = False,
         progress: bool = True) -> dict:
    """Tokenise ``docs`` into token shards; return meta.json's dict. ``docs`` is a cleaned-shard
    dir or .jsonl[.gz] file (read by the workers), or documents: objects with ``id`` and ``text``,
    or plain strings.

    ``cfg`` is a :class:`text2llm.config.PackConfig`. With ``cfg.workers`` > 1 the tokenising
    runs in that many processes (one thread each) while this one reads and writes.
    """
    tok = Tokenizer.load(tokenizer_dir)
    with staged_output(out_dir, overwrite) as tmp:
        return _pack_into(tmp, docs, tok, cfg, progress)


def _pack_into(tmp: Path, docs, tok, cfg, progress: bool) -> dict:
    """The work of :func:`pack`, written into the staging dir ``tmp``."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    row_len = cfg.seq_len + 1
    job = {"dtype": np.dtype(dtype).name, "seed": cfg.seed, "val_fraction": cfg.val_fraction,
           "mode": cfg.mode, "row_len": row_len, "split_long": cfg.split_long}
    writers = {s: ShardWriter(tmp, s, cfg.shard_tokens) for s in ("train", "val")}
    skipped = [0]
    bar = tqdm(desc="pack", unit=" docs", disable=not progress, mininterval=0.5)
    t0 = time.perf_counter()

    from_files = isinstance(docs, (str, Path))
    if from_files:
        cleaned_files(docs)  # a missing or empty input is an error now, before any work

    def encoded() -> Iterator[dict]:
        _set_state(tok, job)
        if cfg.workers <= 1:
            if from_files:
                yield from map(_encode_chunk, _line_chunks(docs))
            elif isinstance(docs, (list, tuple)):  # by position: no per-document pairs made here
                units = _ranges(docs, skipped, 1)
                _set_state(tok, job, docs)
                yield from map(_encode_chunk, units)
            else:
                yield from map(_encode_chunk, _chunks(docs, skipped))
            return
        # fork starts a worker at once (spawn re-imports numpy and the tokenizer backend in each
        # worker, which on a small corpus costs as much as the work); workers touch neither torch nor threads
        # of this process, so fork is safe where the platform has it. A forked worker has the
        # tokenizer already, and reads a list of documents by index (no text is pickled)
        fork = sys.platform == "linux"
        if from_files:
            units: Iterable = _line_chunks(docs)
        elif fork and isinstance(docs, (list, tuple)):
            # the units are cut before the fork: this process then touches no document the
            # workers share with it (which would copy their memory pages)
            units = _ranges(docs, skipped, cfg.workers)
            _set_state(tok, job, docs)
        else:
            units = _chunks(docs, skipped)
        ctx = get_context("fork" if fork else "spawn")
        pool_job = {**job, "spill": str(tmp)}
        with QuietPool(cfg.workers, _init_worker, (str(tok.path), pool_job), context=ctx) as pool:
            yield from bounded_imap(pool, _encode_chunk, units, 2 * cfg.workers)

    tokens = 0
    try:
        for res in encoded():
            skipped[0] += res.pop("skipped", 0)
            for split, part in res.items():
                writers[split].write(part)
                tokens += part["tokens"]
            spill = res["train"].get("spill")
            if spill:
                os.unlink(spill[0])
            bar.update(res["train"]["documents"] + res["val"]["documents"])
            bar.set_postfix_str(f"{tokens / max(1e-9, time.perf_counter() - t0):,.0f} tok/s", refresh=False)
    finally:
        _set_state()
        bar.close()
        splits = {s: w.close() for s, w in writers.items()}
    if cfg.mode == "padded":
        for s, w in writers.items():
            splits[s]["rows"] = w.stored // row_len
            splits[s]["padding"] = w.stored - w.tokens - (w.stored // row_len - w.documents if cfg.split_long else 0)
    if splits["train"]["tokens"] == 0:
        raise UserError("pack: no documents to pack (is the input empty?)")
    if cfg.val_fraction > 0 and splits["val"]["documents"] < cfg.val_min_docs:
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
    return meta


def read_meta(tokens_dir: str | Path) -> dict:
    return read_metadata(Path(tokens_dir) / META,
                          f"{tokens_dir}: not a token dir (no {META}); make one with `text2llm pack`")
