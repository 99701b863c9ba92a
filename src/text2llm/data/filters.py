"""Quality filters: small named units, ``filter(doc) -> None`` (keep) or ``"name:reason"`` (drop).

Each filter is a class with a ``name`` and thresholds taken from :class:`DataConfig`; the
pipeline runs them in order, stops at the first drop and counts drops per filter name.

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
import zlib
from functools import cached_property

import numpy as np

from text2llm.data.config import DataConfig
from text2llm.data.document import Document

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK_CHAR_RE = re.compile(f"[{_CJK}]")
_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", "…", "」", "』", "；", ";", ":", "：", ")", "）")
_SENTENCE_END_RE = re.compile(r"[.!?。！？…]+[\"'”’」』)）]*(?:\s|$)|[。！？]")
_BULLETS = ("•", "-", "*", "‣", "◦", "⁃", "·", "●", "▪", "►", "–", "—")
_ELLIPSIS = ("...", "…", ". . .")
_EN_STOP = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
# frequent function characters of modern and classical Chinese
_ZH_STOP = frozenset("的了是在和不有我他这也就人之其而以于与为你她们着个说到")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


class TextStats:
    """Per-document numbers that several filters share, computed lazily once."""

    def __init__(self, text: str):
        self.text = text

    @cached_property
    def cjk_chars(self) -> int:
        return len(_CJK_CHAR_RE.findall(self.text))

    @cached_property
    def is_cjk(self) -> bool:
        """CJK characters make up >= 30% of non-space characters."""
        return self.cjk_chars >= 0.3 * max(1, len(self.text) - self.text.count(" ") - self.text.count("\n"))

    @cached_property
    def words(self) -> list[str]:
        """Whitespace words; for CJK text every CJK character is a word of its own."""
        return _TOKEN_RE.findall(self.text) if self.cjk_chars else self.text.split()

    @cached_property
    def lines(self) -> list[str]:
        return [ln for ln in self.text.split("\n") if ln.strip()]

    @cached_property
    def paragraphs(self) -> list[str]:
        return [p for p in re.split(r"\n\s*\n", self.text) if p.strip()]

    @cached_property
    def word_hashes(self) -> np.ndarray:
        """uint64 hashes of lower-cased words with punctuation stripped (for n-gram rules)."""
        ws = [w.lower().strip(".,;:!?\"'()[]“”‘’，。；：！？、（）《》") for w in self.words]
        return np.fromiter((zlib.crc32(w.encode()) for w in ws), dtype=np.uint64, count=len(ws))

    @cached_property
    def word_lens(self) -> np.ndarray:
        return np.fromiter((len(w) for w in self.words), dtype=np.int64, count=len(self.words))

    def ngram_hashes(self, n: int) -> np.ndarray:
        h = self.word_hashes
        with np.errstate(over="ignore"):
            out = h[: len(h) - n + 1].copy()
            for k in range(1, n):
                out = out * np.uint64(0x100000001B3) + h[k : len(h) - n + 1 + k]
        return out


def stats_of(doc: Document) -> TextStats:
    """The doc's cached :class:`TextStats` (recomputed if the text changed)."""
    st = doc.__dict__.get("_stats")
    if st is None or st.text is not doc.text:
        st = TextStats(doc.text)
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

    def check(self, doc: Document, st: TextStats) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError


class LengthFilter(Filter):
    name = "length"

    def check(self, doc, st):
        c = self.cfg
        if len(doc.text) - doc.text.count(" ") < c.min_chars:
            return "too_few_chars"
        n = len(st.words)
        if n < c.min_words:
            return "too_short"
        if n > c.max_words:
            return "too_long"
        return None


_ZH_FAMILY = {"zh", "wuu", "yue", "lzh", "gan", "hak", "cdo", "nan", "hsn", "cjy"}


class LanguageFilter(Filter):
    """py3langid on the first 1,000 characters; the allowed languages' probabilities are summed."""

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

    def check(self, doc, st):
        sample = doc.text[:1000]
        ident = self.identifier()
        lang, p = ident.classify(sample)
        if lang in self.allowed and p >= self.cfg.language_min_score:
            return None
        score = sum(p for lang, p in ident.rank(sample) if lang in self.allowed)
        if score >= self.cfg.language_min_score:
            return None
        return f"not_allowed({lang})"


