"""Benchmark of the tokenizer and pack stages on ../shared/data. One JSON object per line.

    flock /tmp/text2llm-bench.lock .venv/bin/python benchmarks/tokenize.py [--quick] [--types bpe,bytelevel,unigram]

Cases:
* ``train``: tokenizer training seconds on ~5 MB of English (TinyStories) and on the Chinese
  corpus (../shared/data/zh, ~10 MB), per backend, at vocab 4096 and 32000. When a vocab cannot
  hold the characters SentencePiece must cover, the run retries at character_coverage 0.98 and
  says so (``character_coverage``).
* ``bytes_per_token``: UTF-8 bytes per token of each trained tokenizer on its own corpus.
* ``encode``: MB/s of the raw backend's own batch encode on one thread (and, for SentencePiece,
  on 2 threads), and of ``pack`` with 1 and 2 workers on the same documents (an in-memory list,
  so file reading is not counted). A fast backend gets the corpus repeated (``corpus_copies``,
  ``mb``) until its raw one-thread encode takes >= ``--min-seconds`` (1 s): ratios of runs of
  0.3 s were mostly the pool start and the last unit, not the encoding. ``threads`` is the
  backend threads per process: the raw
  one-thread call (SentencePiece ``num_threads=1``; ``tokenizers`` with
  ``TOKENIZERS_PARALLELISM=false``, set below for the whole run) and every pack worker use one.
  The cases run interleaved (raw, pack 1, pack 2, raw, ...) and each reports its best of the
  repeats, so a change in the machine's load hits all of them alike. ``mb_per_cpu_s`` divides by
  the CPU seconds of this process and its workers (best of the repeats), which is robust to other
  load on a shared machine.
  Targets: ``pack`` per worker >= 0.8x the raw one-thread encode; 2 workers >= 1.7x one.
  The first lines (``machine_scaling``, benchmarks/scaling.py) give what two processes of perfectly
  independent work reach on this machine at the time: the ceiling for the 2-worker ratio.
  ``encode_scaling`` sums these up; ``pack_per_worker_vs_raw_cpu`` compares MB per CPU-second
  (the wall-clock ratios need an otherwise idle 2-core machine to mean anything: ``load_avg``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# this file is named like the stdlib's `tokenize`: keep its dir off sys.path so imports find the real one
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import gzip
import json
import math
import os
import resource
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the raw HF batch encode runs on one thread
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _docs(files: list[str], limit_bytes: int):
    from text2llm.data.document import Document

    out, n = [], 0
    for f in files:
        with gzip.open(DATA / f, "rt", encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                out.append(Document(str(rec.get("id", len(out))), rec["text"], f))
                n += len(rec["text"].encode("utf-8"))
                if n >= limit_bytes:
                    return out
    return out


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _timed(fns: dict, repeats: int) -> dict:
    """Per name, the best wall time and the least CPU seconds over ``repeats`` rounds; each round
    runs every function once, in order (interleaved, so load that comes and goes is shared)."""
    best: dict = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = _cpu(), time.perf_counter()
            fn()
            wall, cpu = time.perf_counter() - t0, _cpu() - c0
            w, c = best.get(name, (wall, cpu))
            best[name] = (min(w, wall), min(c, cpu))
    return best


def emit(**rec) -> None:
    print(json.dumps(rec), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 MB of each corpus, vocab 4096 only, one repeat")
    ap.add_argument("--types", default="bpe,bytelevel,unigram", help="backends, comma-separated")
    ap.add_argument("--encode-only", action="store_true",
                    help="only the encode cases (tokenizers trained at vocab 4096 on 2 MB, training not reported)")
    ap.add_argument("--repeats", type=int, help="rounds per encode case, best taken (default 3; --quick: 1)")
    ap.add_argument("--min-seconds", type=float, default=1.0,
                    help="encode cases: repeat the corpus until the raw one-thread encode takes this long (default 1.0)")
    a = ap.parse_args()

    from text2llm.config import PackConfig, TokenizerConfig
    from text2llm.errors import UserError
    from text2llm.pack import pack
    from text2llm.workers import process_scaling
    from text2llm.tokenizer import Tokenizer, train_tokenizer

    if not DATA.is_dir():
        emit(case="skipped", reason=f"{DATA} not found")
        return 0
    for rec in process_scaling(repeats=3):  # what 2 processes give here for independent work: the ceiling
        emit(**rec)
    size = 1_000_000 if a.quick else 6_000_000
    corpora = {
        "en": _docs(["tinystories/train-000.jsonl.gz", "tinystories/train-001.jsonl.gz"], size),
        "zh": _docs(["zh/novels-000.jsonl.gz", "zh/novels-001.jsonl.gz", "zh/poetry-000.jsonl.gz"],
                    size if a.quick else 50_000_000),
    }
    mb = {k: sum(len(d.text.encode("utf-8")) for d in v) / 1e6 for k, v in corpora.items()}
    vocabs = [4096] if a.quick or a.encode_only else [4096, 32000]
    train_bytes = 2_000_000 if a.encode_only else 50_000_000
    repeats = a.repeats or (1 if a.quick else 3)
    tmp = Path(tempfile.mkdtemp(prefix="t2l-bench-tok-"))
    tokenizers: dict[tuple, Path] = {}

    for typ in a.types.split(","):
        for lang, docs in corpora.items():
            texts = [d.text for d in docs]
            for vocab in vocabs:
                out = tmp / f"{typ}-{lang}-{vocab}"
                cov = 0.9995
                try:
                    t0 = time.perf_counter()
                    train_tokenizer(texts, out, TokenizerConfig(type=typ, vocab_size=vocab, character_coverage=cov,
                                                    max_train_bytes=train_bytes),
                                    overwrite=True)
                except UserError as e:
                    if "required_chars" not in str(e):
                        emit(case="train", type=typ, lang=lang, vocab=vocab, error=str(e))
                        continue
                    cov = 0.98
                    t0 = time.perf_counter()
                    train_tokenizer(texts, out, TokenizerConfig(type=typ, vocab_size=vocab, character_coverage=cov,
                                                    max_train_bytes=train_bytes),
                                    overwrite=True)
                secs = time.perf_counter() - t0
                tok = Tokenizer.load(out)
                tokenizers[(typ, lang, vocab)] = out
                n_tok = sum(map(len, tok.encode_batch(texts)))
                if a.encode_only:
                    continue
                emit(case="train", type=typ, lang=lang, mb=round(mb[lang], 2), vocab=vocab, vocab_out=tok.vocab_size,
                     character_coverage=cov if typ != "bytelevel" else None, seconds=round(secs, 2),
                     load_avg=round(os.getloadavg()[0], 2))
                emit(case="bytes_per_token", type=typ, lang=lang, vocab=vocab,
                     bytes_per_token=round(mb[lang] * 1e6 / n_tok, 3))

    from text2llm.data.document import Document

    for (typ, lang, vocab), path in tokenizers.items():
        if vocab != 4096:
            continue
        tok = Tokenizer.load(path)
        docs = corpora[lang]
        # the corpus repeated until the raw one-thread encode takes >= --min-seconds, so that the
        # ratios are of steady throughput: in a 0.3 s run the pool start (~15 ms), the last unit
        # and the process start-up weigh as much as the encoding (copies get their own ids)
        if tok.backend == "sentencepiece":
            def raw_encode(texts, threads=1):
                return tok._sp.encode(texts, num_threads=threads)
        else:
            # the fastest batch call the backend has, ids extracted (what any user of it needs);
            # one thread: TOKENIZERS_PARALLELISM=false
            def raw_encode(texts, threads=1):
                return [e.ids for e in tok._hf.encode_batch_fast(texts, add_special_tokens=False)]
        t0 = time.perf_counter()
        raw_encode([d.text for d in docs])
        copies = max(1, math.ceil(a.min_seconds / (time.perf_counter() - t0)))
        if copies > 1:
            docs = [Document(f"{d.id}#{k}", d.text, d.source) for k in range(copies) for d in docs]
        texts = [d.text for d in docs]
        mb_run = mb[lang] * copies
        fns = {}
        for threads in ([1, 2] if tok.backend == "sentencepiece" else [1]):
            fns[f"raw_{threads}thread"] = lambda n=threads: raw_encode(texts, n)
        for workers in (1, 2):
            cfg = PackConfig(workers=workers, val_fraction=0.01)
            fns[f"pack_{workers}worker"] = lambda c=cfg: pack(docs, path, tmp / "tokens", c, overwrite=True, progress=False)
        load0 = os.getloadavg()[0]
        best = _timed(fns, repeats)
        rate = {k: mb_run / w for k, (w, _) in best.items()}
        cpu_rate = {k: mb_run / c for k, (_, c) in best.items()}
        for what, (wall, cpu) in best.items():
            rec = dict(case="encode", what=what, type=typ, lang=lang, vocab=vocab, mb=round(mb_run, 2), corpus_copies=copies,
                       threads=int(what.split("_")[1][0]) if what.startswith("raw") else 1,
                       mb_per_s=round(rate[what], 3), mb_per_cpu_s=round(cpu_rate[what], 3))
            if what.startswith("pack"):
                workers = int(what.split("_")[1][0])
                rec.update(workers=workers, per_worker_vs_raw=round(rate[what] / workers / rate["raw_1thread"], 3))
            emit(**rec)
        p1, p2 = rate["pack_1worker"] / rate["raw_1thread"], rate["pack_2worker"] / rate["pack_1worker"]
        per_worker_cpu = min(cpu_rate["pack_1worker"], cpu_rate["pack_2worker"]) / cpu_rate["raw_1thread"]
        raw2 = rate["raw_2thread"] / rate["raw_1thread"] if "raw_2thread" in rate else None
        emit(case="encode_scaling", type=typ, lang=lang, pack_2_vs_1=round(p2, 3),
             raw_2_vs_1=None if raw2 is None else round(raw2, 3), pack_1_vs_raw=round(p1, 3),
             pack_per_worker_vs_raw_cpu=round(per_worker_cpu, 3), target_pack_vs_raw=0.8, target_2_vs_1=1.7,
             met_pack_vs_raw=p1 >= 0.8, met_2_vs_1=p2 >= 1.7, threads_per_process=1, repeats=repeats,
             mb=round(mb_run, 2), corpus_copies=copies,
             cpus=os.cpu_count(), load_avg_start=round(load0, 2), load_avg_end=round(os.getloadavg()[0], 2))
    for rec in process_scaling(repeats=3):  # and again at the end: the machine drifts
        emit(**rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
