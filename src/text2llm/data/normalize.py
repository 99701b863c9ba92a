"""Text normalisers: Unicode repair, control characters, whitespace (paragraphs kept).

``normalize(text, cfg, repaired)`` applies, in order:

1. mojibake repair with ftfy (only on text that ftfy's own detector flags as bad, since ftfy
   on clean text is slow and a no-op); curly quotes, full-width forms and CJK punctuation are
   kept (``uncurl_quotes=False``);
2. Unicode normal form (NFC by default: composes accents, keeps full-width ``，。！？``);
3. line ends to ``\\n``; control characters (C0 except tab/newline, C1, NUL), zero-width
   characters, BOM and bidi controls removed; other Unicode spaces to ``" "``;
4. whitespace: runs of spaces/tabs to one space, lines stripped, 3+ newlines to one blank line
   (paragraphs stay), document stripped.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

import ftfy

from text2llm.data.config import DataConfig

_FTFY = ftfy.TextFixerConfig(uncurl_quotes=False, fix_character_width=False, normalization=None, explain=False)

# C0 (but \t \n), DEL, C1, zero-width and bidi marks, BOM, soft hyphen, object replacement
_CONTROL_RANGES = (
    (0x00, 0x08), (0x0B, 0x0C), (0x0E, 0x1F), (0x7F, 0x9F), (0xAD, 0xAD), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x2064), (0xFEFF, 0xFEFF), (0xFFFC, 0xFFFC),
)
_CONTROL_RE = re.compile("[" + "".join(f"\\u{lo:04x}-\\u{hi:04x}" for lo, hi in _CONTROL_RANGES) + "]")
# non-newline spaces: tab, NBSP, en/em/thin spaces, ideographic space, ...
_SPACE_RE = re.compile("[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]{2,}|[\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_LINE_END_RE = re.compile("\r\n?|[\u2028\u2029\x85]")
_BLANKS_RE = re.compile(r"\n{3,}")
# UTF-8 read as cp1252/latin-1: a lead-byte letter followed by a continuation-byte character
_MOJIBAKE_LEAD = "[\u00c2-\u00f4]"
_MOJIBAKE_CONT = (
    "[\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
    "\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]"
)
_MOJIBAKE_HINT_RE = re.compile(f"{_MOJIBAKE_LEAD}{_MOJIBAKE_CONT}|\ufffd")  # (a BOM read as latin-1, "ï»¿", is a lead + continuation pair)


# "”" is E2 80 9D in UTF-8; 0x9D has no cp1252 character, so that byte is often lost and
# only "â€" remains (before a space or the end). ftfy alone would read it as "†" (E2 80 A0).
_LOST_RDQUO_RE = re.compile("\u00e2\u20ac(?=[ \n\t\"'.,;:!?)\\]]|$)")


def fix_unicode(text: str, repaired: Counter) -> str:
    """Repair mojibake (UTF-8 read as cp1252/latin-1 and similar) with ftfy when the text looks broken."""
    if text.isascii() or not _MOJIBAKE_HINT_RE.search(text):
        return text
    return _repair(text, repaired)


def _repair(text: str, repaired: Counter) -> str:
    """ftfy on a text that :data:`_MOJIBAKE_HINT_RE` flags."""
    fixed = ftfy.fix_text(_LOST_RDQUO_RE.sub("\u201d", text), _FTFY)
    if fixed != text:
        repaired["mojibake_fixed"] += 1
    return fixed


def normalize_whitespace(text: str, special: bool | None = None) -> str:
    """Unify line ends and spaces, strip lines, keep paragraph breaks (at most one blank line).
    ``special``: whether ``text`` may hold a character of :data:`_SPECIAL_WS` (None: not known;
    :func:`normalize_batch` knows it for a whole batch at once)."""
    # each regex runs only when a fast test says it can match (most text is clean)
    if special is None:
        special = "\r" in text or "\t" in text or not text.isascii()
    if special:
        text = _LINE_END_RE.sub("\n", text)
    if special or "  " in text:
        text = _SPACE_RE.sub(" ", text)
    if " \n" in text or "\n " in text:  # spaces around newlines (line by line: much faster than re.sub(" +\n *|\n +", "\n"))
        text = "\n".join([line.strip(" ") for line in text.split("\n")])
    if "\n\n\n" in text:
        text = _BLANKS_RE.sub("\n\n", text)
    return text.strip()


def normalize(text: str, cfg: DataConfig, repaired: Counter) -> str:
    """The full normalisation chain (see the module docstring)."""
    if cfg.fix_unicode:
        text = fix_unicode(text, repaired)
    if cfg.unicode_form != "none" and not text.isascii():
        text = unicodedata.normalize(cfg.unicode_form, text)
    if _CONTROL_RE.search(text):
        text = _CONTROL_RE.sub("", text)
        repaired["control_chars_removed"] += 1
    return normalize_whitespace(text)


_CONTROL_TABLE: list = []
# what _LINE_END_RE and _SPACE_RE look for, but runs of plain spaces ("  ", found with ``in``)
_SPECIAL_WS = "\r\u2028\u2029\x85\t\u00a0\u1680\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B)))
_WS_TABLE: list = []


def _control_table():
    """Code point (< 0x10000) -> matches ``_CONTROL_RE`` (both made from ``_CONTROL_RANGES``, all in the BMP)."""
    if not _CONTROL_TABLE:
        import numpy as np

        table = np.zeros(0x10000, dtype=bool)
        for lo, hi in _CONTROL_RANGES:
            table[lo : hi + 1] = True
        _CONTROL_TABLE.append(table)
    return _CONTROL_TABLE[0]


def _mojibake_tables():
    """Code point (< 0x10000) -> may start / may continue a :data:`_MOJIBAKE_HINT_RE` match
    (built from the same character classes)."""
    if not _MOJIBAKE_TABLES:
        import numpy as np

        bmp = "".join(map(chr, range(0xD800))) + "".join(map(chr, range(0xE000, 0x10000)))
        tables = []
        for cls in (_MOJIBAKE_LEAD, _MOJIBAKE_CONT):
            t = np.zeros(0x10000, dtype=bool)
            t[[ord(m.group()) for m in re.finditer(cls, bmp)]] = True
            tables.append(t)
        _MOJIBAKE_TABLES.extend(tables)
    return _MOJIBAKE_TABLES


_MOJIBAKE_TABLES: list = []


def _ws_table():
    """Code point (< 0x10000) -> is in :data:`_SPECIAL_WS` (all of it in the BMP)."""
    if not _WS_TABLE:
        import numpy as np

        table = np.zeros(0x10000, dtype=bool)
        table[[ord(c) for c in _SPECIAL_WS]] = True
        _WS_TABLE.append(table)
    return _WS_TABLE[0]


def _candidates(texts: list[str]):
    """The characters of ``texts`` that any batch test below may care about: C0 controls but
    ``\\n``, and everything from DEL up (control, special whitespace, mojibake hints all lie
    there). Returns their code points clipped to the BMP, their positions in
    ``"\\n".join(texts) + "\\n"``, the document each is in, that string's code points, and where
    each text starts in it."""
    import numpy as np

    cp = np.frombuffer(("\n".join(texts) + "\n").encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    pos = np.flatnonzero(((cp < 0x20) & (cp != 10)) | (cp >= 0x7F))
    starts = np.zeros(len(texts), dtype=np.int64)
    np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))[:-1] + 1, out=starts[1:])
    return np.minimum(cp[pos], 0xFFFF), pos, np.searchsorted(starts, pos, side="right") - 1, cp, starts


def _docs_where(mask, doc, n: int):
    """Bool per document: some candidate of it has ``mask``."""
    import numpy as np

    out = np.zeros(n, dtype=bool)
    out[doc[mask]] = True
    return out


def normalize_batch(texts: list[str], cfg: DataConfig, repaired: Counter) -> list[str]:
    """``[normalize(t, cfg, repaired) for t in texts]``; mojibake hints, control characters and
    special whitespace are looked for in the whole batch at once (numpy, on the few characters
    that can be any of them), so that documents without any skip the per-document regexes
    (removing control characters never adds special whitespace)."""
    import numpy as np

    if not texts:
        return []
    out, n = list(texts), len(texts)
    c, pos, doc, cp, starts = _candidates(out)
    changed = False
    if cfg.fix_unicode and len(c):
        lead, cont = _mojibake_tables()
        nxt = np.minimum(cp[np.minimum(pos + 1, len(cp) - 1)], 0xFFFF)  # (a text's last character meets "\n")
        hint = (lead.take(c) & cont.take(nxt)) | (c == 0xFFFD)
        for i in np.flatnonzero(_docs_where(hint, doc, n)).tolist():
            fixed = _repair(out[i], repaired)
            changed |= fixed != out[i]
            out[i] = fixed
    if cfg.unicode_form != "none" and len(c):
        for i in np.flatnonzero(_docs_where(c >= 0x80, doc, n)).tolist():
            done = unicodedata.normalize(cfg.unicode_form, out[i])
            if done != out[i]:
                out[i], changed = done, True
    if changed:
        c, pos, doc, cp, starts = _candidates(out)
    special = _docs_where(_ws_table().take(c), doc, n)
    # what normalize_whitespace's substring tests look for ("  ", " \n", "\n ", "\n\n\n"), for
    # the whole batch at once (a pattern across the "\n" between two texts only costs a no-op)
    sp, nl = cp == 32, cp == 10
    runs = (sp[:-1] & (sp[1:] | nl[1:])) | (nl[:-1] & sp[1:])
    runs[:-1] |= nl[:-2] & nl[1:-1] & nl[2:]
    plain = ~(special | np.logical_or.reduceat(np.append(runs, False), starts))
    for i in np.flatnonzero(_docs_where(_control_table().take(c), doc, n)).tolist():
        if _CONTROL_RE.search(out[i]):
            out[i] = _CONTROL_RE.sub("", out[i])
            repaired["control_chars_removed"] += 1
            plain[i] = False  # (removing a character may join two spaces)
    return [t.strip() if p else normalize_whitespace(t, s) for t, p, s in zip(out, plain.tolist(), special.tolist())]
