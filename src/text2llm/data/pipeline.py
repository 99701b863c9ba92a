"""The cleaning pipeline: read -> (workers: extract, normalise, filter, hash) -> dedup -> shards.

::

    main process                          worker processes (--workers N)
    ------------                          ------------------------------
    readers.iter_raw  -- batches -->      process_batch: JSON parsing, HTML extraction,
    (JSON lines unparsed, in              normalisation, quality filters, exact key, MinHash,
    batch-sized blocks)                   output lines encoded and gzipped (one member a batch)
    Deduplicator (input order)  <-- results, in order (imap)
    ShardWriter: clean-*.jsonl.gz, rejected-*.jsonl.gz (members appended), stats.json

Determinism: batches are cut by the input alone (record count and size, never by worker), every
unit is a pure function of the document (batch statistics are per document too), results come back in input order and dedup runs in one place, so the output is
byte-identical for any ``workers``. Memory: at most ``2 * workers`` batches are in flight, and
documents are streamed to gzip shards; what grows with the corpus is only the dedup index (one
hash per kept document, ``bands`` dict entries and a ``bands x rows`` uint32 signature: ~1.9 KB
per kept document in CPython, ~2 GB per million; ``benchmarks/clean.py`` case ``dedup_index_memory``).

Atomic output: everything is written to a staging dir beside ``out_dir`` and swapped in with
renames at the end, so an interrupted run leaves the old output untouched (never a mix).
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import shutil
import sys
import time
from collections import Counter
from itertools import groupby
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from text2llm.data.config import DataConfig
from text2llm.data.document import Document
from text2llm.data.dedup import Deduplicator, MinHasher, exact_key
from text2llm.data.extract import html_to_text
from text2llm.data.fastio import gzip_compress, gzip_decompress
from text2llm.data.filters import DocStats, LanguageFilter, build_filters
from text2llm.data.normalize import _control_table, _mojibake_tables, _ws_table, normalize_batch
from text2llm.data.readers import iter_raw, parse_jsonl_block, resolve_inputs
from text2llm.data.textstats import BatchStats, _tables
from text2llm.errors import UserError
from text2llm.files import begin_staging, swap_in
from text2llm.workers import QuietPool, batched, bounded_imap

# ---------------------------------------------------------------------------------------
# worker side

_STATE: dict = {}


def _init_worker(cfg_json: str, warm: bool = False) -> None:
    """Build the per-process units once (filters, MinHasher) from the config's JSON.

    ``warm`` also loads everything that is otherwise loaded lazily (HTML extractor, lookup
    tables, the langid model), so that forked workers inherit it instead of each loading it.
    """

    cfg = DataConfig.model_validate_json(cfg_json)
    _STATE.clear()
    _STATE.update(cfg=cfg, filters=build_filters(cfg), minhash=MinHasher(cfg) if cfg.dedup else None)
    if warm:
        import trafilatura  # noqa: F401


        _tables()
        _control_table()
        _mojibake_tables()
        _ws_table()
        if any(isinstance(f, LanguageFilter) for f in _STATE["filters"]):
            LanguageFilter.identifier()


def process_batch(batch: list[tuple]) -> tuple[list[tuple], bytes, bytes, dict, dict, int]:
    """Raw records -> per document ``(reason | None, exact_key, band keys, signature bytes,
    JSON line length, text bytes)``, and the JSON lines themselves compressed here, in parallel:
    one gzip member of the kept documents' lines and one of the rejected ones' (with their
    reasons; empty unless ``write_rejected``). The main process appends the members to the shards
    as they are, unless dedup drops a document of the batch or a shard ends inside it
    (:func:`_write_batch`).

    Word statistics for the filters and MinHash are computed once for the whole batch
    (:class:`~text2llm.data.textstats.BatchStats`). Also returns a dict of repairs, a dict of
    skipped records (unparsable JSON lines and the like) and the input bytes of the documents
    (text as UTF-8, HTML as read).
    """

    cfg, filters, minhash = _STATE["cfg"], _STATE["filters"], _STATE["minhash"]
    repaired: Counter = Counter()
    skipped: Counter = Counter()
    docs = []
    bytes_in = 0
    if len(batch) == 1 and batch[0][2] == "jsonl_block":
        batch = list(parse_jsonl_block(batch[0], cfg, skipped, repaired))
    for rec in batch:
        rid, src, kind, payload, charset = rec
        bytes_in += _payload_bytes(payload)
        text = html_to_text(payload, charset, repaired) if kind == "html" else payload
        docs.append(Document(rid, text, src))
    for d, text in zip(docs, normalize_batch([d.text for d in docs], cfg, repaired)):
        d.text = text
    stats = BatchStats([d.text for d in docs]) if (filters or minhash) else None
    # a document's statistics are row i of ``stats`` while ``in_main[i]``; texts a filter edits
    # (C4 line rules) get a re-computed BatchStats, and their DocStats in ``views``
    in_main = np.ones(len(docs), dtype=bool)
    views: dict[int, DocStats] = {}
    reasons: list[str | None] = [None if d.text else "empty:after_normalisation" for d in docs]
    keep = [i for i, r in enumerate(reasons) if r is None]
    if filters:
        # filter by filter over the batch: each document still meets the filters in order and
        # stops at its first drop, and texts a filter edits get new statistics in one batch
        # instead of one by one
        alive = np.zeros(len(docs), dtype=bool)
        alive[keep] = True
        for f in filters:
            idx = np.flatnonzero(alive)
            if not len(idx):
                break
            # the batch fast path settles most documents; the others are checked one by one
            rest = idx[~_batch_passes(f, idx, views, stats, in_main)].tolist()
            for i in rest:
                d = docs[i]
                if "_stats" not in d.__dict__:  # (the filter's stats_of finds them there)
                    d.__dict__["_stats"] = DocStats(d.text, stats, i)
                reason = f(d)
                if reason:
                    reasons[i] = reason
                    alive[i] = False
            edited = [i for i in rest if alive[i] and docs[i].__dict__["_stats"].text is not docs[i].text]
            if edited:
                fresh = BatchStats([docs[i].text for i in edited])
                for k, i in enumerate(edited):
                    docs[i].__dict__["_stats"] = views[i] = DocStats(docs[i].text, fresh, k)
                in_main[edited] = False
        keep = np.flatnonzero(alive).tolist()
    sigs = bands = None
    if minhash is not None and keep:
        keep_arr = np.array(keep, dtype=np.int64)
        main = in_main[keep_arr]
        sigs = np.empty((len(keep), minhash.p), dtype=np.uint32)
        if main.any():
            sigs[main] = minhash.batch_signatures(stats, keep_arr[main])
        for batch_stats, ks, rows in _by_batch(views, keep, np.flatnonzero(~main).tolist()):
            sigs[ks] = minhash.batch_signatures(batch_stats, rows)
        bands = minhash.band_keys(sigs, cfg.minhash_bands).tolist()
    out = []
    kept_lines, rejected_lines = [], []
    k = 0
    for i, doc in enumerate(docs):
        if reasons[i] is None and minhash is not None:
            b, row = (stats, i) if in_main[i] else (views[i].batch, views[i].i)
            if b.texts[row] is doc.text:
                key = exact_key(doc.text, b.lower[row], bool(b.plain[row]))
            else:
                key = exact_key(doc.text)
            band, sig = bands[k], sigs[k].tobytes()
            k += 1
        else:
            key = band = sig = None
        line = json_line(doc, reasons[i])  # encoded here, in parallel
        if reasons[i] is None:
            kept_lines.append(line)
        elif cfg.write_rejected:
            rejected_lines.append(line)
        t = doc.text
        out.append((reasons[i], key, band, sig, len(line), len(t) if t.isascii() else len(t.encode("utf-8"))))
    return out, gzip_member(kept_lines), gzip_member(rejected_lines), dict(repaired), dict(skipped), bytes_in


def _by_batch(views: list, docs, ks: list[int]) -> list[tuple]:
    """The positions ``ks`` (of ``docs``, document indices) whose statistics live in re-computed
    :class:`BatchStats`, grouped by that batch: ``[(batch, positions, its rows), ...]``."""
    groups: dict[int, tuple] = {}
    for k in ks:
        v = views[docs[k]]
        g = groups.setdefault(id(v.batch), (v.batch, [], []))
        g[1].append(k)
        g[2].append(v.i)
    return list(groups.values())


def _batch_passes(f, idx, views: list, stats, in_main):
    """Bool mask over the documents ``idx``: those that ``f`` certainly passes unchanged, by its
    batch fast path (:meth:`~text2llm.data.filters.Filter.passes`, per :class:`BatchStats` the
    views point into: ``stats``, row = document index, where ``in_main``; else a re-computed one)."""
    settled = np.zeros(len(idx), dtype=bool)
    main = in_main[idx]
    if main.any():
        mask = f.passes(stats, idx[main])
        if mask is not None:
            settled[np.flatnonzero(main)[mask]] = True
    if not main.all():
        for batch_stats, ks, rows in _by_batch(views, idx, np.flatnonzero(~main).tolist()):
            mask = f.passes(batch_stats, np.array(rows, dtype=np.int64))
            if mask is not None:
                settled[np.array(ks)[mask]] = True
    return settled


# ---------------------------------------------------------------------------------------
# output

_quote = json.encoder.encode_basestring  # a JSON string literal, non-ASCII kept (the C function)


def json_line(doc: Document, reason: str | None = None) -> bytes:
    """``json.dumps({"id", "text", "source"[, "reason"]}, ensure_ascii=False) + "\\n"`` as UTF-8, built directly."""
    line = f'{{"id": {_quote(doc.id)}, "text": {_quote(doc.text)}, "source": {_quote(doc.source)}'
    if reason is not None:
        line += f', "reason": {_quote(reason)}'
    return (line + "}\n").encode("utf-8")


def gzip_member(lines: list[bytes]) -> bytes:
    """The lines as one gzip member (deterministic header: mtime 0, no name). A shard is members
    back to back, a valid gzip file (RFC 1952) that every gzip reader reads whole."""
    return gzip_compress(b"".join(lines)) if lines else b""


class ShardWriter:
    """Writes ``{prefix}-00000.jsonl.gz`` ...: a new shard starts before a document once the current
    one holds ``max_docs`` documents or ``max_bytes`` bytes of text."""

    def __init__(self, out_dir: Path, prefix: str, max_docs: int, max_bytes: int):
        self.out_dir, self.prefix, self.max_docs, self.max_bytes = out_dir, prefix, max_docs, max_bytes
        self.index = 0
        self.docs = self.bytes = 0
        self.files: list[str] = []
        self._f = None
        self._pending: list[bytes] = []

    def _roll_if_full(self) -> None:
        if self._f is not None and (self.docs >= self.max_docs or self.bytes >= self.max_bytes):
            self.flush()
            self._f.close()
            self._f = None
            self.index += 1
        if self._f is None:
            name = f"{self.prefix}-{self.index:05d}.jsonl.gz"
            self._f = open(self.out_dir / name, "wb")
            self.files.append(name)
            self.docs = self.bytes = 0

    def write_member(self, member: bytes, sizes: list[int]) -> bool:
        """Append a gzip member of whole lines, documents of text ``sizes``, if they all go into
        the current shard under the rule of :meth:`write` (else write nothing and return False)."""
        self._roll_if_full()
        if self.docs + len(sizes) - 1 >= self.max_docs or self.bytes + sum(sizes[:-1]) >= self.max_bytes:
            return False
        self.flush()
        self._f.write(member)
        self.docs += len(sizes)
        self.bytes += sum(sizes)
        return True

    def write(self, line: bytes, n_bytes: int) -> None:
        """Append one encoded JSON line (``n_bytes`` of text, for the shard size limit); the lines
        written one by one are compressed as a member at the next :meth:`flush` or shard change."""
        self._roll_if_full()
        self._pending.append(line)
        self.docs += 1
        self.bytes += n_bytes

    def flush(self) -> None:
        if self._pending:
            self._f.write(gzip_member(self._pending))
            self._pending = []

    def close(self) -> None:
        if self._f is not None:
            self.flush()
            self._f.close()
            self._f = None


def _split_member(member: bytes, lengths: list[int]) -> list[bytes]:
    data = gzip_decompress(member) if member else b""
    out, pos = [], 0
    for n in lengths:
        out.append(data[pos : pos + n])
        pos += n
    return out


def _write_batch(rows: list[tuple], dup: dict[int, str], kept: bytes, rejected: bytes,
                 clean: ShardWriter, rejected_writer: ShardWriter | None) -> None:
    """Write one batch's documents to the shards. ``rows`` are :func:`process_batch`'s; ``dup``
    maps the positions dedup removed to their reasons. The workers' members are appended as they
    are when nothing was removed here and the batch fits in the current shards; otherwise the
    lines are taken out of the members and written one by one (same shard rule, same bytes
    whatever the worker count)."""
    if not dup:
        if kept and clean.write_member(kept, [r[5] for r in rows if r[0] is None]):
            kept = b""
        if rejected and rejected_writer is not None and \
                rejected_writer.write_member(rejected, [r[5] for r in rows if r[0] is not None]):
            rejected = b""
    kept_lines = iter(_split_member(kept, [r[4] for r in rows if r[0] is None]))
    rejected_lines = iter(_split_member(rejected, [r[4] for r in rows if r[0] is not None])
                          if rejected_writer is not None else [])
    for i, (reason, _key, _band, _sig, _n_line, n) in enumerate(rows):
        if reason is None:
            if not kept:
                continue  # written as a member above
            line = next(kept_lines)
            if i in dup:  # rejected here: add the reason to the worker's line
                if rejected_writer is not None:
                    rejected_writer.write(line[: -len(b"}\n")] + f', "reason": {_quote(dup[i])}}}\n'.encode("utf-8"), n)
                continue
            clean.write(line, n)
        elif rejected_writer is not None and rejected:
            rejected_writer.write(next(rejected_lines), n)
    clean.flush()
    if rejected_writer is not None:
        rejected_writer.flush()


# ---------------------------------------------------------------------------------------
# the run


def _size(rec: tuple) -> int:
    """A record's size for the batch cut: characters of text; bytes of HTML."""
    return len(rec[3])


