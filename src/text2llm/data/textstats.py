"""Word-level statistics of a *batch* of documents, vectorised with numpy.

Quality filters and MinHash both need every document's words, word hashes and n-gram hashes.
Computing them per document in Python costs a Python step per word; here one pass over the code
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
_K = 0x9E3779B97F4A7C15  # odd, so invertible mod 2^64
_CJK_RANGES = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0x20000, 0x2FFFD))
_TABLES: dict[str, np.ndarray] = {}
_MAXLEN_PPOW = 1 << 16
_POW_CACHE_MAX = 1 << 20  # position power tables up to this many characters are kept between batches
_NCP = 0x30000  # table size: BMP, SMP, and the CJK extension plane; higher code points map to the last entry

# bits of the per-code-point ``flags`` table
WORD, ALPHA, SPACE, CJK = 1, 2, 4, 8


def _tables() -> dict[str, np.ndarray]:
    """Code point -> class lookup tables (built once per process).

    ``flags`` (uint8) holds the bits ``WORD`` (``str.isalnum``, and CJK extensions B-F),
    ``ALPHA``, ``SPACE`` and ``CJK`` (a word character in the Han/kana/hangul ranges).
    """
    if not _TABLES:
        chars = [chr(i) for i in range(0x20000)]
        flags = np.zeros(_NCP, dtype=np.uint8)
        for bit, test in ((WORD, str.isalnum), (ALPHA, str.isalpha), (SPACE, str.isspace)):
            flags[:0x20000] |= np.fromiter(map(test, chars), dtype=bool, count=0x20000).astype(np.uint8) * np.uint8(bit)
        flags[0x20000:0x2FFFE] |= WORD | ALPHA  # CJK extensions B-F
        for lo, hi in _CJK_RANGES:
            seg = flags[lo : hi + 1]
            seg |= (seg & WORD) * np.uint8(CJK // WORD)
        _TABLES["flags"] = flags
        with np.errstate(over="ignore"):
            _TABLES["ppow"] = np.cumprod(np.full(_MAXLEN_PPOW, _K, dtype=np.uint64))
    return _TABLES


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(K^(i+1), K^-i)`` mod 2^64 for ``i < n`` (cached up to ``_POW_CACHE_MAX``)."""
    have = _TABLES.get("kpow")
    if have is not None and len(have) >= n:
        return have, _TABLES["kinv"]
    size = max(1 << max(n - 1, 1).bit_length(), 1024)
    with np.errstate(over="ignore"):
        kpow = np.cumprod(np.full(size, _K, dtype=np.uint64))
        kinv = np.empty(size, dtype=np.uint64)
        kinv[0] = 1
        kinv[1:] = np.cumprod(np.full(size - 1, pow(_K, -1, 1 << 64), dtype=np.uint64))
    if size <= _POW_CACHE_MAX:
        _TABLES["kpow"], _TABLES["kinv"] = kpow, kinv
    return kpow, kinv


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
    """``a`` moved one place right (``out[i] = a[i-1]``), ``fill`` first."""
    out = np.empty_like(a)
    out[0] = fill
    out[1:] = a[:-1]
    return out


def _next(a: np.ndarray, fill=False) -> np.ndarray:
    """``a`` moved one place left (``out[i] = a[i+1]``), ``fill`` last."""
    out = np.empty_like(a)
    out[-1] = fill
    out[:-1] = a[1:]
    return out


def word_hashes(words: list[str]) -> np.ndarray:
    """Hashes of single words with the same function as :class:`BatchStats` (for stop-word lists)."""
    return np.sort(BatchStats([" ".join(words)]).whash)


_SLOTS: dict[bytes, tuple] = {}


