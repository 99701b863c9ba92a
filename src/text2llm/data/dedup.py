"""Exact and near-duplicate (MinHash-LSH) deduplication over a whole corpus.

Work is split so that the pipeline stays parallel *and* deterministic:

* In the workers, per document: :func:`exact_key` (64-bit BLAKE2b of the lower-cased,
  whitespace-collapsed text) and :meth:`MinHasher.signature` (``bands x rows`` 32-bit minima).
* In the main process, in input order: :class:`Deduplicator` keeps the first document of each
  exact group and of each near-duplicate cluster and counts the rest.

MinHash, vectorised with numpy (no per-shingle Python loop beyond hashing words):

* shingles: word n-grams (default 5) of ``\\w+`` tokens, or character n-grams (default 5) of the
  text without spaces and punctuation for CJK (``shingle="auto"`` picks char when >= 30% of the
  letters are CJK). A shingle's 64-bit hash combines its tokens' CRC32 values polynomially.
* permutations: ``h_k(x) = (a_k * x + b_k) mod 2^64 >> 32`` with fixed random odd ``a_k``
  (multiply-shift hashing), ``a, b`` drawn from ``numpy.random.default_rng(seed)``.
* LSH: the signature is cut into ``bands`` bands of ``rows`` values; documents sharing any band
  are candidates, and a candidate counts as a duplicate when the share of equal signature values
  (the Jaccard estimate) is >= ``threshold`` (0.8 by default).
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

from text2llm.data.config import DataConfig

_WORD_RE = re.compile(r"\w+")
_NON_WORD_RE = re.compile(r"[\W_]+")
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def exact_key(text: str) -> int:
    """64-bit key of the text, insensitive to case and whitespace differences."""
    norm = " ".join(text.lower().split())
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little")


def is_cjk_text(text: str, sample: int = 2000) -> bool:
    """True when at least 30% of the first ``sample`` word characters are CJK."""
    head = _NON_WORD_RE.sub("", text[:sample])
    return bool(head) and len(_CJK_RE.findall(head)) >= 0.3 * len(head)


class MinHasher:
    """Computes ``num_perm`` MinHash values of a document's shingles."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        n = cfg.num_perm
        self.a = (rng.integers(0, 2**63, size=(n, 1), dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=(n, 1), dtype=np.uint64)
        self._poly = np.uint64(0x100000001B3)  # FNV prime, combines token hashes into a shingle hash

    def _combine(self, tok: np.ndarray, n: int) -> np.ndarray:
        """Hashes of all windows of ``n`` consecutive token hashes (one per shingle)."""
        if len(tok) <= n:
            n = max(len(tok), 1)
        with np.errstate(over="ignore"):
            h = tok[: len(tok) - n + 1].copy()
            for k in range(1, n):
                h = h * self._poly + tok[k : len(tok) - n + 1 + k]
        return h

    def shingle_hashes(self, text: str) -> np.ndarray:
        """uint64 hashes of the document's shingles (word or character n-grams)."""
        mode = self.cfg.shingle
        if mode == "auto":
            mode = "char" if is_cjk_text(text) else "word"
        if mode == "word":
            words = _WORD_RE.findall(text.lower())
            tok = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
            n = self.cfg.word_ngram
        else:
            chars = _NON_WORD_RE.sub("", text.lower())
            tok = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
            tok = tok * np.uint64(0x9E3779B97F4A7C15)  # spread code points over 64 bits
            n = self.cfg.char_ngram
        if len(tok) == 0:
            return np.zeros(1, dtype=np.uint64)
        return np.unique(self._combine(tok, n))

    def signature(self, text: str) -> np.ndarray:
        """uint32 MinHash signature of length ``bands * rows``."""
        sh = self.shingle_hashes(text)
        out = np.full(len(self.a), np.iinfo(np.uint32).max, dtype=np.uint32)
        step = 4096  # keep the (num_perm, step) block in cache
        with np.errstate(over="ignore"):
            for i in range(0, len(sh), step):
                blk = sh[i : i + step]
                h = self.a * blk  # (P, S) uint64, wraps mod 2^64
                h += self.b
                h >>= np.uint64(32)
                np.minimum(out, h.min(axis=1).astype(np.uint32), out=out)
        return out


class Deduplicator:
    """Order-dependent dedup state, used in one process: first seen wins.

    ``check(key, sig)`` returns None for a new document (and remembers it), or ``"dedup:exact"`` /
    ``"dedup:near"``. Memory: one set entry per kept document, ``bands`` dict entries and a
    ``bands x rows`` uint32 signature row per kept document.
    """

    def __init__(self, cfg: DataConfig):
        self.bands, self.rows, self.threshold = cfg.minhash_bands, cfg.minhash_rows, cfg.minhash_threshold
        self.seen: set[int] = set()
        self.index: list[dict[int, int]] = [dict() for _ in range(self.bands)]
        self.sigs = np.zeros((1024, cfg.num_perm), dtype=np.uint32)
        self.n = 0

    def check(self, key: int, sig: np.ndarray | None) -> str | None:
        if key in self.seen:
            return "dedup:exact"
        self.seen.add(key)
        if sig is None:
            return None
        bands = sig.reshape(self.bands, self.rows)
        band_keys = [hash(bands[i].tobytes()) for i in range(self.bands)]  # per-process hash: fine here
        for i, bk in enumerate(band_keys):
            j = self.index[i].get(bk)
            if j is not None and np.count_nonzero(self.sigs[j] == sig) >= self.threshold * len(sig):
                return "dedup:near"
        if self.n == len(self.sigs):
            self.sigs = np.concatenate([self.sigs, np.zeros_like(self.sigs)])
        self.sigs[self.n] = sig
        for i, bk in enumerate(band_keys):
            self.index[i].setdefault(bk, self.n)
        self.n += 1
        return None
