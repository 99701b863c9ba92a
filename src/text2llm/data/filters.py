"""Quality filters: small named units, ``filter(doc) -> None`` (keep) or ``"name:reason"`` (drop).

Each filter is a class with a ``name`` and thresholds taken from :class:`DataConfig`; the
pipeline runs them in order, stops at the first drop and counts drops per filter name. For speed,
each filter also has a batch fast path, ``passes(batch_stats, rows)``: numpy over the word and line
statistics of a whole batch settles the documents that certainly pass (unchanged); only the rest
go through the per-document check, which alone decides the drop reasons.

=====================  ========================================================================
``length``             word count (CJK: each Han/kana/hangul character is a word) and characters
``language``           py3langid (model ships in the package) with an allow-list; zh accepts its
                       varieties (wuu, yue, lzh, ...)
``gopher_quality``     Rae et al. 2021: mean word length, symbol/word ratio, bullet and ellipsis
                       lines, share of words with a letter, stop words (English or Chinese list)
``gopher_repetition``  duplicate lines/paragraphs (count and characters), top 2-4-gram share,
                       duplicated 5-10-gram share
``c4``                 Raffel et al. 2020 line rules (drops javascript / cookie-policy lines and,
                       optionally, lines without terminal punctuation; this *edits* the text),
                       then lorem ipsum, ``{``, too-long words and too few sentences
``fineweb``            Penedo et al. 2024: lines ending in punctuation, short lines, characters
                       in duplicated lines, newlines per word
=====================  ========================================================================

Chinese-aware counting: :class:`TextStats` tokenises CJK text into characters (and non-CJK runs
into whitespace words), so word-count rules mean "characters" for Chinese; sentence and
punctuation rules accept full-width ``。！？；…``.
"""

from __future__ import annotations

import re
from functools import cached_property

import numpy as np

from text2llm.data.config import DataConfig
from text2llm.data.document import Document
from text2llm.data.textstats import BatchStats, word_hashes

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK_CHAR_RE = re.compile(f"[{_CJK}]")
_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", "…", "」", "』", "；", ";", ":", "：", ")", "）")
# a sentence end: end punctuation, closing quotes/brackets, then a space or the end; or a full-width
# stop alone. Written to begin with a character class so that ``re`` scans for it in C; it matches
# exactly what ``[.!?。！？…]+[\"'”’」』)）]*(?:\s|$)|[。！？]`` matches.
_SENTENCE_END_RE = re.compile("[.!?。！？…](?:[.!?。！？…]*[\"'”’」』)）]*(?:\\s|$)|(?<=[。！？]))")
_BULLETS = ("•", "-", "*", "‣", "◦", "⁃", "·", "●", "▪", "►", "–", "—")
_ELLIPSIS = ("...", "…", ". . .")
_BULLET_SET = frozenset(_BULLETS)
_BULLET_CPS = np.array([ord(ch) for ch in _BULLETS])
_TERMINAL_CPS = np.array([ord(ch) for ch in _TERMINAL])
_BLANKS_RE = re.compile(r"\n{3,}")
_EN_STOP = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
# frequent function characters of modern and classical Chinese
_ZH_STOP = frozenset("的了是在和不有我他这也就人之其而以于与为你她们着个说到")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


class DocStats:
    """One document's view of a :class:`BatchStats` (shared numbers computed once per batch)."""

    def __init__(self, text: str, batch: BatchStats | None = None, index: int = 0):
        self.text = text
        self.batch = batch if batch is not None else BatchStats([text])
        self.i = index

    @property
    def lower(self) -> str:
        """``text.lower()`` (computed for the whole batch)."""
        return self.batch.lower[self.i]

    @property
    def n_words(self) -> int:
        return int(self.batch.n_words[self.i])

    @property
    def word_lens(self) -> np.ndarray:
        b = self.batch
        return b.wlen[b.bounds[self.i] : b.bounds[self.i + 1]]

    @property
    def word_hashes(self) -> np.ndarray:
        b = self.batch
        return b.whash[b.bounds[self.i] : b.bounds[self.i + 1]]

    @cached_property
    def is_cjk(self) -> bool:
        """CJK characters make up >= 30% of the words."""
        return self.batch.cjk_words[self.i] >= 0.3 * max(1, self.n_words)

    @property
    def alpha_token_frac(self) -> float:
        """Share of words holding a letter: whitespace tokens for Latin text, characters for CJK."""
        if self.is_cjk:  # words, where each CJK character is one: digit-only runs are what fails
            return float(self.batch.alpha_words[self.i]) / max(1, self.n_words)
        return float(self.batch.alpha_tokens[self.i]) / max(1, int(self.batch.n_tokens[self.i]))

    def stop_words(self) -> int:
        """Distinct stop words present (the Chinese list for CJK text)."""
        name, table = ("zh_stop", _ZH_STOP_H) if self.is_cjk else ("en_stop", _EN_STOP_H)
        return int(self.batch.members(name, table)[1][self.i])

    def common_en_words(self) -> int:
        """Words among the 100 most common English words."""
        return int(self.batch.members("en_common", _EN_COMMON_H)[0][self.i])

    def top_ngram_frac(self, n: int) -> float:
        return float(self.batch.cached(("top", n), self.batch.top_ngram_frac, n)[self.i])

    def dup_ngram_frac(self, n: int) -> float:
        return float(self.batch.cached(("dup", n), self.batch.dup_ngram_frac, n)[self.i])

    @cached_property
    def lines(self) -> list[str]:
        return [ln for ln in self.text.split("\n") if ln.strip()]

    @cached_property
    def paragraphs(self) -> list[str]:
        return [p for p in self.text.split("\n\n") if p.strip()]


