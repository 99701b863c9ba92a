"""Word-level statistics of a *batch* of documents, vectorised with numpy.

Quality filters and MinHash both need every document's words, word hashes and n-gram hashes.
Computing them per document in Python costs ~1 us per word; here one pass over the code
points of the whole batch does it, so the per-document overhead is a few numpy slices.

Tokenisation (the same for filters and dedup):

* a *word* is a run of letters/digits (``str.isalnum``) of the lower-cased text, except that
  every CJK character (Han, kana, hangul) is a word on its own -- the CJK equivalent of a
  whitespace word, so word-count rules work for Chinese;
* a *token* is a whitespace-separated run (Gopher's notion of word), used only for the share
  of tokens that contain a letter.

Word hashes are 64-bit polynomial hashes of the code points with a splitmix finaliser; n-gram
hashes combine ``n`` consecutive word hashes of the same document.
"""

from __future__ import annotations

import numpy as np

_U = np.uint64
_P = _U(0x100000001B3)
_CJK_RANGES = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0x20000, 0x2FFFD))
_TABLES: dict[str, np.ndarray] = {}
_MAXLEN_PPOW = 1 << 16


_NCP = 0x30000  # table size: BMP, SMP, and the CJK extension plane; higher code points map to the last entry


def _tables() -> dict[str, np.ndarray]:
    """Code point -> bool lookup tables (built once per process, ~0.1 s)."""
    if not _TABLES:
        chars = [chr(i) for i in range(0x20000)]
        tabs = {}
        for name, test in (("word", str.isalnum), ("alpha", str.isalpha), ("space", str.isspace)):
            tab = np.zeros(_NCP, dtype=bool)
            tab[:0x20000] = np.fromiter(map(test, chars), dtype=bool, count=0x20000)
            tabs[name] = tab
        tabs["word"][0x20000:0x2FFFE] = tabs["alpha"][0x20000:0x2FFFE] = True  # CJK extensions B-F
        cjk = np.zeros(_NCP, dtype=bool)
        for lo, hi in _CJK_RANGES:
            cjk[lo : hi + 1] = True
        tabs["cjk"] = cjk
        with np.errstate(over="ignore"):
            tabs["ppow"] = np.cumprod(np.full(_MAXLEN_PPOW, 0x9E3779B97F4A7C15, dtype=np.uint64))
        _TABLES.update(tabs)
    return _TABLES


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads polynomial hashes over all 64 bits."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> _U(30))
        h *= _U(0xBF58476D1CE4E5B9)
        h ^= h >> _U(27)
        h *= _U(0x94D049BB133111EB)
        h ^= h >> _U(31)
    return h


def _shifted(a: np.ndarray, fill=False) -> np.ndarray:
    out = np.empty_like(a)
    out[0] = fill
    out[1:] = a[:-1]
    return out


def word_hashes(words: list[str]) -> np.ndarray:
    """Hashes of single words with the same function as :class:`BatchStats` (for stop-word lists)."""
    return np.sort(BatchStats([" ".join(words)]).whash)


