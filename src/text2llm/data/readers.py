"""Input readers: .txt, .jsonl(.gz), .html/.htm(.gz) files or dirs, WARC -> raw records.

Readers run in the main process and do only cheap work (decompression, line splitting, JSON
parsing, WARC framing). HTML is passed on as *bytes* with a charset hint; the worker processes
decode and extract it (see :mod:`text2llm.data.extract`), so the expensive part runs in parallel.

A raw record is a tuple ``(id, source, kind, payload, charset)``: ``kind`` is ``"text"`` (payload
is ``str``) or ``"html"`` (payload is ``bytes``, ``charset`` a hint from HTTP headers or None).

Nothing here raises on bad *content*: a malformed line, a missing field, undecodable bytes, a
binary or empty file, a huge line or a truncated .gz is skipped (or repaired) and counted in
the ``skipped`` / ``repaired`` counters the caller passes in. A missing or unreadable *path* is
a :class:`~text2llm.errors.UserError`, raised before any work starts.
"""

from __future__ import annotations

import codecs
from bisect import bisect_left
from itertools import accumulate
import os
import re
from collections import Counter
from pathlib import Path
from typing import IO, Iterator

import orjson

from text2llm.data.config import DataConfig
from text2llm.data.document import Document
from text2llm.data.fastio import GZIP_CORRUPT, GZIP_ERRORS, GzipFile, gzip_decompress, gzip_reader, lenient_loads
from text2llm.data.fastio import loads as fast_loads
from text2llm.errors import UserError

Raw = tuple  # (id: str, source: str, kind: "text" | "html" | "jsonl_block", payload: str | bytes | list, charset: str | None)
# kind "jsonl_block" (only with ``iter_raw(..., defer_json=True)``): a batch of unparsed JSON lines,
# ``(file name, path, "jsonl_block", [line bytes | None], number of the first line)``;
# :func:`parse_jsonl_block` makes them "text" records

_CHUNK = 1 << 20

# file kinds by (lower-cased) name ending; a dir is walked for these
_KINDS = (
    (".jsonl.gz", "jsonl"), (".jsonl", "jsonl"), (".json.gz", "jsonl"), (".ndjson", "jsonl"),
    (".html.gz", "html"), (".htm.gz", "html"), (".html", "html"), (".htm", "html"), (".xhtml", "html"),
    (".warc.gz", "warc"), (".warc", "warc"),
    (".txt.gz", "txt"), (".txt", "txt"), (".text", "txt"), (".md", "txt"),
)


# a corpus dir's own documentation, not corpus text (Hugging Face datasets reads README.md as the
# dataset card, not as data): skipped when a dir is walked, read when named explicitly
_METADATA_STEMS = frozenset(
    {"README", "LICENSE", "LICENCE", "COPYING", "NOTICE", "CHANGELOG", "CHANGES", "CITATION", "AUTHORS", "CONTRIBUTING"}
)


def is_metadata_file(path: Path) -> bool:
    """``README.md``, ``LICENSE.txt``, ``CHANGELOG.md``...: a dataset's documentation (by the
    name before its first dot, in any case)."""
    return path.name.split(".", 1)[0].upper() in _METADATA_STEMS


def file_kind(path: Path) -> str | None:
    """The reader for ``path`` by its name ending, or None when the ending is unknown."""
    name = path.name.lower()
    for end, kind in _KINDS:
        if name.endswith(end):
            return kind
    return None


def resolve_inputs(inputs: list[str | Path]) -> list[tuple[Path, str]]:
    """Expand dirs (sorted, recursive) into ``(file, kind)`` pairs; fail early on bad paths.

    A file given explicitly with an unknown ending is sniffed (``{`` -> jsonl, ``<`` -> html,
    ``WARC/`` -> warc, else txt). Files of unknown type inside a dir are ignored, and so are a
    dataset's own documentation files (:func:`is_metadata_file`: ``README.md``, ``LICENSE.txt``,
    ...); name one explicitly to read it.
    """
    if not inputs:
        raise UserError("clean: no input paths given")
    out: list[tuple[Path, str]] = []
    for given in inputs:
        p = Path(given)
        if not p.exists():
            raise UserError(f"{p}: no such file or directory")
        if p.is_dir():
            if not os.access(p, os.R_OK | os.X_OK):
                raise UserError(f"{p}: directory is not readable")
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            found = [(f, k) for f in files if (k := file_kind(f)) and not is_metadata_file(f)]
            if not found:
                raise UserError(f"{p}: directory holds no .txt, .jsonl[.gz], .html[.gz] or .warc[.gz] files")
            out.extend(found)
        else:
            if not os.access(p, os.R_OK):
                raise UserError(f"{p}: file is not readable (permission denied)")
            out.append((p, file_kind(p) or _sniff(p)))
    for f, _ in out:
        if not os.access(f, os.R_OK):
            raise UserError(f"{f}: file is not readable (permission denied)")
    return out


