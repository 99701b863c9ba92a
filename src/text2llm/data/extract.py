"""HTML -> main text.

``html_to_text(data, charset_hint, repaired)`` decodes the page bytes (BOM, HTTP charset,
``<meta charset>``, the corpus wrapper ``<text ... encoding="gb2312">``, then detection; GB2312 and
GBK pages are read as GB18030), then extracts the main text with trafilatura (precision-tuned
readability + jusText fallback), which drops navigation, ads, scripts, styles and comments and
keeps paragraph breaks. If trafilatura finds nothing, a plain selectolax text dump of ``<body>``
without script/style/nav/header/footer is used, so a page never silently vanishes.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterator

from text2llm.data.config import DataConfig
from text2llm.data.document import Document
from text2llm.data.readers import decode_bytes, iter_raw, resolve_inputs

_META_CHARSET_RE = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([\w\-]+)""", re.I)
_WRAPPER_RE = re.compile(rb"""^\s*<text\b[^>]*\bencoding\s*=\s*["']?([\w\-]+)""", re.I)
_WRAPPER_LINE_RE = re.compile(r"^\s*<text\b[^>]*>\s*", re.I)


def declared_charset(data: bytes, hint: str | None = None) -> str | None:
    """The charset the page declares: HTTP header hint, corpus wrapper, or ``<meta>`` in the head."""
    if hint:
        return hint
    head = data[:4096]
    m = _WRAPPER_RE.search(head) or _META_CHARSET_RE.search(head)
    return m.group(1).decode("ascii", "ignore") if m else None


def decode_html(data: bytes | str, hint: str | None, repaired: Counter) -> str:
    """Page bytes -> str, with the corpus wrapper line removed."""
    html = data if isinstance(data, str) else decode_bytes(data, declared_charset(data, hint), repaired)
    return _WRAPPER_LINE_RE.sub("", html, count=1)


def html_to_text(data: bytes | str, hint: str | None, repaired: Counter) -> str:
    """Main text of a page, paragraphs separated by newlines; '' when there is none."""
    html = decode_html(data, hint, repaired)
    text = _trafilatura(html)
    if not text:
        text = _fallback(html)
        if text:
            repaired["html_fallback_extractor"] += 1
    return text or ""


def _trafilatura(html: str) -> str | None:
    import trafilatura

    try:
        return trafilatura.extract(
            html,
            include_comments=False,
            include_tables=True,
            include_links=False,
            include_images=False,
            favor_recall=True,
            deduplicate=False,
            with_metadata=False,
        )
    except Exception:  # noqa: BLE001 - a parser crash on one bad page must not stop the run
        return None


def _fallback(html: str) -> str:
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(html)
    for tag in ("script", "style", "noscript", "nav", "header", "footer", "aside", "form", "iframe"):
        for node in tree.css(tag):
            node.decompose()
    body = tree.body or tree.root
    return body.text(separator="\n", strip=True) if body is not None else ""


def extraction_f1(pred: str, gold: str, zh: bool) -> float:
    """Bag-of-words F1 of extracted text against gold text: words for English, characters for Chinese."""
    tok = (lambda t: [c for c in t if not c.isspace()]) if zh else (lambda t: re.findall(r"\w+", t.lower()))
    p, g = Counter(tok(pred)), Counter(tok(gold))
    overlap = sum((p & g).values())
    if not overlap:
        return 0.0
    prec, rec = overlap / sum(p.values()), overlap / sum(g.values())
    return 2 * prec * rec / (prec + rec)


def iter_documents(inputs: list[str | Path], cfg: DataConfig | None = None) -> Iterator[Document]:
    """Raw inputs as Documents (HTML extracted, text not normalised or filtered), in input order."""
    cfg = cfg or DataConfig()
    skipped: Counter = Counter()
    repaired: Counter = Counter()
    for rid, src, kind, payload, charset in iter_raw(resolve_inputs(inputs), cfg, skipped, repaired):
        text = html_to_text(payload, charset, repaired) if kind == "html" else payload
        yield Document(rid, text, src)