_EN_STOP_H = word_hashes(sorted(_EN_STOP))
_ZH_STOP_H = word_hashes(sorted(_ZH_STOP))


def stats_of(doc: Document) -> DocStats:
    """The doc's :class:`DocStats`, attached by the pipeline for a batch; recomputed if the text changed."""
    st = doc.__dict__.get("_stats")
    if st is None or st.text is not doc.text:
        st = DocStats(doc.text)
        doc.__dict__["_stats"] = st
    return st


class Filter:
    """Base: subclasses set ``name`` and implement ``check(doc, stats) -> reason | None``."""

    name = "filter"

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def __call__(self, doc: Document) -> str | None:
        reason = self.check(doc, stats_of(doc))
        return f"{self.name}:{reason}" if reason else None

    def check(self, doc: Document, st) -> str | None:  # pragma: no cover - abstract; st: the doc's word statistics
        raise NotImplementedError

    def passes(self, b: BatchStats, rows: np.ndarray) -> np.ndarray | None:
        """Batch fast path: a bool mask over ``rows`` (documents of ``b``), True only where
        :meth:`check` certainly returns None *and leaves the text unchanged*; False means "not
        settled" (the pipeline then calls the filter on that document). None: no fast path."""
        return None


class LengthFilter(Filter):
    name = "length"

    def check(self, doc, st):
        c = self.cfg
        if len(doc.text) - doc.text.count(" ") < c.min_chars:
            return "too_few_chars"
        n = st.n_words
        if n < c.min_words:
            return "too_short"
        if n > c.max_words:
            return "too_long"
        return None

    def passes(self, b, rows):
        c, ls, n = self.cfg, b.lines, b.n_words[rows]
        chars = (ls.n_chars - ls.n_space_chars)[rows]
        return (chars >= c.min_chars) & (n >= c.min_words) & (n <= c.max_words)


_ZH_FAMILY = {"zh", "wuu", "yue", "lzh", "gan", "hak", "cdo", "nan", "hsn", "cjy"}


_KANA_HANGUL_RE = re.compile("[\u3040-\u30ff\uac00-\ud7af]")
_EN_COMMON = frozenset(
    "the of and to a in is that it was for on are as with his they at be this have from or one had by "
    "but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more "
    "go see no way could people my than first been who its now find long down day did get come made may".split()
)
_EN_COMMON_H = word_hashes(sorted(_EN_COMMON))


def _mostly_ascii_head(text: str) -> bool:
    """The first 2,000 characters are ASCII but for at most 2% extra UTF-8 bytes (curly quotes,
    dashes, an accented name: English web text)."""
    head = text[:2000]
    return head.isascii() or len(head.encode("utf-8")) - len(head) <= 0.02 * len(head)


