"""DataConfig: the ``[data]`` section of a text2llm config (cleaning, filtering, dedup).

Importing this module is cheap (pydantic only): no trafilatura, no numpy, no torch.

A *preset* chooses the filter set and its thresholds for one kind of text:

===========  ==============================================================================
``stories``  clean English prose (TinyStories): light rules, length bounds, exact + near dedup
``web-en``   English web text: Gopher quality + repetition, C4 line rules, FineWeb rules, langid
``zh``       Chinese: the same families with CJK-aware counting (characters, not spaces)
===========  ==============================================================================

Any field given explicitly (in TOML or as ``data.min_words=20``) overrides the preset value::

    DataConfig(preset="zh", min_words=100)   # zh thresholds, but at least 100 "words" (CJK chars count)

The preset is applied once, when the model is validated; ``model_copy(update=...)`` does not
re-apply it, so build a new ``DataConfig(**fields)`` to switch presets.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Preset = Literal["stories", "web-en", "zh"]

ALL_FILTERS = (
    "length",
    "language",
    "gopher_quality",
    "gopher_repetition",
    "c4",
    "fineweb",
)

# Values that each preset sets; anything not listed keeps the field default below.
PRESETS: dict[str, dict[str, Any]] = {
    "stories": {
        "filters": ["length", "gopher_repetition"],
        "c4_drop_lines": False,
        "min_words": 20,
        "max_words": 100_000,
        "languages": ["en"],
        "dup_line_frac": 0.5,
        "dup_para_frac": 0.5,
        "dup_line_char_frac": 0.5,
        "dup_para_char_frac": 0.5,
        "top_ngram_char_frac": [0.5, 0.5, 0.5],
        "dup_ngram_char_frac": [0.6, 0.6, 0.6, 0.6, 0.6, 0.6],
    },
    "web-en": {
        "filters": ["length", "language", "gopher_quality", "gopher_repetition", "c4", "fineweb"],
        "c4_drop_lines": False,  # FineWeb's choice: dropping lines without end punctuation removes too much
        "min_words": 50,
        "languages": ["en"],
    },
    "zh": {
        "filters": ["length", "language", "gopher_quality", "gopher_repetition", "fineweb"],
        "c4_drop_lines": False,
        "min_words": 20,  # CJK characters; classical poems are short
        "languages": ["zh"],
        # classical poems are short and lines repeat refrains; be lenient on repetition of lines
        "dup_line_frac": 0.5,
        "dup_line_char_frac": 0.4,
        # every Han character is a "word", so n-grams are short; and refrains are common in classical poetry
        "top_ngram_char_frac": [0.3, 0.3, 0.3],
        "dup_ngram_char_frac": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
        "max_symbol_word_ratio": 0.1,
        "min_stop_words": 0,  # classical poems have few function characters
        "min_alpha_word_frac": 0.5,
        "min_mean_word_len": 1.0,
        "max_mean_word_len": 10.0,
        "fineweb_min_line_punct_frac": 0.0,
        "fineweb_max_short_line_frac": 1.0,
        "fineweb_max_newline_ratio": 1.0,
        "fineweb_max_dup_line_char_frac": 0.3,
    },
}


class DataConfig(BaseModel):
    """Settings of the data stage (``text2llm clean`` and the first step of ``text2llm run``)."""

    model_config = ConfigDict(extra="forbid")

    # --- what to run -------------------------------------------------------------------
    preset: Preset = Field(
        "stories",
        description="Filter set and thresholds: 'stories' (clean English prose), 'web-en' "
        "(English web text, FineWeb-like), 'zh' (Chinese). Explicit fields override it.",
    )
    filter: bool = Field(True, description="Run the quality filters (False = extraction and normalisation only).")
    dedup: bool = Field(True, description="Remove exact and near (MinHash-LSH) duplicates over the whole corpus.")
    filters: list[str] = Field(
        default_factory=lambda: list(PRESETS["stories"]["filters"]),
        description=f"Names of the quality filters to run, in order; any of {', '.join(ALL_FILTERS)}.",
    )

    # --- readers -----------------------------------------------------------------------
    text_field: str = Field("text", min_length=1, description="JSONL field holding the document text.")
    id_field: str = Field("id", min_length=1, description="JSONL field holding the document id (made up when absent).")
    txt_separator: str = Field(
        "file",
        min_length=1,
        description="How a .txt file splits into documents: 'file' (one per file), 'blank-line' "
        "(paragraph blocks), 'line' (one per line), or a literal separator such as '<|endoftext|>'.",
    )
    max_doc_bytes: int = Field(
        20_000_000, ge=1_000, description="Longer records (after decoding) are skipped and counted as too_large."
    )

    # --- normalisation -----------------------------------------------------------------
    fix_unicode: bool = Field(True, description="Repair mojibake and broken Unicode with ftfy.")
    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="Unicode normal form ('NFKC' also folds full-width ASCII; CJK punctuation is kept by NFC)."
    )

    # --- output ------------------------------------------------------------------------
    shard_docs: int = Field(50_000, ge=1, description="At most this many documents per clean-*.jsonl.gz shard.")
    shard_bytes: int = Field(
        256_000_000, ge=1_000, description="Start a new shard once this many UTF-8 text bytes were written."
    )
    write_rejected: bool = Field(True, description="Write dropped documents with their reason to rejected-*.jsonl.gz.")
    batch_docs: int = Field(256, ge=1, le=100_000, description="At most this many documents are sent to a worker at a time.")
    batch_chars: int = Field(
        200_000, ge=1_000, description="A batch is closed once it holds this many characters (bounds worker memory)."
    )

    # --- length ------------------------------------------------------------------------
    min_words: int = Field(20, ge=0, description="Fewer words (CJK: characters count as words) -> drop 'length:too_short'.")
    max_words: int = Field(100_000, ge=1, description="More words -> drop 'length:too_long'.")
    min_chars: int = Field(1, ge=0, description="Fewer non-space characters -> drop 'length:too_few_chars'.")

    # --- language id (py3langid; its model ships inside the package) --------------------
    languages: list[str] = Field(default_factory=lambda: ["en"], description="Allowed ISO 639-1 codes.")
    language_min_score: float = Field(0.65, ge=0.0, le=1.0, description="Minimum langid probability of an allowed language.")

    # --- Gopher quality (Rae et al. 2021) ------------------------------------------------
    min_mean_word_len: float = Field(3.0, ge=0.0, description="Mean word length below this -> drop.")
    max_mean_word_len: float = Field(10.0, ge=0.0, description="Mean word length above this -> drop.")
    max_symbol_word_ratio: float = Field(0.1, ge=0.0, description="('#' + '...' count) / words above this -> drop.")
    max_bullet_lines_frac: float = Field(0.9, ge=0.0, le=1.0, description="Fraction of lines starting with a bullet above this -> drop.")
    max_ellipsis_lines_frac: float = Field(0.3, ge=0.0, le=1.0, description="Fraction of lines ending in an ellipsis above this -> drop.")
    min_alpha_word_frac: float = Field(0.8, ge=0.0, le=1.0, description="Fraction of words with a letter below this -> drop.")
    min_stop_words: int = Field(2, ge=0, description="Fewer distinct English stop words (the, be, to, of, and, that, have, with) -> drop.")

    # --- Gopher repetition ---------------------------------------------------------------
    dup_line_frac: float = Field(0.3, ge=0.0, le=1.0, description="Fraction of lines that are duplicates above this -> drop.")
    dup_para_frac: float = Field(0.3, ge=0.0, le=1.0, description="Fraction of paragraphs that are duplicates above this -> drop.")
    dup_line_char_frac: float = Field(0.2, ge=0.0, le=1.0, description="Fraction of characters in duplicate lines above this -> drop.")
    dup_para_char_frac: float = Field(0.2, ge=0.0, le=1.0, description="Fraction of characters in duplicate paragraphs above this -> drop.")
    top_ngram_char_frac: list[float] = Field(
        default_factory=lambda: [0.20, 0.18, 0.16],
        min_length=3, max_length=3,
        description="For n = 2, 3, 4: characters covered by the most frequent word n-gram, max fraction.",
    )
    dup_ngram_char_frac: list[float] = Field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10],
        min_length=6, max_length=6,
        description="For n = 5..10: characters covered by duplicated word n-grams, max fraction.",
    )

    # --- C4 (Raffel et al. 2020) ----------------------------------------------------------
    c4_drop_lines: bool = Field(
        False,
        description="C4: also remove lines without terminal punctuation (lines mentioning javascript or "
        "cookie/privacy policy, and lines of < c4_min_words_per_line words, are always removed).",
    )
    c4_min_words_per_line: int = Field(3, ge=0, description="C4: lines with fewer words are removed.")
    c4_min_sentences: int = Field(3, ge=0, description="C4: fewer sentences -> drop 'c4:too_few_sentences'.")
    c4_max_word_len: int = Field(1000, ge=1, description="C4: a longer word -> drop.")

    # --- FineWeb (Penedo et al. 2024) -----------------------------------------------------
    fineweb_min_line_punct_frac: float = Field(0.12, ge=0.0, le=1.0, description="Fraction of lines ending in punctuation below this -> drop.")
    fineweb_max_short_line_frac: float = Field(0.67, ge=0.0, le=1.0, description="Fraction of lines of <= 30 chars above this -> drop.")
    fineweb_max_dup_line_char_frac: float = Field(0.1, ge=0.0, le=1.0, description="Characters in duplicated lines / all characters above this -> drop.")
    fineweb_max_newline_ratio: float = Field(0.3, ge=0.0, description="Newlines / words above this -> drop.")

    # --- deduplication ---------------------------------------------------------------------
    word_ngram: int = Field(
        5, ge=1, le=32,
        description="Words per MinHash shingle. Every CJK character is a word, so for Chinese these are character n-grams.",
    )
    minhash_bands: int = Field(14, ge=1, le=256, description="LSH bands.")
    minhash_rows: int = Field(8, ge=1, le=64, description="Rows (hashes) per LSH band; bands x rows permutations.")
    minhash_threshold: float = Field(
        0.8, ge=0.0, le=1.0, description="Estimated Jaccard at or above which an LSH candidate counts as a near duplicate."
    )
    seed: int = Field(1, ge=0, description="Seed of the MinHash permutations.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Fill every field the user did not give with the preset's value."""
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "stories")
        if preset not in PRESETS:
            return data  # the Literal check reports it
        return {**PRESETS[preset], **data}

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        unknown = [f for f in self.filters if f not in ALL_FILTERS]
        if unknown:
            raise ValueError(f"filters: unknown {unknown}; choose from {list(ALL_FILTERS)}")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) > max_words ({self.max_words})")
        if self.min_mean_word_len > self.max_mean_word_len:
            raise ValueError("min_mean_word_len > max_mean_word_len")
        return self

    @property
    def num_perm(self) -> int:
        """MinHash signature length (bands x rows)."""
        return self.minhash_bands * self.minhash_rows
