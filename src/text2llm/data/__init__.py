"""The data stage: raw text, JSONL, HTML and WARC -> cleaned, filtered, deduplicated shards.

Entry points (imported lazily, so ``import text2llm.data`` stays cheap)::

    from text2llm.data import DataConfig, Document, run_clean, iter_cleaned, iter_documents
    stats = run_clean(["corpus.jsonl.gz"], "out/clean", DataConfig(preset="web-en"), workers=2)
    for doc in iter_cleaned("out/clean"): ...

Modules: ``config`` (DataConfig and presets), ``readers`` (input formats, encodings, WARC),
``extract`` (HTML -> main text), ``normalize`` (Unicode repair, whitespace), ``filters``
(named quality filters), ``dedup`` (exact + MinHash-LSH), ``pipeline`` (workers, shards, stats).
"""

from __future__ import annotations

from text2llm.data.config import DataConfig
from text2llm.data.document import Document

__all__ = ["DataConfig", "Document", "run_clean", "iter_cleaned", "iter_documents"]


def __getattr__(name: str):
    if name == "run_clean":
        from text2llm.data.pipeline import run_clean

        return run_clean
    if name == "iter_cleaned":
        from text2llm.data.readers import iter_cleaned

        return iter_cleaned
    if name == "iter_documents":  # (raw inputs with their HTML extracted)
        from text2llm.data.extract import iter_documents

        return iter_documents
    raise AttributeError(f"module 'text2llm.data' has no attribute {name!r}")