class LanguageFilter(Filter):
    """Language identification with an allow-list.

    Fast paths settle the clear cases without a model: for ``en``, text whose first 2,000
    characters are ASCII (but for <= 2% extra UTF-8 bytes) and in which >= 25%
    of the words are among the 100 most common English words; for ``zh``, text whose words are
    mostly Han characters with no kana or hangul. Everything else goes to py3langid (its model
    ships inside the package) on the first 600 characters; the probabilities of the allowed
    languages are summed (``zh`` includes wuu, yue, lzh and other Chinese varieties).
    """

    name = "language"
    _ident = None

    @classmethod
    def identifier(cls):
        if cls._ident is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            cls._ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return cls._ident

    def __init__(self, cfg):
        super().__init__(cfg)
        allowed = set(cfg.languages)
        if "zh" in allowed:
            allowed |= _ZH_FAMILY
        self.allowed = allowed

    def fast_path(self, doc, st) -> str | None:
        """The language when it is obvious from counts, else None."""
        if st.is_cjk:
            if st.batch.cjk_words[st.i] >= 0.6 * st.n_words and not _KANA_HANGUL_RE.search(doc.text[:2000]):
                return "zh"
            return None
        if st.n_words >= 10 and _mostly_ascii_head(doc.text):
            if st.common_en_words() >= 0.25 * st.n_words:
                return "en"
        return None

    def passes(self, b, rows):
        if "en" not in self.allowed:
            return None
        n = b.n_words[rows]
        cjk = b.cjk_words[rows] >= 0.3 * np.maximum(1, n)
        ascii_head = np.fromiter(map(_mostly_ascii_head, map(b.texts.__getitem__, rows.tolist())), dtype=bool, count=len(rows))
        common = b.members("en_common", _EN_COMMON_H)[0][rows]
        return ~cjk & (n >= 10) & ascii_head & (common >= 0.25 * n)

    def check(self, doc, st):
        fast = self.fast_path(doc, st)
        if fast is not None:
            return None if fast in self.allowed else f"not_allowed({fast})"
        sample = doc.text[:600]
        ident = self.identifier()
        ranked = ident.rank(sample)
        score = sum(p for lang, p in ranked if lang in self.allowed)
        if score >= self.cfg.language_min_score:
            return None
        return f"not_allowed({ranked[0][0]})"


class GopherQualityFilter(Filter):
    name = "gopher_quality"

    def check(self, doc, st):
        c, text = self.cfg, doc.text
        n = max(1, st.n_words)
        if not st.is_cjk:
            mean = float(st.batch.word_chars[st.i]) / n
            if mean < c.min_mean_word_len:
                return "mean_word_len_low"
            if mean > c.max_mean_word_len:
                return "mean_word_len_high"
        n_dots = text.count("...") + text.count("…")
        n_sym = text.count("#") + n_dots
        if n_sym / n > c.max_symbol_word_ratio:
            return "symbol_word_ratio"
        n_lines = text.count("\n") + 1 - text.count("\n\n")  # normalised text: no other empty lines
        if sum(ln[0] in _BULLET_SET for ln in st.lines) / n_lines > c.max_bullet_lines_frac:
            return "bullet_lines"
        if (n_dots or ". . ." in text) and _ellipsis_lines(st.lines) / n_lines > c.max_ellipsis_lines_frac:
            return "ellipsis_lines"
        if st.alpha_token_frac < c.min_alpha_word_frac:
            return "alpha_words_low"
        if c.min_stop_words and st.stop_words() < c.min_stop_words:
            return "too_few_stop_words"
        return None

    def passes(self, b, rows):
        c, ls = self.cfg, b.lines
        n = np.maximum(1, b.n_words[rows])
        cjk = b.cjk_words[rows] >= 0.3 * n
        mean = b.word_chars[rows] / n
        ok = cjk | ((mean >= c.min_mean_word_len) & (mean <= c.max_mean_word_len))
        # documents with an ellipsis go the slow way (ellipsis lines); the rest have n_dots == 0
        if "..." in ls.joined or "\u2026" in ls.joined or ". . ." in ls.joined:
            ok &= np.fromiter((_no_dots(b.texts[r]) for r in rows), dtype=bool, count=len(rows))
        ok &= ~(ls.count("#")[rows] / n > c.max_symbol_word_ratio)
        # n_lines = count("\n") + 1 - count("\n\n") is the number of non-empty lines when the text
        # has no "\n\n\n" and does not start or end with a newline (others: the slow way)
        if "\n\n\n" in ls.joined:
            ok &= np.fromiter(("\n\n\n" not in b.texts[r] for r in rows), dtype=bool, count=len(rows))
        empty = ls.length == 0
        lb = ls.lb
        ok &= ~empty[lb[rows]] & ~empty[lb[rows + 1] - 1]
        n_lines = np.maximum(ls.n_lines - ls.per_doc(empty), 1)[rows]
        bullets = ls.per_doc(ls.nonblank & np.isin(ls.first_cp, _BULLET_CPS))[rows]
        ok &= ~(bullets / n_lines > c.max_bullet_lines_frac)
        tokens = b.n_tokens[rows]
        alpha = b.alpha_tokens[rows] / np.maximum(1, tokens)
        if cjk.any():
            alpha = np.where(cjk, b.alpha_words[rows] / n, alpha)
        ok &= ~(alpha < c.min_alpha_word_frac)
        if c.min_stop_words:
            stop = b.members("en_stop", _EN_STOP_H)[1][rows]
            if cjk.any():
                stop = np.where(cjk, b.members("zh_stop", _ZH_STOP_H)[1][rows], stop)
            ok &= ~(stop < c.min_stop_words)
        return ok


