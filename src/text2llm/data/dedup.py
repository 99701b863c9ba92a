"""Exact and near-duplicate (MinHash-LSH) deduplication over a whole corpus.

Work is split so that the pipeline stays parallel *and* deterministic:

* In the workers, per document: :func:`exact_key` (64-bit BLAKE2b of the lower-cased,
  whitespace-collapsed text) and a MinHash signature (``bands x rows`` 32-bit minima).
* In the main process, in input order: :class:`Deduplicator` keeps the first document of each
  exact group and of each near-duplicate cluster and counts the rest.

MinHash, vectorised with numpy:

* shingles: word n-grams (default 5) from :mod:`text2llm.data.textstats`, where every CJK
  character is a word -- so Chinese gets character 5-grams, English word 5-grams;
* one-permutation hashing with rotation densification (see :class:`MinHasher`), seeded by ``seed``;
* LSH: the signature is cut into ``bands`` bands of ``rows`` values; documents sharing a band
  are candidates, and a candidate is a duplicate when the share of equal signature values (the
  Jaccard estimate) is >= ``threshold`` (0.8 by default). Keeping that check makes the cut at
  0.8 sharp whatever bands x rows is chosen.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from itertools import repeat

import numpy as np

from text2llm.data.config import DataConfig
from text2llm.data.textstats import BatchStats, _mix


_ASCII_OTHER_SPACE_RE = re.compile("[\t\x0b\x0c\r\x1c-\x1f]")


def exact_key(text: str, low: str | None = None, plain: bool = False) -> int:
    """64-bit key of the text, insensitive to case and whitespace differences.

    The key is the hash of ``" ".join(text.lower().split())``. Normalised text (ASCII, single
    spaces, single or double newlines, stripped) needs no split: replacing its newlines gives
    the same string.
    """
    if low is None:  # (callers that have ``text.lower()`` at hand pass it, and maybe ``plain``: the tests below hold)
        low = text.lower()
    if plain or (
        low.isascii()
        and "  " not in low and " \n" not in low and "\n " not in low and "\n\n\n" not in low
        and low[:1] not in " \n" and low[-1:] not in " \n" and not _ASCII_OTHER_SPACE_RE.search(low)
    ):
        norm = low.replace("\n\n", " ").replace("\n", " ")
    else:
        norm = " ".join(low.split())
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little")


class MinHasher:
    """MinHash signatures of ``bands * rows`` values by one-permutation hashing (OPH).

    Classic MinHash hashes every shingle ``P`` times (``P`` = bands x rows = 112 by default),
    which made it the most expensive step of the pipeline. OPH hashes each shingle once: the
    hash's high bits pick one of ``P`` bins, its low 32 bits are the value, and each bin keeps
    its minimum. Empty bins (documents with few shingles) are filled by rotation densification
    (Shrivastava & Li, ICML 2014): an empty bin takes the value of the next non-empty bin to its
    right, offset by the distance. For two documents, P(bin values equal) is their Jaccard
    similarity, as with classic MinHash, so LSH banding and the Jaccard estimate work unchanged.
    """

    _OFFSET = np.uint64(0x9E3779B1)  # added per bin of rotation distance (mod 2^32)

    def __init__(self, cfg: DataConfig):
        self.n = cfg.word_ngram
        self.p = cfg.num_perm
        self.salt = np.uint64(np.random.default_rng(cfg.seed).integers(0, 2**63, dtype=np.uint64))

    def batch_signatures(self, batch: BatchStats, docs: list[int]) -> np.ndarray:
        """uint32 signatures ``(len(docs), P)`` of documents ``docs`` of ``batch``."""
        p = self.p
        sh, sizes = batch.shingle_rows(docs, self.n)
        h = _mix64(sh ^ self.salt)
        row = np.repeat(np.arange(len(docs)), sizes)
        bins = ((h >> np.uint64(32)) * np.uint64(p)) >> np.uint64(32)
        vals = (h & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        sig = np.full(len(docs) * p, np.iinfo(np.uint32).max, dtype=np.uint32)
        filled = np.zeros(len(docs) * p, dtype=bool)
        flat = row * p + bins.astype(np.int64)
        np.minimum.at(sig, flat, vals)
        filled[flat] = True
        sig, filled = sig.reshape(len(docs), p), filled.reshape(len(docs), p)
        if not filled.all():
            # nearest filled bin at or after each position, circularly (positions 0..2P-1)
            pos = np.where(np.concatenate([filled, filled], axis=1), np.arange(2 * p), 4 * p)
            nearest = np.minimum.accumulate(pos[:, ::-1], axis=1)[:, ::-1][:, :p]
            ok = nearest < 4 * p  # rows with no shingle at all keep the max value
            src = np.where(ok, nearest % p, 0)
            dist = np.where(ok, nearest - np.arange(p), 0).astype(np.uint64)
            dense = ((sig[np.arange(len(docs))[:, None], src].astype(np.uint64) + dist * self._OFFSET) & np.uint64(0xFFFFFFFF))
            sig = np.where(filled | ~ok, sig, dense.astype(np.uint32))
        return sig

    def band_keys(self, sigs: np.ndarray, bands: int) -> np.ndarray:
        """``(N, bands)`` uint64 keys, one per band of each signature: equal band at the same band
        index -> equal key; each band index has its own salt, so that one dict holds them all."""
        rows = sigs.shape[1] // bands
        rng = np.random.default_rng(12345)
        coef = (rng.integers(0, 2**63, size=rows, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        salt = rng.integers(0, 2**63, size=bands, dtype=np.uint64)
        with np.errstate(over="ignore"):
            return (sigs.reshape(len(sigs), bands, rows).astype(np.uint64) * coef).sum(axis=2, dtype=np.uint64) ^ salt

    def signature(self, text: str, batch: BatchStats | None = None, index: int = 0) -> np.ndarray:
        """Signature of ``text`` (or of document ``index`` of an already computed ``batch``)."""
        batch = batch if batch is not None else BatchStats([text])
        return self.batch_signatures(batch, [index])[0]


def _mix64(h: np.ndarray) -> np.ndarray:
    return _mix(h)


class Deduplicator:
    """Order-dependent dedup state, used in one process: first seen wins.

    ``check(key, bands, sig)`` returns None for a new document (and remembers it), or
    ``"dedup:exact"`` / ``"dedup:near"``. ``bands`` are the signature's band keys (salted per
    band index, :meth:`MinHasher.band_keys`), ``sig`` its uint32 bytes as the workers send them
    (looked at only when a band matches). Memory per kept document: one set entry, ``bands``
    dict entries and the signature's bytes.
    """

    def __init__(self, cfg: DataConfig):
        self.threshold = cfg.minhash_threshold
        self.seen: set[int] = set()
        self.index: dict[int, int] = {}  # band key -> first kept document with that band
        self.sigs: list[bytes] = []

    def check(self, key: int, bands: list[int] | None, sig: bytes | None) -> str | None:
        if key in self.seen:
            return "dedup:exact"
        self.seen.add(key)
        if sig is None:
            return None
        n = len(self.sigs)
        if self.index.keys().isdisjoint(bands):  # (a loop in C: most documents share no band)
            self.index.update(zip(bands, repeat(n)))
        else:
            mine = np.frombuffer(sig, dtype=np.uint32)
            need = self.threshold * len(mine)
            for bk in bands:
                j = self.index.get(bk)
                if j is not None and np.count_nonzero(np.frombuffer(self.sigs[j], dtype=np.uint32) == mine) >= need:
                    return "dedup:near"
            deque(map(self.index.setdefault, bands, repeat(n, len(bands))), maxlen=0)
        self.sigs.append(sig)
        return None