class BatchStats:
    """Words, word hashes and per-document word ranges for ``texts``.

    Arrays over all words of the batch: ``whash`` (uint64), ``wlen`` (int64 characters),
    ``wdoc`` (document index). ``bounds[d]:bounds[d+1]`` is document ``d``'s word range.
    Per document: ``n_words``, ``word_chars``, ``cjk_words``, ``n_tokens``, ``alpha_tokens``.
    """

    def __init__(self, texts: list[str]):
        t = _tables()
        self.n_docs = len(texts)
        lows = [s.lower() for s in texts]
        lens = np.fromiter((len(s) + 1 for s in lows), dtype=np.int64, count=len(lows))
        doc_start = np.concatenate([[0], np.cumsum(lens)])  # char offset of each doc (+ "\n" separator)
        cp = np.frombuffer(("\n".join(lows) + "\n").encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        if len(cp) and cp.max() >= _NCP:
            cp = np.minimum(cp, _NCP - 1)
        self.cp = cp
        isw = t["word"][cp]
        cjk = t["cjk"][cp] & isw
        start = isw & (~_shifted(isw) | cjk | _shifted(cjk))
        starts = np.flatnonzero(start)
        nw = len(starts)
        word_chars = np.flatnonzero(isw)
        wid = np.cumsum(start)[word_chars] - 1
        self.wlen = np.bincount(wid, minlength=nw).astype(np.int64)
        offs = np.concatenate([[0], np.cumsum(self.wlen)[:-1]]) if nw else np.zeros(0, dtype=np.int64)
        pos = np.minimum(word_chars - starts[wid], _MAXLEN_PPOW - 1)
        with np.errstate(over="ignore"):
            contrib = (cp[word_chars].astype(np.uint64) + _U(1)) * t["ppow"][pos]
            h = np.add.reduceat(contrib, offs) if nw else np.zeros(0, dtype=np.uint64)
        self.whash = _mix(h.astype(np.uint64) + self.wlen.astype(np.uint64))
        self.wdoc = np.searchsorted(doc_start, starts, side="right") - 1
        self.bounds = np.searchsorted(self.wdoc, np.arange(self.n_docs + 1))
        self.n_words = np.diff(self.bounds)
        self.word_chars = np.bincount(self.wdoc, weights=self.wlen, minlength=self.n_docs)
        self.cjk_words = np.bincount(self.wdoc, weights=cjk[starts], minlength=self.n_docs).astype(np.int64)
        self._cp, self._doc_start = cp, doc_start
        self._cache: dict = {}

    def _tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """Per doc: whitespace tokens (Gopher's words) and how many of them hold a letter."""
        t, cp = _tables(), self._cp
        nsp = ~t["space"][cp]
        first = nsp & ~_shifted(nsp)
        tstart = np.flatnonzero(first)
        if not len(tstart):
            return np.zeros(self.n_docs), np.zeros(self.n_docs)
        tdoc = np.searchsorted(self._doc_start, tstart, side="right") - 1
        tid = np.cumsum(first)[np.flatnonzero(nsp)] - 1
        has_alpha = np.bincount(tid, weights=t["alpha"][cp[nsp]], minlength=len(tstart)) > 0
        return np.bincount(tdoc, minlength=self.n_docs), np.bincount(tdoc, weights=has_alpha, minlength=self.n_docs)

    @property
    def n_tokens(self) -> np.ndarray:
        return self.cached("tokens", self._tokens)[0]

    @property
    def alpha_tokens(self) -> np.ndarray:
        return self.cached("tokens", self._tokens)[1]

    def _members(self, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per doc: (words found in the sorted hash ``table``, distinct such words)."""
        if not len(self.whash):
            return np.zeros(self.n_docs, dtype=np.int64), np.zeros(self.n_docs, dtype=np.int64)
        pos = np.minimum(np.searchsorted(table, self.whash), len(table) - 1)
        hit = table[pos] == self.whash
        count = np.bincount(self.wdoc[hit], minlength=self.n_docs)
        distinct = np.unique(self.wdoc[hit] * len(table) + pos[hit]) // len(table)
        return count, np.bincount(distinct, minlength=self.n_docs)

    def members(self, name: str, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cached :meth:`_members` for a named word list (``table`` sorted uint64 hashes)."""
        return self.cached(("members", name), self._members, table)

    def cached(self, key, fn, *args):
        """``fn(*args)``, computed once per batch."""
        if key not in self._cache:
            self._cache[key] = fn(*args)
        return self._cache[key]

    # ---- n-grams ------------------------------------------------------------------------

    def ngrams(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(hashes, first_word_index)`` of every n-gram that lies inside one document."""
        key = ("ng", n)
        if key not in self._cache:
            nw = len(self.whash)
            if nw < n:
                self._cache[key] = (np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64))
            else:
                idx = np.flatnonzero(self.wdoc[: nw - n + 1] == self.wdoc[n - 1 :])
                with np.errstate(over="ignore"):
                    g = self.whash[idx].copy()
                    for k in range(1, n):
                        g = g * _P + self.whash[idx + k]
                self._cache[key] = (_mix(g), idx)
        return self._cache[key]

    def top_ngram_frac(self, n: int) -> np.ndarray:
        """Per doc: characters covered by its most frequent n-gram (if repeated) / word characters."""
        g, idx = self.ngrams(n)
        top = np.zeros(self.n_docs)
        if len(g):
            cs = np.concatenate([[0], np.cumsum(self.wlen)])
            glen = np.minimum(cs[idx + n] - cs[idx], 255).astype(np.uint64)
            doc = self.wdoc[idx].astype(np.uint64)
            key = np.sort((doc << _U(44)) | ((g >> _U(28)) << _U(8)) | glen)
            edge = np.flatnonzero(np.diff(key)) + 1
            run_start = np.concatenate([[0], edge])
            counts = np.diff(np.concatenate([run_start, [len(key)]]))
            rep = counts > 1
            rk = key[run_start[rep]]
            np.maximum.at(top, (rk >> _U(44)).astype(np.int64), counts[rep] * (rk & _U(255)).astype(np.int64))
        return top / np.maximum(self.word_chars, 1)

    def dup_ngram_frac(self, n: int) -> np.ndarray:
        """Per doc: characters of words inside an n-gram seen earlier in the doc / word characters."""
        g, idx = self.ngrams(n)
        nw = len(self.whash)
        if not len(g):
            return np.zeros(self.n_docs)
        key = (self.wdoc[idx].astype(np.uint64) << _U(44)) | (g >> _U(20))
        order = np.argsort(key, kind="stable")
        ks = key[order]
        starts = idx[order[1:][ks[1:] == ks[:-1]]]
        diff = np.bincount(starts, minlength=nw + n + 1) - np.bincount(starts + n, minlength=nw + n + 1)
        covered = np.cumsum(diff)[:nw] > 0
        dup = np.bincount(self.wdoc, weights=self.wlen * covered, minlength=self.n_docs)
        return dup / np.maximum(self.word_chars, 1)

    def shingles(self, d: int, n: int) -> np.ndarray:
        """Document ``d``'s word n-gram hashes (all its words as one shingle when it has fewer)."""
        g, idx = self.ngrams(n)
        lo, hi = self.bounds[d], self.bounds[d + 1]
        if hi - lo >= n:
            seg = self.cached(("seg", n), np.searchsorted, idx, self.bounds)  # each doc's first n-gram
            return g[seg[d] : seg[d + 1]]
        with np.errstate(over="ignore"):
            h = _U(0)
            for x in self.whash[lo:hi]:
                h = h * _P + x
        return _mix(np.array([h], dtype=np.uint64))