def _no_dots(text: str) -> bool:
    return "..." not in text and "\u2026" not in text and ". . ." not in text


def _ellipsis_lines(lines: list[str]) -> int:
    """Lines that end in an ellipsis (``...``, ``…`` or ``. . .``, then maybe spaces or tabs)."""
    return sum(ln.rstrip(" \t").endswith(_ELLIPSIS) for ln in lines)


def _dup_frac(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in those repeats)."""
    if len(set(items)) == len(items):
        return 0.0, 0.0
    seen: set[str] = set()
    dup_n = dup_chars = total = 0
    for it in items:
        total += len(it)
        if it in seen:
            dup_n += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    return dup_n / max(1, len(items)), dup_chars / max(1, total)


class GopherRepetitionFilter(Filter):
    name = "gopher_repetition"

    def check(self, doc, st):
        c = self.cfg
        n_frac, c_frac = _dup_frac(st.lines)
        if n_frac > c.dup_line_frac:
            return "dup_lines"
        if c_frac > c.dup_line_char_frac:
            return "dup_line_chars"
        p_frac, pc_frac = _dup_frac(st.paragraphs)
        if p_frac > c.dup_para_frac:
            return "dup_paragraphs"
        if pc_frac > c.dup_para_char_frac:
            return "dup_paragraph_chars"
        if st.n_words == 0:
            return None
        for n, limit in zip((2, 3, 4), c.top_ngram_char_frac):
            if st.top_ngram_frac(n) > limit:
                return f"top_{n}gram"
        # coverage by duplicated n-grams only shrinks as n grows: stop once under every limit
        for n, limit in zip(range(5, 11), c.dup_ngram_char_frac):
            frac = st.dup_ngram_frac(n)
            if frac > limit:
                return f"dup_{n}gram"
            if frac <= min(c.dup_ngram_char_frac):
                break
        return None

    def passes(self, b, rows):
        c = self.cfg
        # no two equal non-blank lines: no duplicate lines, and so no duplicate paragraphs either
        # (a repeated paragraph repeats its non-blank lines); thresholds are >= 0
        ok = ~b.lines.dup_lines[rows]
        nonempty = b.n_words[rows] > 0
        open_ = ok & nonempty  # still to be judged by the n-gram rules
        for n, limit in zip((2, 3, 4), c.top_ngram_char_frac):
            if not open_.any():
                return ok
            bad = open_ & (b.cached(("top", n), b.top_ngram_frac, n)[rows] > limit)
            ok &= ~bad
            open_ &= ~bad
        lowest = min(c.dup_ngram_char_frac)
        for n, limit in zip(range(5, 11), c.dup_ngram_char_frac):
            if not open_.any():
                break
            if n == 5:  # (shared with the per-document checks)
                frac = b.cached(("dup", n), b.dup_ngram_frac, n)[rows]
            else:  # few documents are left: only theirs
                frac = b.dup_ngram_frac(n, rows[open_])[rows]
            bad = open_ & (frac > limit)
            ok &= ~bad
            open_ &= ~bad & ~(frac <= lowest)
        return ok


class C4Filter(Filter):
    """C4 rules. Lines are removed first (an edit of ``doc.text``), then the document is judged."""

    name = "c4"

    def check(self, doc, st):
        c = self.cfg
        low = st.lower
        if "lorem ipsum" in low:
            return "lorem_ipsum"
        if "{" in doc.text:
            return "curly_bracket"
        kept = []
        # skip the per-line tests when no line can match (every _POLICY phrase holds one of the first four)
        flagged = ("javascript" in low or "cookie" in low or "privacy policy" in low or "terms of use" in low) and (
            "javascript" in low or any(p in low for p in _POLICY)
        )
        cjk = st.batch.cjk_words[st.i] > 0
        for line in doc.text.split("\n"):
            s = line.strip()
            if not s:
                kept.append("")
                continue
            if flagged:
                ls = s.lower()
                if "javascript" in ls or any(p in ls for p in _POLICY):
                    continue
            if cjk:
                words = _TOKEN_RE.findall(s)
            elif s.count(" ") + 1 >= c.c4_min_words_per_line and len(s) <= c.c4_max_word_len:
                words = None  # normalised text: words = spaces + 1, none can be too long
            else:
                words = s.split()
            if words is not None and len(words) < c.c4_min_words_per_line:
                continue
            if c.c4_drop_lines and not s.endswith(_TERMINAL):
                continue
            if words is not None and len(s) > c.c4_max_word_len and max(map(len, words)) > c.c4_max_word_len:
                return "word_too_long"
            kept.append(s)
        text = "\n".join(kept)
        if "\n\n\n" in text:
            text = _BLANKS_RE.sub("\n\n", text)
        text = text.strip()
        if not text:
            return "no_lines_left"
        # each ". " ends a different sentence match, so enough of them settle it without the regex
        k = c.c4_min_sentences
        if text.count(". ") < k and sum(1 for _ in zip(range(k), _SENTENCE_END_RE.finditer(text))) < k:
            return "too_few_sentences"
        if text != doc.text:
            doc.text = text
        return None

    def passes(self, b, rows):
        c, ls = self.cfg, b.lines
        low = b.joined_lower
        ok = (ls.count("{")[rows] == 0) & (b.cjk_words[rows] == 0)
        for phrase in ("lorem ipsum", "javascript", "cookie", "privacy policy", "terms of use"):
            if phrase in low:
                ok &= np.fromiter((phrase not in b.lower[r] for r in rows), dtype=bool, count=len(rows))
        # unchanged and kept: every line is empty, or stripped with >= c4_min_words_per_line
        # words by the space count, no longer than c4_max_word_len (and ends in punctuation when
        # lines without it are dropped); the text neither starts nor ends with a blank line
        good = (ls.length == 0) | (
            ls.lead_ok & ls.trail_ok & (ls.n_spaces + 1 >= c.c4_min_words_per_line) & (ls.length <= c.c4_max_word_len)
        )
        if c.c4_drop_lines:
            good &= (ls.length == 0) | np.isin(ls.last_ns, _TERMINAL_CPS)
        ok &= ls.per_doc(~good)[rows] == 0
        lb = ls.lb
        ok &= ls.nonblank[lb[rows]] & ls.nonblank[lb[rows + 1] - 1]
        if "\n\n\n" in ls.joined:
            ok &= np.fromiter(("\n\n\n" not in b.texts[r] for r in rows), dtype=bool, count=len(rows))
        k = c.c4_min_sentences
        ok &= np.fromiter((b.texts[r].count(". ") >= k for r in rows), dtype=bool, count=len(rows))
        return ok


class FineWebFilter(Filter):
    name = "fineweb"

    def check(self, doc, st):
        c, lines = self.cfg, st.lines
        if not lines:
            return "no_lines"
        if sum(ln.rstrip().endswith(_TERMINAL) for ln in lines) / len(lines) < c.fineweb_min_line_punct_frac:
            return "line_punct_ratio"
        if sum(len(ln.strip()) <= 30 for ln in lines) / len(lines) > c.fineweb_max_short_line_frac:
            return "short_line_ratio"
        _, dup_chars = _dup_frac(lines)
        if dup_chars > c.fineweb_max_dup_line_char_frac:
            return "dup_line_chars"
        if doc.text.count("\n") / max(1, st.n_words) > c.fineweb_max_newline_ratio:
            return "newline_ratio"
        return None

    def passes(self, b, rows):
        c, ls = self.cfg, b.lines
        n_lines = ls.per_doc(ls.nonblank)[rows]
        ok = (n_lines > 0) & ~ls.dup_lines[rows]
        n = np.maximum(n_lines, 1)
        punct = ls.per_doc(np.isin(ls.last_ns, _TERMINAL_CPS))[rows]
        ok &= ~(punct / n < c.fineweb_min_line_punct_frac)
        short = ls.per_doc(ls.nonblank & (ls.strip_len <= 30))[rows]
        ok &= ~(short / n > c.fineweb_max_short_line_frac)
        ok &= ~((ls.n_lines[rows] - 1) / np.maximum(1, b.n_words[rows]) > c.fineweb_max_newline_ratio)
        return ok


FILTERS: dict[str, type[Filter]] = {
    f.name: f
    for f in (LengthFilter, LanguageFilter, GopherQualityFilter, GopherRepetitionFilter, C4Filter, FineWebFilter)
}


def build_filters(cfg: DataConfig) -> list[Filter]:
    """The configured filters, in ``cfg.filters`` order (none when ``cfg.filter`` is False)."""
    return [FILTERS[name](cfg) for name in cfg.filters] if cfg.filter else []