class GopherQualityFilter(Filter):
    name = "gopher_quality"

    def check(self, doc, st):
        c, words, text = self.cfg, st.words, doc.text
        n = max(1, len(words))
        latin = [w for w in words if not _CJK_CHAR_RE.match(w)] if st.cjk_chars else words
        if latin and not st.is_cjk:
            mean = sum(map(len, latin)) / len(latin)
            if mean < c.min_mean_word_len:
                return "mean_word_len_low"
            if mean > c.max_mean_word_len:
                return "mean_word_len_high"
        n_sym = text.count("#") + text.count("...") + text.count("…")
        if n_sym / n > c.max_symbol_word_ratio:
            return "symbol_word_ratio"
        lines = st.lines
        if lines:
            if sum(ln.lstrip().startswith(_BULLETS) for ln in lines) / len(lines) > c.max_bullet_lines_frac:
                return "bullet_lines"
            if sum(ln.rstrip().endswith(_ELLIPSIS) for ln in lines) / len(lines) > c.max_ellipsis_lines_frac:
                return "ellipsis_lines"
        if sum(any(ch.isalpha() for ch in w) for w in words) / n < c.min_alpha_word_frac:
            return "alpha_words_low"
        if c.min_stop_words:
            stop = _ZH_STOP if st.is_cjk else _EN_STOP
            found = {w for w in words if w in stop} if st.is_cjk else {w.lower() for w in words} & stop
            if len(found) < c.min_stop_words:
                return "too_few_stop_words"
        return None


def _dup_frac(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in those repeats)."""
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
        lens = st.word_lens
        total = int(lens.sum())
        if total == 0:
            return None
        for n, limit in zip((2, 3, 4), c.top_ngram_char_frac):
            if len(lens) < n + 1:
                break
            h = st.ngram_hashes(n)
            uniq, first, counts = np.unique(h, return_index=True, return_counts=True)
            k = int(np.argmax(counts))
            if counts[k] > 1:
                ngram_chars = int(lens[first[k] : first[k] + n].sum())
                if ngram_chars * int(counts[k]) / total > limit:
                    return f"top_{n}gram"
        # duplicated n-grams: coverage can only shrink as n grows, so stop once under every limit
        for n, limit in zip(range(5, 11), c.dup_ngram_char_frac):
            if len(lens) < n + 1:
                break
            h = st.ngram_hashes(n)
            _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
            starts = np.nonzero(first[inverse] != np.arange(len(h)))[0]
            if len(starts) == 0:
                break
            cover = np.zeros(len(lens) + 1, dtype=np.int64)
            np.add.at(cover, starts, 1)
            np.add.at(cover, starts + n, -1)
            frac = float(lens[np.cumsum(cover[:-1]) > 0].sum()) / total
            if frac > limit:
                return f"dup_{n}gram"
            if frac <= min(c.dup_ngram_char_frac):
                break
        return None


class C4Filter(Filter):
    """C4 rules. Lines are removed first (an edit of ``doc.text``), then the document is judged."""

    name = "c4"

    def check(self, doc, st):
        c = self.cfg
        low = doc.text.lower()
        if "lorem ipsum" in low:
            return "lorem_ipsum"
        if "{" in doc.text:
            return "curly_bracket"
        kept = []
        for line in doc.text.split("\n"):
            s = line.strip()
            if not s:
                kept.append("")
                continue
            ls = s.lower()
            if "javascript" in ls or any(p in ls for p in _POLICY):
                continue
            words = _TOKEN_RE.findall(s) if _CJK_CHAR_RE.search(s) else s.split()
            if len(words) < c.c4_min_words_per_line:
                continue
            if c.c4_drop_lines and not s.endswith(_TERMINAL):
                continue
            if any(len(w) > c.c4_max_word_len for w in words):
                return "word_too_long"
            kept.append(s)
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
        if not text:
            return "no_lines_left"
        if len(_SENTENCE_END_RE.findall(text)) < c.c4_min_sentences:
            return "too_few_sentences"
        doc.text = text
        return None


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
        if doc.text.count("\n") / max(1, len(st.words)) > c.fineweb_max_newline_ratio:
            return "newline_ratio"
        return None


FILTERS: dict[str, type[Filter]] = {
    f.name: f
    for f in (LengthFilter, LanguageFilter, GopherQualityFilter, GopherRepetitionFilter, C4Filter, FineWebFilter)
}


def build_filters(cfg: DataConfig) -> list[Filter]:
    """The configured filters, in ``cfg.filters`` order (none when ``cfg.filter`` is False)."""
    return [FILTERS[name](cfg) for name in cfg.filters] if cfg.filter else []