def _sniff(path: Path) -> str:
    try:
        with _open(path) as f:
            head = f.read(512).lstrip()
    except GZIP_ERRORS:
        return "txt"
    if head.startswith(b"WARC/"):
        return "warc"
    if head.startswith(b"{"):
        return "jsonl"
    if head[:1] == b"<":
        return "html"
    return "txt"


def _open(path: Path) -> IO[bytes]:
    """Open ``path`` for binary reading, transparently gunzipping ``*.gz`` (or gzip magic)."""
    f = open(path, "rb")
    magic = f.read(2)
    f.seek(0)
    if magic == b"\x1f\x8b":
        return gzip_reader(f)
    return f


# ---------------------------------------------------------------------------------------
# encodings


def is_binary(sample: bytes) -> bool:
    """True for data that is not text: many NULs or C0 controls in the first bytes (UTF-16 excepted)."""
    if not sample or sample[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        return False
    ctrl = sum(sample.count(bytes([c])) for c in range(32) if c not in (9, 10, 12, 13, 27))
    return ctrl > 0.1 * len(sample)


_CJK_RE = re.compile(r"[\u3400-\u9fff]")


def detect_encoding(sample: bytes, declared: str | None = None) -> str:
    """Best codec name for ``sample``: BOM, then a declared charset that fits, UTF-8, GB18030, cp1252.

    GB2312 and GBK are read as GB18030 (their superset), since pages that declare gb2312 often
    use GBK characters. The caller decodes with ``errors="replace"``, so a wrong guess never fails.
    """
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    cut = sample[:-8] if len(sample) > 64 else sample  # a sample may end mid-character
    if declared:
        declared = normalize_charset(declared)
        if declared:
            try:
                cut.decode(declared)
                return declared
            except (UnicodeDecodeError, LookupError):
                pass
    try:
        cut.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        text = cut.decode("gb18030")
        if len(_CJK_RE.findall(text[:4000])) >= 5:
            return "gb18030"
    except UnicodeDecodeError:
        pass
    if declared:
        return declared  # does not fit perfectly, still the best hint (decoded with replace)
    return "cp1252"


def normalize_charset(name: str) -> str | None:
    """Map a declared charset to a Python codec (gb2312/gbk -> gb18030), None when unknown."""
    name = name.strip().strip("\"'").lower()
    if name in ("gb2312", "gbk", "gb_2312-80", "x-gbk", "gb18030", "cp936", "euc-cn"):
        return "gb18030"
    if name in ("iso-8859-1", "latin-1", "latin1", "us-ascii", "ascii"):
        return "cp1252"  # what browsers do
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def decode_bytes(data: bytes, declared: str | None, repaired: Counter) -> str:
    """Decode ``data`` with the detected encoding, replacing (and counting) undecodable bytes."""
    enc = detect_encoding(data[:65536], declared)
    try:
        return data.decode(enc)
    except UnicodeDecodeError:
        repaired["undecodable_bytes_replaced"] += 1
        return data.decode(enc, errors="replace")


# ---------------------------------------------------------------------------------------
# readers


def iter_raw(
    files: list[tuple[Path, str]], cfg: DataConfig, skipped: Counter, repaired: Counter, defer_json: bool = False
) -> Iterator[Raw]:
    """Raw records from every file in order; problems are counted, never raised.

    ``defer_json``: JSON lines come unparsed, a batch at a time, as ``"jsonl_block"`` records
    (parsed later, in the workers, by :func:`parse_jsonl_block`, which counts their problems there).
    """
    for path, kind in files:
        reader = {"jsonl": read_jsonl, "txt": read_txt, "html": read_html, "warc": read_warc}[kind]
        try:
            if kind == "jsonl":
                yield from read_jsonl(path, cfg, skipped, repaired, defer_json)
            else:
                yield from reader(path, cfg, skipped, repaired)
        except GZIP_CORRUPT:
            skipped["truncated_or_corrupt_gzip"] += 1  # records before the damage were kept
        except OSError:
            skipped["unreadable_file"] += 1  # vanished or failed mid-run; the run goes on


def _line_chunks(f: IO[bytes], limit: int, skipped: Counter, chunk: int = 1 << 14) -> Iterator[tuple[int, list]]:
    """The lines of ``f`` (without their ``\\n``) a read at a time: ``(number of the first, lines)``;
    a line of more than ``limit`` bytes is skipped whole, in bounded memory, and stands as None.

    Reads ``chunk`` bytes at a time and splits them: per line, no Python work at all (one
    ``readline`` per line costs ~3x more on gzip input). Small reads keep what a damaged gzip
    stream gives before the damage: its reader raises without returning a read's partial output.
    """
    n = 1  # number of the next line
    part: list[bytes] = []  # the start of the current line, from earlier chunks
    size = 0  # its length; -1 once it is known to be too long (its bytes are dropped)
    read = getattr(f, "read1", f.read)
    while data := read(chunk):
        lines = data.split(b"\n")
        tail = lines.pop()
        if lines:
            first = lines[0]
            if size < 0 or size + len(first) > limit:
                skipped["line_too_large"] += 1
                lines[0] = None
            elif part:
                lines[0] = b"".join(part) + first
            if max(map(len, lines[1:]), default=0) > limit:
                for i in range(1, len(lines)):
                    if len(lines[i]) > limit:
                        skipped["line_too_large"] += 1
                        lines[i] = None
            yield n, lines
            n += len(lines)
            part, size = [], 0
        if size >= 0 and size + len(tail) <= limit:
            if tail:
                part.append(tail)
                size += len(tail)
        else:
            part, size = [], -1
    if size < 0:
        skipped["line_too_large"] += 1
    elif part:
        yield n, [b"".join(part)]


def _est_chars(lines: list) -> list[int]:
    """Per line, the characters it will have as text (for the batch cut): its bytes, a third of
    them when not ASCII (~ characters of CJK text); 0 for a skipped line."""
    if None not in lines and all(map(bytes.isascii, lines)):
        return list(map(len, lines))
    return [0 if b is None else len(b) if b.isascii() else len(b) // 3 for b in lines]


def _jsonl_blocks(chunks: Iterator[tuple[int, list]], max_lines: int, max_chars: int) -> Iterator[tuple[int, list]]:
    """Regroup line chunks into blocks cut as :func:`text2llm.workers.batched` cuts records:
    at ``max_lines`` lines, or once the estimated characters reach ``max_chars``. The cut depends
    only on the lines, never on how they were read."""
    block: list = []
    first_no, chars = 1, 0
    for n, lines in chunks:
        sizes = _est_chars(lines)
        i = 0
        while i < len(lines):
            if not block:
                first_no = n + i
            room = min(max_lines - len(block), len(lines) - i)
            run = list(accumulate(sizes[i : i + room]))
            k = bisect_left(run, max_chars - chars) + 1  # lines up to and including the one that reaches max_chars
            if k > room:
                k = room
            block.extend(lines[i : i + k])
            chars += run[k - 1]
            i += k
            if len(block) >= max_lines or chars >= max_chars:
                yield first_no, block
                block, chars = [], 0
    if block:
        yield first_no, block


def read_jsonl(path: Path, cfg: DataConfig, skipped: Counter, repaired: Counter, defer: bool = False) -> Iterator[Raw]:
    """One record per line; text from ``cfg.text_field``, id from ``cfg.id_field`` (else ``path:line``).

    ``defer``: yield the lines unparsed, in blocks of a batch each (``cfg.batch_docs`` lines,
    ``cfg.batch_chars`` characters), as ``(name, path, "jsonl_block", lines, first line number)``
    records (see :func:`parse_jsonl_block`); a blank or too-long line holds its place in a block.
    """
    with _open(path) as f:
        any_line = False
        name, src = path.name, str(path)
        chunks = _line_chunks(f, cfg.max_doc_bytes * 2, skipped)
        if defer:
            for first, block in _jsonl_blocks(chunks, cfg.batch_docs, cfg.batch_chars):
                any_line = any_line or any(map(bytes.strip, filter(None, block)))
                yield (name, src, "jsonl_block", block, first)
        else:
            for first, lines in chunks:
                for i, line in enumerate(lines):
                    if line is None or not line.strip():
                        continue
                    any_line = True
                    rec = parse_jsonl_line(f"{name}:{first + i}", src, line, cfg, skipped, repaired)
                    if rec is not None:
                        yield rec
        if not any_line:
            skipped["empty_file"] += 1


def parse_jsonl_block(rec: Raw, cfg: DataConfig, skipped: Counter, repaired: Counter) -> Iterator[Raw]:
    """The documents of a ``"jsonl_block"`` record of :func:`read_jsonl` (problems counted)."""
    name, src, _, lines, first = rec
    for i, line in enumerate(lines):
        if line is None or not line.strip():
            continue
        doc = parse_jsonl_line(f"{name}:{first + i}", src, line, cfg, skipped, repaired)
        if doc is not None:
            yield doc


def parse_jsonl_line(rid: str, src: str, line: bytes, cfg: DataConfig, skipped: Counter, repaired: Counter) -> Raw | None:
    """A JSON line -> ``(id, source, "text", text, None)``, or None (counted in ``skipped``).

    ``rid`` and ``src`` are the defaults (``file:line`` and the path) for records without an id or url.
    """
    try:
        rec = orjson.loads(line)  # valid UTF-8 and strict JSON: nearly every line
    except orjson.JSONDecodeError:
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError:
            s = line.decode("utf-8", errors="replace")
            repaired["invalid_utf8_replaced"] += 1
        try:
            rec = lenient_loads(s)  # raw control chars in strings are allowed (cleaned later)
        except ValueError:
            skipped["malformed_json"] += 1
            return None
    if not isinstance(rec, dict):
        skipped["malformed_json"] += 1
        return None
    text = rec.get(cfg.text_field)
    if not isinstance(text, str):
        skipped["missing_text_field"] += 1
        return None
    if not text.strip():
        skipped["empty_text"] += 1
        return None
    if len(text) > cfg.max_doc_bytes:
        skipped["too_large"] += 1
        return None
    rid2 = rec.get(cfg.id_field)
    if isinstance(rid2, float) and isinstance(line, bytes):  # orjson reads an integer past 64 bits as a float
        rid2 = lenient_loads(line.decode("utf-8", errors="replace")).get(cfg.id_field)
    rid = str(rid2) if isinstance(rid2, (str, int)) and str(rid2) else rid
    url = rec.get("url")
    return (rid, url if isinstance(url, str) else src, "text", text, None)


_SEPARATORS = {"file": None, "blank-line": re.compile(r"\n[ \t\r\f\v]*\n"), "line": re.compile(r"\n")}


def read_txt(path: Path, cfg: DataConfig, skipped: Counter, repaired: Counter) -> Iterator[Raw]:
    """A .txt file as one document, or split on blank lines, lines or a literal separator.

    Streams in 1 MB chunks with an incremental decoder (encoding detected on the first 64 KB).
    """
    sep = cfg.txt_separator
    pattern = _SEPARATORS.get(sep, re.compile(re.escape(sep))) if sep != "file" else None
    with _open(path) as f:
        head = f.read(65536)
        if not head.strip():
            skipped["empty_file"] += 1
            return
        if is_binary(head[:8192]):
            skipped["binary_file"] += 1
            return
        enc = detect_encoding(head)
        decoder = codecs.getincrementaldecoder(enc)(errors="replace")
        n_doc = 0
        buf = ""
        too_large = False
        chunk = head
        while True:
            final = not chunk
            text = decoder.decode(chunk, final=final)
            if "\ufffd" in text and "\ufffd" not in chunk.decode("latin-1"):
                repaired["undecodable_bytes_replaced"] += 1
            buf += text
            if pattern is None:
                if len(buf) > cfg.max_doc_bytes:
                    skipped["too_large"] += 1
                    return
            else:
                parts = pattern.split(buf)
                buf = parts.pop()  # may continue in the next chunk
                if final:
                    parts.append(buf)
                    buf = ""
                for part in parts:
                    if too_large:  # tail of an over-long document
                        too_large = False
                        continue
                    if part.strip():
                        n_doc += 1
                        yield (f"{path.name}:{n_doc}", str(path), "text", part, None)
                if len(buf) > cfg.max_doc_bytes:
                    skipped["too_large"] += 1
                    buf = ""
                    too_large = True
            if final:
                break
            chunk = f.read(_CHUNK)
        if pattern is None and buf.strip():
            yield (path.name, str(path), "text", buf, None)
        elif pattern is None:
            skipped["empty_file"] += 1


def read_html(path: Path, cfg: DataConfig, skipped: Counter, repaired: Counter) -> Iterator[Raw]:
    """One HTML page per file, passed on as bytes (decoded and extracted in a worker)."""
    with _open(path) as f:
        data = f.read(cfg.max_doc_bytes + 1)
    if len(data) > cfg.max_doc_bytes:
        skipped["too_large"] += 1
    elif not data.strip():
        skipped["empty_file"] += 1
    elif is_binary(data[:8192]):
        skipped["binary_file"] += 1
    else:
        name = path.name
        for end in (".gz", ".html", ".htm", ".xhtml"):
            name = name[: -len(end)] if name.lower().endswith(end) else name
        yield (name, str(path), "html", data, None)


def _headers(block: bytes) -> dict[str, str]:
    out = {}
    for line in block.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k:
            out[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
    return out


def _dechunk(body: bytes) -> bytes:
    out, i = [], 0
    while i < len(body):
        j = body.find(b"\r\n", i)
        if j < 0:
            break
        try:
            size = int(body[i:j].split(b";")[0], 16)
        except ValueError:
            return body  # not chunked after all
        if size == 0:
            break
        out.append(body[j + 2 : j + 2 + size])
        i = j + 2 + size + 2
    return b"".join(out)


def read_warc(path: Path, cfg: DataConfig, skipped: Counter, repaired: Counter) -> Iterator[Raw]:
    """HTML responses from a WARC file (``WARC-Type: response``, ``application/http``)."""
    n = 0
    with _open(path) as f:
        while True:
            line = f.readline(65536)
            if not line:
                break
            if not line.strip():
                continue
            if not line.startswith(b"WARC/"):
                skipped["warc_malformed_record"] += 1
                break  # lost framing; stop reading this file
            hdr = [line.rstrip(b"\r\n")]
            while (h := f.readline(65536)) and h.strip():
                hdr.append(h.rstrip(b"\r\n"))
            headers = _headers(b"\r\n".join(hdr))
            try:
                length = int(headers.get("content-length", ""))
            except ValueError:
                skipped["warc_malformed_record"] += 1
                break
            if length > cfg.max_doc_bytes * 2:
                f.seek(length, 1) if not isinstance(f, GzipFile) else _skip(f, length)
                skipped["too_large"] += 1
                continue
            block = f.read(length)
            if len(block) < length:
                skipped["warc_truncated_record"] += 1
                break
            if headers.get("warc-type") != "response" or "application/http" not in headers.get("content-type", ""):
                continue
            n += 1
            http_head, _, body = block.partition(b"\r\n\r\n")
            http = _headers(http_head)
            ctype = http.get("content-type", "")
            if "html" not in ctype.lower():
                skipped["warc_non_html"] += 1
                continue
            if "chunked" in http.get("transfer-encoding", "").lower():
                body = _dechunk(body)
            if http.get("content-encoding", "").lower() in ("gzip", "x-gzip"):
                try:
                    body = gzip_decompress(body)
                except GZIP_ERRORS:
                    skipped["warc_bad_content_encoding"] += 1
                    continue
            if not body.strip():
                skipped["empty_text"] += 1
                continue
            m = re.search(r"charset=([\w\-]+)", ctype, re.I)
            rid = headers.get("warc-record-id", "").strip("<>") or f"{path.name}:{n}"
            yield (rid, headers.get("warc-target-uri", str(path)), "html", body, m.group(1) if m else None)


def _skip(f: IO[bytes], n: int) -> None:
    while n > 0:
        got = f.read(min(n, _CHUNK))
        if not got:
            return
        n -= len(got)


# ---------------------------------------------------------------------------------------
# cleaned shards (what the tokenizer and pack stages read)


def cleaned_files(path: str | Path) -> list[Path]:
    """The files of a cleaned-shard dir (``clean-*.jsonl.gz`` in sorted order), or one .jsonl[.gz] file."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("clean-*.jsonl.gz")) or sorted(p.glob("clean-*.jsonl"))
        if not files:
            raise UserError(f"{p}: no clean-*.jsonl.gz shards here (run `text2llm clean` first)")
        return files
    if p.is_file():
        return [p]
    raise UserError(f"{p}: no such file or directory")


def iter_cleaned_lines(path: str | Path) -> Iterator[tuple[Path, int, bytes]]:
    """(file, line number, raw JSON line) of every non-blank line of :func:`cleaned_files`: for a
    reader that parses in other processes (``pack``)."""
    for f in cleaned_files(path):
        with _open(f) as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    yield f, n, line


def parse_cleaned_line(f: Path | str, n: int, line: bytes) -> Document:
    """One cleaned-shard record as a Document; a bad one is a UserError naming ``f:n``."""
    try:
        rec = fast_loads(line)
        text = rec["text"]
        if not isinstance(text, str):
            raise TypeError
        return Document(str(rec.get("id", f"{Path(f).name}:{n}")), text, str(rec.get("source", f)))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{f}:{n}: not a cleaned-shard record (need JSON with a 'text' field)") from None


def iter_cleaned(path: str | Path) -> Iterator[Document]:
    """Documents from a cleaned-shard dir (``clean-*.jsonl.gz`` in sorted order) or one .jsonl[.gz] file."""
    for f, n, line in iter_cleaned_lines(path):
        yield parse_cleaned_line(f, n, line)