def _batches(records: Iterable[tuple], cfg: DataConfig) -> Iterator[list[tuple]]:
    """Work units: a ``"jsonl_block"`` record (JSON lines the reader already cut to a batch) is one
    alone; runs of other records are grouped by :func:`~text2llm.workers.batched`. The cuts
    depend only on the input, never on the number of workers."""
    for block, run in groupby(records, key=lambda rec: rec[2] == "jsonl_block"):
        if block:
            yield from ([rec] for rec in run)
        else:
            yield from batched(run, cfg.batch_docs, cfg.batch_chars, _size)


def _payload_bytes(payload) -> int:
    return len(payload) if isinstance(payload, bytes) else len(payload.encode("utf-8", "surrogatepass"))


def run_clean(
    inputs: list[str | Path],
    out_dir: str | Path,
    cfg: DataConfig | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Clean, filter and deduplicate ``inputs`` into ``out_dir``; return the stats (also in stats.json).

    Raises :class:`UserError` for a missing/unreadable input or a non-empty ``out_dir`` without
    ``overwrite``. Bad records never raise: they are skipped and counted in ``stats["skipped"]``.
    """

    cfg = cfg or DataConfig()
    if workers < 1:
        raise UserError(f"--workers: must be >= 1, got {workers}")
    out_dir = Path(out_dir).resolve()  # resolved so that "." or "out/" still has a name and a parent
    files = resolve_inputs(inputs)
    staging = begin_staging(out_dir, overwrite)

    skipped: Counter = Counter()
    repaired: Counter = Counter()
    removed: Counter = Counter()
    reasons: Counter = Counter()
    counts = Counter()
    dedup = Deduplicator(cfg) if cfg.dedup else None
    clean = ShardWriter(staging, "clean", cfg.shard_docs, cfg.shard_bytes)
    rejected = ShardWriter(staging, "rejected", cfg.shard_docs, cfg.shard_bytes) if cfg.write_rejected else None
    input_bytes = sum(f.stat().st_size for f, _ in files)

    # JSON lines are parsed in the workers; they count documents, input bytes and skipped lines
    raw_iter = iter_raw(files, cfg, skipped, repaired, defer_json=True)
    batches = _batches(raw_iter, cfg)
    cfg_json = cfg.model_dump_json()
    display = _Progress(input_bytes, enabled=progress)
    t0 = time.perf_counter()
    pool = None
    try:
        _init_worker(cfg_json, warm=workers > 1)
        if workers == 1:
            results = map(process_batch, batches)
        else:
            # fork after warming up (imports, lookup tables, langid model) so each worker starts
            # ready; elsewhere spawn and let the initializer build the state
            method = "fork" if "fork" in mp.get_all_start_methods() and sys.platform == "linux" else "spawn"
            if method == "fork":
                gc.freeze()  # the inherited objects are never collected in the workers: fewer copied pages
            try:
                pool = QuietPool(
                    workers, None if method == "fork" else _init_worker, (cfg_json,), context=mp.get_context(method)
                )
            finally:
                if method == "fork":
                    gc.unfreeze()
            results = bounded_imap(pool, process_batch, batches, 2 * workers)
        for rows, kept_member, rejected_member, batch_repaired, batch_skipped, batch_bytes in results:
            repaired.update(batch_repaired)
            skipped.update(batch_skipped)
            counts["docs_in"] += len(rows)
            counts["bytes_in"] += batch_bytes
            dup: dict[int, str] = {}
            for i, (reason, key, bands, sig, _n_line, n) in enumerate(rows):
                if reason is None and dedup is not None:
                    reason = dedup.check(key, bands, sig)
                    if reason is not None:
                        dup[i] = reason
                if reason is None:
                    counts["docs_out"] += 1
                    counts["bytes_out"] += n
                else:
                    removed[reason.split(":", 1)[0]] += 1
                    reasons[reason] += 1
            _write_batch(rows, dup, kept_member, rejected_member, clean, rejected)
            display.update(counts["docs_in"], counts["bytes_in"])
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:
        if pool is not None:
            pool.terminate()
        clean.close()
        if rejected is not None:
            rejected.close()
        shutil.rmtree(staging, ignore_errors=True)
        display.close()
        raise
    clean.close()
    if rejected is not None:
        rejected.close()
    elapsed = time.perf_counter() - t0
    display.close()

    stats = {
        "docs_in": counts["docs_in"],
        "docs_out": counts["docs_out"],
        "bytes_in": counts["bytes_in"],
        "bytes_out": counts["bytes_out"],
        "input_files": len(files),
        "input_file_bytes": input_bytes,
        "removed": dict(sorted(removed.items())),
        "removed_reasons": dict(sorted(reasons.items())),
        "skipped": dict(sorted(skipped.items())),
        "repaired": dict(sorted(repaired.items())),
        "shards": clean.files,
        "rejected_shards": rejected.files if rejected is not None else [],
        "preset": cfg.preset,
        "filters": cfg.filters if cfg.filter else [],
        "dedup": cfg.dedup,
    }
    (staging / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    swap_in(staging, out_dir)
    if progress:
        _print_summary(stats, elapsed, out_dir)
    return {**stats, "elapsed_s": round(elapsed, 3)}


# ---------------------------------------------------------------------------------------
# progress and summary


class _Progress:
    """A one-line rich progress display on stderr: documents/s and MB/s."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.enabled = enabled and total_bytes > 0
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._live = None
        if self.enabled:
            self._live = Progress(
                TextColumn("clean"),
                BarColumn(),
                TextColumn("{task.fields[docs]:,} docs  {task.fields[dps]:,.0f} docs/s  {task.fields[mbps]:.1f} MB/s"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._task = self._live.add_task("clean", total=total_bytes, docs=0, dps=0.0, mbps=0.0)
            self._live.start()

    def update(self, docs: int, nbytes: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < 0.2:
            return
        self._last = now
        dt = max(now - self.t0, 1e-9)
        # bytes_in counts decompressed text; the bar is against file bytes, so only approximate
        self._live.update(self._task, completed=nbytes, docs=docs, dps=docs / dt, mbps=nbytes / dt / 1e6)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def _print_summary(stats: dict, elapsed: float, out_dir: Path) -> None:
    """The closing table: documents removed per filter, skipped inputs, throughput."""
    n_in = max(stats["docs_in"], 1)
    table = Table(title=f"text2llm clean -> {out_dir}", title_justify="left")
    table.add_column("step")
    table.add_column("documents", justify="right")
    table.add_column("share", justify="right")
    table.add_row("read", f"{stats['docs_in']:,}", "100.0%")
    for name, n in sorted(stats["removed"].items(), key=lambda kv: -kv[1]):
        table.add_row(f"removed by {name}", f"{n:,}", f"{100 * n / n_in:.1f}%")
    table.add_row("kept", f"{stats['docs_out']:,}", f"{100 * stats['docs_out'] / n_in:.1f}%")
    for reason, n in stats["skipped"].items():
        table.add_row(f"skipped input: {reason}", f"{n:,}", "")
    console = Console(stderr=True)
    console.print(table)
    mb = stats["bytes_in"] / 1e6
    console.print(
        f"{mb:.1f} MB in, {stats['bytes_out'] / 1e6:.1f} MB out in {elapsed:.1f} s "
        f"({mb / max(elapsed, 1e-9):.1f} MB/s, {stats['docs_in'] / max(elapsed, 1e-9):,.0f} docs/s)"
    )
