"""Exact and near-duplicate (MinHash-LSH) deduplication over a whole corpus.

Work is split so that the pipeline stays parallel *and* deterministic:

* In the workers, per document: :func:`exact_key` (64-bit BLAKE2b of the lower-cased,
  whitespace-collapsed text) and a MinHash signature (``bands x rows`` 32-bit minima).
* In the main process, in input order: :class:`Deduplicator` keeps the first document of each
  exact group and of each near-duplicate cluster and counts the rest.

MinHash, vectorised with numpy:

* shingles: word n-grams (default 5) from :mod:`text2llm.data.textstats`, where every CJK
  character is a word -- so Chinese gets character 5-grams, English word 5-grams;
* permutations: ``h_k(x) = ((a_k * x + b_k) mod 2^64) >> 32`` (multiply-shift hashing) with
  ``a`` odd, ``a, b`` drawn from ``numpy.random.default_rng(seed)``;
* LSH: the signature is cut into ``bands`` bands of ``rows`` values; documents sharing a band
  are candidates, and a candidate is a duplicate when the share of equal signature values (the
  Jaccard estimate) is >= ``threshold`` (0.8 by default). Keeping that check makes the cut at
  0.8 sharp whatever bands x rows is chosen.
"""

from __future__ import annotations

import hashlib

import numpy as np

from text2llm.data.config import DataConfig
from text2llm.data.textstats import BatchStats


def exact_key(text: str) -> int:
    """64-bit key of the text, insensitive to case and whitespace differences."""
    norm = " ".join(text.lower().split())
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little")


class MinHasher:
    """Computes ``bands * rows`` MinHash values of a document's shingles."""

    def __init__(self, cfg: DataConfig):
        self.n = cfg.word_ngram
        rng = np.random.default_rng(cfg.seed)
        p = cfg.num_perm
        self.a = (rng.integers(0, 2**63, size=(p, 1), dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=(p, 1), dtype=np.uint64)

    def from_shingles(self, sh: np.ndarray) -> np.ndarray:
        """uint32 signature of a set of uint64 shingle hashes."""
        out = np.full(len(self.a), np.iinfo(np.uint32).max, dtype=np.uint32)
        step = 2048  # keep the (num_perm, step) block in cache
        with np.errstate(over="ignore"):
            for i in range(0, len(sh), step):
                h = self.a * sh[i : i + step]  # (P, S), wraps mod 2^64
                h += self.b
                h >>= np.uint64(32)
                np.minimum(out, h.min(axis=1), out=out, casting="unsafe")
        return out

    def batch_signatures(self, batch: BatchStats, docs: list[int]) -> np.ndarray:
        """Signatures ``(len(docs), P)`` of documents of ``batch``, several documents per numpy call."""
        out = np.empty((len(docs), len(self.a)), dtype=np.uint32)
        i = 0
        while i < len(docs):
            group, parts, size = [], [], 0
            while i < len(docs) and (not group or size + len(batch.shingles(docs[i], self.n)) <= 4096):
                sh = batch.shingles(docs[i], self.n)
                group.append(i)
                parts.append(sh)
                size += len(sh)
                i += 1
            if len(group) == 1:
                out[group[0]] = self.from_shingles(parts[0])
                continue
            cols = np.concatenate(parts)
            starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])[:-1]])
            with np.errstate(over="ignore"):
                h = self.a * cols
                h += self.b
                h >>= np.uint64(32)
            out[group] = np.minimum.reduceat(h, starts, axis=1).T
        return out

    def band_keys(self, sigs: np.ndarray, bands: int) -> np.ndarray:
        """``(N, bands)`` uint64 keys, one per band of each signature (equal band -> equal key)."""
        rows = sigs.shape[1] // bands
        coef = (np.random.default_rng(12345).integers(0, 2**63, size=rows, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        with np.errstate(over="ignore"):
            return (sigs.reshape(len(sigs), bands, rows).astype(np.uint64) * coef).sum(axis=2, dtype=np.uint64)

    def signature(self, text: str, batch: BatchStats | None = None, index: int = 0) -> np.ndarray:
        """Signature of ``text`` (or of document ``index`` of an already computed ``batch``)."""
        batch = batch if batch is not None else BatchStats([text])
        return self.from_shingles(batch.shingles(index, self.n))


class Deduplicator:
    """Order-dependent dedup state, used in one process: first seen wins.

    ``check(key, bands, sig)`` returns None for a new document (and remembers it), or
    ``"dedup:exact"`` / ``"dedup:near"``. Memory per kept document: one set entry, ``bands`` dict
    entries and a ``bands x rows`` uint32 signature row.
    """

    def __init__(self, cfg: DataConfig):
        self.bands, self.threshold = cfg.minhash_bands, cfg.minhash_threshold
        self.seen: set[int] = set()
        self.index: list[dict[int, int]] = [dict() for _ in range(self.bands)]
        self.sigs = np.zeros((1024, cfg.num_perm), dtype=np.uint32)
        self.n = 0

    def check(self, key: int, bands: list[int] | None, sig: np.ndarray | None) -> str | None:
        if key in self.seen:
            return "dedup:exact"
        self.seen.add(key)
        if sig is None:
            return None
        need = self.threshold * len(sig)
        for idx, bk in zip(self.index, bands):
            j = idx.get(bk)
            if j is not None and np.count_nonzero(self.sigs[j] == sig) >= need:
                return "dedup:near"
        if self.n == len(self.sigs):
            self.sigs = np.concatenate([self.sigs, np.zeros_like(self.sigs)])
        self.sigs[self.n] = sig
        for idx, bk in zip(self.index, bands):
            idx.setdefault(bk, self.n)
        self.n += 1
        return None
