"""Tokenizers: train one (SentencePiece BPE / unigram) and use it through one interface.

Special tokens have fixed ids in every text2llm tokenizer::

    0 <pad>   1 <s> (BOS)   2 </s> (EOS)   3 <unk>   then user-defined extras, then the vocab

The tokenizer is lossless: ``decode(encode(text)) == text`` for any valid Unicode text. For
SentencePiece this means: no normalisation (rule ``identity``), no dummy prefix, no removal of
repeated whitespace, and byte fallback so that every character has a spelling (``<0x0A>`` for a
newline a vocab does not hold, and so on).

A tokenizer dir holds the backend's own file (``tokenizer.model``) and ``text2llm-tokenizer.json``
(backend, vocab size, special ids, fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from text2llm.errors import UserError

META_FILE = "text2llm-tokenizer.json"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


class Tokenizer:
    """One interface over the backends. Load with ``Tokenizer.load(dir)``."""

    def __init__(self, backend: str, path: Path, meta: dict):
        self.backend = backend
        self.path = Path(path)
        self.meta = meta
        if backend == "sentencepiece":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(self.path / "tokenizer.model"))
        else:
            raise UserError(f"{self.path / META_FILE}: unknown tokenizer backend '{backend}'")
        self.specials = {self.pad_id, self.bos_id, self.eos_id}

    # ---- loading / saving ----------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise UserError(f"{path}: not a tokenizer dir (no {META_FILE}); train one with `text2llm tokenizer train`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{meta_path}: not valid JSON ({e})") from None
        return cls(meta["backend"], path, meta)

    def save(self, out_dir: str | Path) -> Path:
        """Copy the tokenizer files to ``out_dir`` (e.g. beside a checkpoint)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for f in self.path.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
        return out

    # ---- ids -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def pad_id(self) -> int:
        return int(self.meta["special_ids"]["pad"])

    @property
    def bos_id(self) -> int:
        return int(self.meta["special_ids"]["bos"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["special_ids"]["eos"])

    @property
    def unk_id(self) -> int:
        return int(self.meta["special_ids"]["unk"])

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def id_to_token(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def token_to_id(self, token: str) -> int:
        return int(self._sp.piece_to_id(token))

    # ---- encode / decode -------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens only when asked."""
        ids = self._sp.encode(text)
        if add_bos:
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False,
                     num_threads: int = 1) -> list[list[int]]:
        ids = self._sp.encode(list(texts), num_threads=num_threads)
        if add_bos or add_eos:
            ids = [([self.bos_id] if add_bos else []) + x + ([self.eos_id] if add_eos else []) for x in ids]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; pad/BOS/EOS are dropped."""
        return self._sp.decode([int(i) for i in ids if int(i) not in self.specials])

    def __repr__(self) -> str:
        return f"Tokenizer(backend={self.backend!r}, vocab_size={self.vocab_size}, path='{self.path}')"


# ---- training ----------------------------------------------------------------------------------


def _file_fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _sample_lines(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Paragraph lines of the corpus up to ``max_bytes`` (SentencePiece trains on lines)."""
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            yield line
            seen += len(line.encode("utf-8"))
            if seen >= max_bytes:
                return


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, cfg, overwrite: bool = False) -> Tokenizer:
    """Train a tokenizer on ``texts`` (an iterable of documents) into ``out_dir``.

    ``cfg`` is a :class:`text2llm.config.TokenizerConfig`.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: output dir is not empty (pass --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.type in ("bpe", "unigram"):
        _train_sentencepiece(texts, out, cfg)
    else:
        raise UserError(f"tokenizer.type '{cfg.type}' is not available in this build")
    return Tokenizer.load(out)


def _train_sentencepiece(texts: Iterable[str], out: Path, cfg) -> None:
    import io

    import sentencepiece as spm

    lines = list(_sample_lines(texts, cfg.max_train_bytes))
    if not lines:
        raise UserError("tokenizer training: the input holds no text")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type=cfg.type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            pad_piece=PAD, bos_piece=BOS, eos_piece=EOS, unk_piece=UNK,
            user_defined_symbols=list(cfg.user_defined_symbols),
            max_sentence_length=1 << 16,
            num_threads=cfg.threads,
            train_extremely_large_corpus=False,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(f"tokenizer training failed: {str(e).strip().splitlines()[-1]}") from None
    (out / "tokenizer.model").write_bytes(model.getvalue())
    meta = {
        "backend": "sentencepiece",
        "type": cfg.type,
        "vocab_size": cfg.vocab_size,
        "special_ids": {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID},
        "user_defined_symbols": list(cfg.user_defined_symbols),
        "fingerprint": _file_fingerprint(out / "tokenizer.model"),
        "trained_on_bytes": sum(len(x.encode("utf-8")) for x in lines),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def iter_training_texts(inputs: Sequence[str | Path]) -> Iterator[str]:
    """Documents for tokenizer training from cleaned shard dirs, .jsonl(.gz) files or dirs, or .txt files."""
    from text2llm.data.readers import iter_cleaned

    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise UserError(f"{p}: no such file or dir")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.name.endswith((".jsonl", ".jsonl.gz", ".txt")))
            if not files:
                raise UserError(f"{p}: holds no .jsonl, .jsonl.gz or .txt files")
        else:
            files = [p]
        for f in files:
            if f.name.endswith(".txt"):
                try:
                    yield f.read_text(encoding="utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{f}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            else:
                for doc in iter_cleaned(f):
                    yield doc.text
