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
  so file reading is not counted). ``mb_per_cpu_s`` divides by the CPU seconds of this process
  and its workers, which is robust to other load on a shared machine.
  Targets: ``pack`` per worker >= 0.8x the raw one-thread encode; 2 workers >= 1.7x one.
  ``encode_scaling`` sums these up; ``pack_per_worker_vs_raw_cpu`` compares MB per CPU-second
  (the wall-clock ratios need an otherwise idle 2-core machine to mean anything).
"""

from __future__ import annotations

import sys
from pathlib import Path

# this file is named like the stdlib's `tokenize`: keep its dir off sys.path so imports find the real one
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import gzip
import json
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


def _timed(fn, repeats: int):
    """Best wall time (and the CPU seconds of that run) over ``repeats`` runs."""
    best = None
    for _ in range(repeats):
        c0, t0 = _cpu(), time.perf_counter()
        result = fn()
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        if best is None or wall < best[0]:
            best = (wall, cpu, result)
    return best


def emit(**rec) -> None:
    print(json.dumps(rec), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 MB of each corpus, vocab 4096 only, one repeat")
    ap.add_argument("--types", default="bpe,bytelevel,unigram", help="backends, comma-separated")
    ap.add_argument("--encode-only", action="store_true",
                    help="only the encode cases (tokenizers trained at vocab 4096 on 2 MB, training not reported)")
    a = ap.parse_args()

    from text2llm.config import PackConfig, TokenizerConfig
    from text2llm.errors import UserError
    from text2llm.pack import pack
    from text2llm.tokenizer import Tokenizer, train_tokenizer

    if not DATA.is_dir():
        emit(case="skipped", reason=f"{DATA} not found")
        return 0
    size = 1_000_000 if a.quick else 6_000_000
    corpora = {
        "en": _docs(["tinystories/train-000.jsonl.gz", "tinystories/train-001.jsonl.gz"], size),
        "zh": _docs(["zh/novels-000.jsonl.gz", "zh/novels-001.jsonl.gz", "zh/poetry-000.jsonl.gz"],
                    size if a.quick else 50_000_000),
    }
    mb = {k: sum(len(d.text.encode("utf-8")) for d in v) / 1e6 for k, v in corpora.items()}
    vocabs = [4096] if a.quick or a.encode_only else [4096, 32000]
    train_bytes = 2_000_000 if a.encode_only else 50_000_000
    repeats = 1 if a.quick else 3
    load = os.getloadavg()[0]
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

    for (typ, lang, vocab), path in tokenizers.items():
        if vocab != 4096:
            continue
        tok = Tokenizer.load(path)
        docs = corpora[lang]
        texts = [d.text for d in docs]
        raw = {}
        for threads in ([1, 2] if tok.backend == "sentencepiece" else [1]):
            if tok.backend == "sentencepiece":
                fn = lambda: tok._sp.encode(texts, num_threads=threads)  # noqa: E731
            else:
                # the fastest batch call the backend has, ids extracted (what any user of it needs)
                fn = lambda: [e.ids for e in tok._hf.encode_batch_fast(texts, add_special_tokens=False)]  # noqa: E731
            wall, cpu, _ = _timed(fn, repeats)
            raw[threads] = mb[lang] / wall
            raw[f"cpu{threads}"] = mb[lang] / cpu
            emit(case="encode", what=f"raw_{threads}thread", type=typ, lang=lang, vocab=vocab, mb=round(mb[lang], 2),
                 mb_per_s=round(mb[lang] / wall, 3), mb_per_cpu_s=round(mb[lang] / cpu, 3))
        packed = {}
        for workers in (1, 2):
            cfg = PackConfig(workers=workers, val_fraction=0.01)
            wall, cpu, _ = _timed(lambda: pack(docs, path, tmp / "tokens", cfg, overwrite=True, progress=False), repeats)
            packed[workers] = mb[lang] / wall
            packed[f"cpu{workers}"] = mb[lang] / cpu
            emit(case="encode", what=f"pack_{workers}worker", type=typ, lang=lang, vocab=vocab, mb=round(mb[lang], 2),
                 mb_per_s=round(mb[lang] / wall, 3), mb_per_cpu_s=round(mb[lang] / cpu, 3),
                 per_worker_vs_raw=round(packed[workers] / workers / raw[1], 3),
                 load_avg=round(os.getloadavg()[0], 2))
        emit(case="encode_scaling", type=typ, lang=lang, pack_2_vs_1=round(packed[2] / packed[1], 3),
             pack_1_vs_raw=round(packed[1] / raw[1], 3),
             pack_per_worker_vs_raw_cpu=round(min(packed["cpu1"], packed["cpu2"]) / raw["cpu1"], 3),
             target_pack_vs_raw=0.8, target_2_vs_1=1.7,
             cpus=os.cpu_count(), load_avg_start=round(load, 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