def _slot_table(table: np.ndarray) -> tuple[np.uint64, np.ndarray, np.ndarray]:
    """A direct-mapped lookup table for the hash list ``table``: ``(mask, keys, ids)``.

    ``keys[h & mask] == h`` exactly when ``h`` is in ``table``, and then ``ids[h & mask]`` is its
    index: the mask is the smallest one under which the entries' low bits are all different, and
    an empty slot ``s`` holds ``s ^ 1``, which no hash with low bits ``s`` can equal.
    """
    got = _SLOTS.get(table.tobytes())
    if got is None:
        table = np.asarray(table, dtype=np.uint64)
        for bits in range(max(len(table), 1).bit_length(), 64):
            mask = np.uint64((1 << bits) - 1)
            slot = (table & mask).astype(np.intp)
            ordered = np.sort(slot)  # (np.unique would import numpy.ma, once per process)
            if not (ordered[1:] == ordered[:-1]).any():
                break
        keys = np.arange(1 << bits, dtype=np.uint64) ^ np.uint64(1)
        keys[slot] = table
        ids = np.zeros(1 << bits, dtype=np.intp)
        ids[slot] = np.arange(len(table))
        got = _SLOTS[table.tobytes()] = (mask, keys, ids)
    return got


class BatchStats:
    """Words, word hashes and per-document word ranges for ``texts``.

    Arrays over all words of the batch: ``whash`` (uint64), ``wlen`` (int64 characters),
    ``wdoc`` (document index). ``bounds[d]:bounds[d+1]`` is document ``d``'s word range.
    Per document: ``n_words``, ``word_chars``, ``cjk_words``, ``n_tokens``, ``alpha_tokens``, ``alpha_words``;
    ``lower[d]`` is the lower-cased text.

    A word's hash is ``mix(sum_j (c_j + 1) * K^(j+1) + len)`` over its code points ``c_j``. It is
    computed from one prefix sum over the batch: with ``W_i = (c_i + 1) * K^(i+1)`` at batch
    position ``i``, the word starting at ``s`` has ``K^-s * (W_s + ... + W_e)`` (``K`` is odd,
    hence invertible mod 2^64).
    """

    def __init__(self, texts: list[str]):
        t = _tables()
        self.n_docs = len(texts)
        self.texts = texts
        self.lower = lows = [s.lower() for s in texts]
        lens = np.fromiter(map(len, lows), dtype=np.int64, count=len(lows)) + 1
        doc_start = np.zeros(self.n_docs + 1, dtype=np.int64)
        np.cumsum(lens, out=doc_start[1:])  # char offset of each doc (+ "\n" separator)
        self.joined_lower = "\n".join(lows) + "\n"
        cp = np.frombuffer(self.joined_lower.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        if len(cp) and cp.max() >= _NCP:
            cp = np.minimum(cp, _NCP - 1)
        flags = t["flags"].take(cp)
        isw = (flags & WORD).view(bool)
        cjk = (flags & CJK).astype(bool)
        brk = ~isw | cjk  # a word cannot continue across this character
        starts = np.flatnonzero(isw & (_shifted(brk, True) | cjk))
        ends = np.flatnonzero(isw & (_next(brk, True) | cjk))
        nw = len(starts)
        self._wstart = starts
        self.wlen = ends - starts + 1
        kpow, kinv = _powers(len(cp))
        with np.errstate(over="ignore"):
            w = (cp + np.uint32(1)).astype(np.uint64)
            w *= kpow[: len(cp)]
            csum = np.zeros(len(cp) + 1, dtype=np.uint64)
            np.cumsum(w, out=csum[1:])  # a word is a run of word characters: no need to mask the rest
            h = csum[ends + 1] - csum[starts]
            h *= kinv[starts]
            long = np.flatnonzero(self.wlen > _MAXLEN_PPOW)
            for k in long:  # positions past 2^16 in a word reuse the last power (rare; kept for stable hashes)
                pos = np.minimum(np.arange(self.wlen[k]), _MAXLEN_PPOW - 1)
                h[k] = ((cp[starts[k] : ends[k] + 1].astype(np.uint64) + _U(1)) * t["ppow"][pos]).sum(dtype=np.uint64)
            self.whash = _mix(h + self.wlen.astype(np.uint64))
        self.bounds = np.searchsorted(starts, doc_start)
        self.n_words = np.diff(self.bounds)
        self.wdoc = np.repeat(np.arange(self.n_docs), self.n_words)
        self.wlen_cumsum = np.zeros(nw + 1, dtype=np.int64)
        np.cumsum(self.wlen, out=self.wlen_cumsum[1:])
        self.word_chars = np.diff(self.wlen_cumsum[self.bounds]).astype(np.float64)
        cjk_cum = np.concatenate([[0], np.cumsum(cjk[starts])])
        self.cjk_words = np.diff(cjk_cum[self.bounds])
        self._flags, self._doc_start, self._cp = flags, doc_start, cp
        self._cache: dict = {}

    def _tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """Per doc: whitespace tokens (Gopher's words) and how many of them hold a letter."""
        flags = self._flags
        nsp = (flags & SPACE) == 0
        tstart = np.flatnonzero(nsp & ~_shifted(nsp, False))
        if not len(tstart):
            return np.zeros(self.n_docs), np.zeros(self.n_docs)
        # a token's segment runs to the next token's start; the characters in between are spaces
        has_alpha = np.logical_or.reduceat((flags & ALPHA).view(bool), tstart)
        tb = np.searchsorted(tstart, self._doc_start)
        alpha_cum = np.concatenate([[0], np.cumsum(has_alpha)])
        return np.diff(tb), np.diff(alpha_cum[tb]).astype(np.float64)

    def _alpha_words(self) -> np.ndarray:
        """Per doc: words (as in ``n_words``: CJK characters one by one) holding a letter."""
        alpha = (self._flags & ALPHA).view(bool)
        cum = np.zeros(len(alpha) + 1, dtype=np.int64)
        np.cumsum(alpha, out=cum[1:])
        has = cum[self._wstart + self.wlen] > cum[self._wstart]
        has_cum = np.zeros(len(has) + 1, dtype=np.int64)
        np.cumsum(has, out=has_cum[1:])
        return np.diff(has_cum[self.bounds])

    @property
    def alpha_words(self) -> np.ndarray:
        """Per doc: words that hold a letter (not digits only); for CJK text, Gopher's "words
        with an alphabetic character" counted over characters."""
        return self.cached("alpha_words", self._alpha_words)

    @property
    def n_tokens(self) -> np.ndarray:
        return self.cached("tokens", self._tokens)[0]

    @property
    def alpha_tokens(self) -> np.ndarray:
        return self.cached("tokens", self._tokens)[1]

    def _members(self, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per doc: (words found in the sorted hash ``table``, distinct such words)."""
        if not len(self.whash) or not len(table):
            return np.zeros(self.n_docs, dtype=np.int64), np.zeros(self.n_docs, dtype=np.int64)
        mask, keys, ids = _slot_table(table)
        slot = (self.whash & mask).astype(np.intp)
        hit = keys.take(slot) == self.whash
        count = np.diff(np.concatenate([[0], np.cumsum(hit)])[self.bounds])
        seen = np.zeros((self.n_docs, len(table)), dtype=bool)
        seen[self.wdoc[hit], ids.take(slot[hit])] = True
        return count, seen.sum(axis=1)

    def _plain(self) -> np.ndarray:
        """Per doc: the lower-cased text is stripped, has no whitespace but single spaces and
        newlines (no other character that ``str.split`` splits on: the ``SPACE`` flag is
        ``str.isspace``) and no run of 3+ newlines, so that joining its lines with spaces equals
        ``" ".join(text.split())`` (what :func:`~text2llm.data.dedup.exact_key` needs).
        False may also be a document that is plain after all (then the slow way gives the same)."""
        cp, ds = self._cp, self._doc_start
        nxt = _next(cp, 0)
        sp, nl = cp == 32, cp == 10
        bad = (sp & ((nxt == 32) | (nxt == 10))) | (nl & (nxt == 32))
        bad |= nl & (nxt == 10) & (_next(nxt, 0) == 10)
        bad |= (self._flags & SPACE).view(bool) & ~sp & ~nl
        lens = np.diff(ds) - 1
        ok = ~np.logical_or.reduceat(bad, ds[:-1]) if len(cp) else np.zeros(0, dtype=bool)
        ok &= lens > 0
        first = cp[np.minimum(ds[:-1], len(cp) - 1)]
        last = cp[np.maximum(ds[1:] - 2, 0)]
        ok &= (first != 32) & (first != 10) & (last != 32) & (last != 10)
        return ok

    @property
    def plain(self) -> np.ndarray:
        return self.cached("plain", self._plain)

    @property
    def lines(self) -> "LineStats":
        """Line statistics of the (original, not lower-cased) texts, computed once per batch."""
        return self.cached("lines", LineStats, self)

    def members(self, name: str, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cached :meth:`_members` for a named word list (``table`` sorted uint64 hashes)."""
        return self.cached(("members", name), self._members, table)

    def cached(self, key, fn, *args):
        """``fn(*args)``, computed once per batch."""
        if key not in self._cache:
            self._cache[key] = fn(*args)
        return self._cache[key]

    # ---- n-grams ------------------------------------------------------------------------

    def _ngram_starts(self, n: int, docs: np.ndarray | None = None) -> np.ndarray:
        """First word index of every n-gram inside one document (of the ``docs`` mask, if given)."""
        nw = len(self.whash)
        if nw < n:
            return np.zeros(0, dtype=np.int64)
        head = self.wdoc[: nw - n + 1]
        ok = head == self.wdoc[n - 1 :]
        if docs is not None:
            ok &= docs[head]
        return np.flatnonzero(ok)

    def _ngram_hashes(self, idx: np.ndarray, n: int) -> np.ndarray:
        with np.errstate(over="ignore"):
            g = self.whash[idx]
            for k in range(1, n):
                g *= _P
                g += self.whash[idx + k]
        return _mix(g)

    def _raw_ngrams(self, n: int) -> np.ndarray:
        """Unmixed n-gram hashes (as in :meth:`_ngram_hashes`) at every word position ``< nw - n + 1``,
        across document ends too; each n from the (n-1)-grams with one multiply-add."""
        if n == 1:
            return self.whash
        key = ("raw", n)
        if key not in self._cache:
            prev = self._raw_ngrams(n - 1)
            with np.errstate(over="ignore"):
                r = prev[: len(prev) - 1] * _P
                r += self.whash[n - 1 :]
            self._cache[key] = r
        return self._cache[key]

    def _ngram_mask(self, n: int) -> np.ndarray:
        """Over word positions ``< nw - n + 1``: the n-gram starting there lies inside one document."""
        nw = len(self.whash)
        return self.wdoc[: nw - n + 1] == self.wdoc[n - 1 :]

    def ngrams(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(hashes, first_word_index)`` of every n-gram that lies inside one document."""
        key = ("ng", n)
        if key not in self._cache:
            if len(self.whash) < n:
                self._cache[key] = (np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64))
            else:
                ok = self._ngram_mask(n)
                self._cache[("ngmask", n)] = ok
                self._cache[key] = (_mix(self._raw_ngrams(n)[ok]), np.flatnonzero(ok))
        return self._cache[key]

    def top_ngram_frac(self, n: int) -> np.ndarray:
        """Per doc: characters covered by one repeated n-gram / word characters, for the n-gram
        that covers the most (its count x its characters, capped at 255). Gopher takes the most
        frequent n-gram; this is the same or larger, so the rule is never laxer."""
        g, idx = self.ngrams(n)
        top = np.zeros(self.n_docs)
        if len(g):
            cs, ok = self.wlen_cumsum, self._cache[("ngmask", n)]
            glen = np.minimum((cs[n:] - cs[:-n])[ok], 255).astype(np.uint64)
            doc = self.cached("dockey", lambda: self.wdoc.astype(np.uint64) << _U(44)).take(idx)
            key = np.sort(doc | ((g >> _U(28)) << _U(8)) | glen)
            # only repeated keys matter, and most n-grams occur once: work on the equal neighbours
            pos = np.flatnonzero(key[1:] == key[:-1])
            if len(pos):
                rk = key[pos]  # one entry per repeat: a key seen c times has c - 1 entries here
                new_run = np.empty(len(rk), dtype=bool)
                new_run[0] = True
                np.not_equal(rk[1:], rk[:-1], out=new_run[1:])
                first = np.flatnonzero(new_run)
                counts = np.diff(np.append(first, len(rk))) + 1
                rk = rk[first]
                val = counts * (rk & _U(255)).astype(np.int64)
                rdoc = (rk >> _U(44)).astype(np.int64)  # ascending: keys are sorted by document first
                dfirst = np.flatnonzero(np.concatenate([[True], rdoc[1:] != rdoc[:-1]]))
                top[rdoc[dfirst]] = np.maximum.reduceat(val, dfirst)
        return top / np.maximum(self.word_chars, 1)

    def dup_ngram_frac(self, n: int, docs: np.ndarray | None = None) -> np.ndarray:
        """Per doc: characters of words inside an n-gram seen earlier in the doc / word characters.

        Coverage only shrinks as ``n`` grows (a repeated (n+1)-gram starts with a repeated
        n-gram, and the n-gram after it repeats too), so once ``dup_ngram_frac(n - 1)`` is known,
        only the documents where it is > 0 are looked at. Given ``docs`` (document indices), only
        those are computed (the others get 0); a document's value depends on its words alone.
        """
        nw = len(self.whash)
        prev = self._cache.get(("dup", n - 1))
        if docs is not None:
            lo = self.bounds[docs]
            cnt = np.maximum(self.bounds[docs + 1] - lo - (n - 1), 0)
            total = int(cnt.sum())
            idx = np.arange(total) + np.repeat(lo - (np.cumsum(cnt) - cnt), cnt)
            g = self._ngram_hashes(idx, n)
        elif prev is None:
            g, idx = self.ngrams(n)
        else:
            idx = self._ngram_starts(n, prev > 0)
            g = self._ngram_hashes(idx, n)
        if not len(g):
            return np.zeros(self.n_docs)
        # n-grams seen earlier in their document. Sorting (hash, position) pairs packed in one
        # uint64 (the hash's high bits, the position in ``idx`` low) puts each hash's occurrences
        # in position order; documents are contiguous, so an occurrence repeats an earlier one of
        # its document exactly when the occurrence just before it in that order is in the same
        # document. (A sort, not an argsort: the keys carry the positions.)
        m = len(g)
        pb = max(int(m - 1).bit_length(), 1)
        pmask = _U((1 << pb) - 1)
        packed = np.sort((g & ~pmask) | np.arange(m, dtype=np.uint64))
        high = packed >> _U(pb)
        pair = np.flatnonzero(high[1:] == high[:-1])
        if not len(pair):
            return np.zeros(self.n_docs)
        a = (packed[pair] & pmask).astype(np.intp)
        b = (packed[pair + 1] & pmask).astype(np.intp)
        starts = idx[b[self.wdoc[idx[a]] == self.wdoc[idx[b]]]]
        if docs is not None:  # over the words of ``docs`` only (n-grams never cross a document end)
            sz = self.bounds[docs + 1] - lo
            off = np.cumsum(sz) - sz
            k = np.searchsorted(lo, starts, side="right") - 1
            local = starts - lo[k] + off[k]
            m = int(sz.sum())
            diff = np.bincount(local, minlength=m + n + 1) - np.bincount(local + n, minlength=m + n + 1)
            covered = np.cumsum(diff)[:m] > 0
            wl = self.wlen[np.arange(m) + np.repeat(lo - off, sz)]
            out = np.zeros(self.n_docs)
            has = sz > 0
            out[docs[has]] = np.add.reduceat(wl * covered, off[has]) / np.maximum(self.word_chars[docs[has]], 1)
            return out
        diff = np.bincount(starts, minlength=nw + n + 1) - np.bincount(starts + n, minlength=nw + n + 1)
        covered = np.cumsum(diff)[:nw] > 0
        dup = np.diff(np.concatenate([[0], np.cumsum(self.wlen * covered)])[self.bounds])
        return dup / np.maximum(self.word_chars, 1)

    def shingle_rows(self, docs: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
        """The :meth:`shingles` of ``docs``, concatenated, and how many each has."""
        docs = np.asarray(docs, dtype=np.int64)
        g, idx = self.ngrams(n)
        seg = self.cached(("seg", n), np.searchsorted, idx, self.bounds)  # each doc's first n-gram
        long = self.n_words[docs] >= n
        sizes = np.where(long, seg[docs + 1] - seg[docs], 1)
        first = np.cumsum(sizes) - sizes  # each doc's offset in the output
        pos = np.arange(int(sizes.sum())) + np.repeat(np.where(long, seg[docs], 0) - first, sizes)
        out = g[np.minimum(pos, max(len(g) - 1, 0))] if len(g) else np.zeros(len(pos), dtype=np.uint64)
        for k in np.flatnonzero(~long):  # fewer than n words: one shingle of all of them
            out[first[k]] = self.shingles(int(docs[k]), n)[0]
        return out, sizes

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


class LineStats:
    """Per-line statistics of a batch of texts (lines as in ``text.split("\\n")``), vectorised.

    Used by the filters to settle, for a whole batch at once, the documents that certainly pass
    a line rule; a document they cannot settle goes through the filter's per-document check.

    Arrays over all lines of the batch: ``start``/``end`` (character positions), ``length``,
    ``nonblank`` (``line.strip()`` is not empty), ``first_cp`` (first character, -1 for an
    empty line), ``lead_ok``/``trail_ok`` (the first/last character is not whitespace),
    ``last_ns`` (last non-whitespace character, -1 for a blank line), ``strip_len``,
    ``n_spaces`` (``line.count(" ")``). ``lb[d]:lb[d+1]`` is document ``d``'s line range.
    Per document: ``n_lines``, ``n_chars`` (``len(text)``), ``n_space_chars``, ``dup_lines``
    (False only if no two non-blank lines are equal; True means "maybe"), and ``count(ch)``.

    The code points are those of the lower-cased batch when lower-casing kept every length
    (the usual case): lower-casing maps only cased letters, to letters, so whitespace, newlines
    and the punctuation looked at here are where they were.
    """

    def __init__(self, b: "BatchStats"):
        texts = b.texts
        n_docs = len(texts)
        self.joined = joined = "\n".join(texts) + "\n"
        lens = np.fromiter(map(len, texts), dtype=np.int64, count=n_docs) + 1
        if len(joined) == len(b.joined_lower):
            cp, flags, ds = b._cp, b._flags, b._doc_start
        else:
            cp = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            flags = _tables()["flags"].take(np.minimum(cp, _NCP - 1))
            ds = np.zeros(n_docs + 1, dtype=np.int64)
            np.cumsum(lens, out=ds[1:])
        self.cp, self.doc_start = cp, ds
        self.n_chars = lens - 1
        end = np.flatnonzero(cp == 10)
        start = np.empty(len(end), dtype=np.int64)
        start[0] = 0
        start[1:] = end[:-1] + 1
        self.start, self.end = start, end
        self.lb = np.searchsorted(start, ds)
        self.n_lines = np.diff(self.lb)
        self.ldoc = np.repeat(np.arange(n_docs), self.n_lines)
        self.length = end - start
        ns = np.flatnonzero((flags & SPACE) == 0)
        i0 = np.searchsorted(ns, start)
        i1 = np.searchsorted(ns, end)
        self.nonblank = i1 > i0
        if len(ns):
            fpos = ns[np.minimum(i0, len(ns) - 1)]
            lpos = ns[np.maximum(i1 - 1, 0)]
        else:
            fpos = lpos = np.zeros(len(start), dtype=np.int64)
        self.first_cp = np.where(self.length > 0, cp[np.minimum(start, len(cp) - 1)].astype(np.int64), -1)
        self.last_ns = np.where(self.nonblank, cp[lpos].astype(np.int64), -1)
        self.lead_ok = self.nonblank & (fpos == start)
        self.trail_ok = self.nonblank & (lpos == end - 1)
        self.strip_len = np.where(self.nonblank, lpos - fpos + 1, 0)
        sp = np.flatnonzero(cp == 32)
        self.n_spaces = np.searchsorted(sp, end) - np.searchsorted(sp, start)
        self.n_space_chars = np.diff(np.searchsorted(sp, ds))
        self.dup_lines = np.fromiter(map(_maybe_dup_lines, texts), dtype=bool, count=n_docs)

    def per_doc(self, line_values: np.ndarray) -> np.ndarray:
        """Sum of a per-line array over each document's lines (int64)."""
        return np.bincount(self.ldoc, weights=line_values, minlength=len(self.n_lines)).astype(np.int64)

    def count(self, ch: str) -> np.ndarray:
        """Per document: occurrences of the character ``ch``."""
        pos = np.flatnonzero(self.cp == ord(ch))
        return np.bincount(np.searchsorted(self.doc_start, pos, side="right") - 1, minlength=len(self.n_lines))


def _maybe_dup_lines(text: str) -> bool:
    """False when no two non-empty lines of ``text`` are equal (True: maybe; blank repeats count)."""
    lines = text.split("\n")
    seen = set(lines)
    if "" in seen:
        return len(seen) - 1 != len(lines) - lines.count("")
    return len(seen) != len(lines)
