"""Documents -> token shards (``text2llm pack``).

Each document becomes ``BOS ... EOS`` and documents are written back to back into flat
little-endian ``uint16`` files (``uint32`` when the vocab needs it)::

    OUT/train-00000.bin  OUT/val-00000.bin  OUT/meta.json

The train/val split is by document and deterministic: a document goes to val when a hash of
(seed, document id) falls under ``val_fraction`` -- the same document lands in the same split on
every run and with any number of workers. ``meta.json`` records dtype, vocab size, the tokenizer
fingerprint and, per split, tokens, documents and UTF-8 bytes (for bits-per-byte).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from text2llm.errors import UserError

META = "meta.json"
_tok = None  # the tokenizer of a worker process


def _init_worker(tok_dir: str) -> None:
    global _tok
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from text2llm.tokenizer import Tokenizer

    _tok = Tokenizer.load(tok_dir)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int64) for ids in _tok.encode_batch(texts, add_bos=True, add_eos=True)]


def is_val(doc_id: str, seed: int, val_fraction: float) -> bool:
    """Deterministic split by document: hash(seed, id) -> [0, 1) < val_fraction."""
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


class ShardWriter:
    """Appends token arrays to ``{split}-00000.bin``, starting a new shard every ``shard_tokens``."""

    def __init__(self, out: Path, split: str, dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.files: list[str] = []
        self.tokens = self.documents = self.bytes = 0
        self._fh = None
        self._in_shard = 0

    def write(self, ids: np.ndarray, n_bytes: int) -> None:
        if self._fh is None or self._in_shard >= self.shard_tokens:
            self._open()
        self._fh.write(ids.astype(self.dtype).tobytes())
        self._in_shard += len(ids)
        self.tokens += len(ids)
        self.documents += 1
        self.bytes += n_bytes

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


def _chunks(docs: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def pack(docs: Iterable, tokenizer_dir: str | Path, out_dir: str | Path, cfg, overwrite: bool = False,
         progress: bool = True) -> dict:
    """Tokenise ``docs`` (objects with ``id`` and ``text``) into token shards; return meta.json's dict.

    ``cfg`` is a :class:`text2llm.config.PackConfig`. Work is done in ``cfg.workers`` processes;
    the output is the same whatever the worker count (chunks are processed in order).
    """
    from text2llm.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: output dir is not empty (pass --overwrite to replace it)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    writers = {s: ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in ("train", "val")}

    from tqdm import tqdm

    bar = tqdm(desc="pack", unit=" docs", disable=not progress, mininterval=0.5)
    t0 = time.perf_counter()
    chunks = _chunks(((d.id, d.text) for d in docs), 256)

    def encoded() -> Iterator[tuple[list, list[np.ndarray]]]:
        if cfg.workers <= 1:
            _init_worker(str(tok.path))
            for ch in chunks:
                yield ch, _encode_chunk([t for _, t in ch])
            return
        with get_context("spawn").Pool(cfg.workers, initializer=_init_worker, initargs=(str(tok.path),)) as pool:
            # imap keeps chunk order, so the output is identical for any worker count;
            # only the texts travel to the workers, the ids stay here in `sent`.
            sent: list[list] = []

            def texts():
                for ch in chunks:
                    sent.append(ch)
                    yield [t for _, t in ch]

            for ids in pool.imap(_encode_chunk, texts(), chunksize=1):
                yield sent.pop(0), ids

    for ch, ids_list in encoded():
        for (doc_id, text), ids in zip(ch, ids_list):
            split = "val" if is_val(doc_id, cfg.seed, cfg.val_fraction) else "train"
            writers[split].write(ids, len(text.encode("utf-8")))
        bar.update(len(ch))
    bar.close()
    if cfg.val_fraction > 0 and writers["val"].documents < cfg.val_min_docs:
        raise UserError(
            f"pack: only {writers['val'].documents} validation documents (pack.val_min_docs={cfg.val_min_docs}); "
            f"raise pack.val_fraction or give more documents"
        )
    splits = {s: w.close() for s, w in writers.items()}
    if splits["train"]["tokens"] == 0:
        raise UserError("pack: no documents to pack (is the input empty?)")
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
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return meta


def read_meta(tokens_dir: str | Path) -> dict:
    path = Path(tokens_dir) / META
    if not path.is_file():
        raise UserError(f"{tokens_dir}: not a token dir (no {META}); make one with `text2llm pack`")
    return json.loads(path.read_text(encoding="utf-8"))
