"""Tokenizers: train one (SentencePiece BPE / unigram, byte-level BPE) and use it through one interface.

Special tokens have the same fixed ids in every text2llm tokenizer, whatever the backend::

    0 <pad>   1 <s> (BOS)   2 </s> (EOS)   3 <unk>   4.. user-defined extras   then the learned vocab

``<pad>``, ``<s>``, ``</s>`` and ``<unk>`` are *control* tokens: ``encode`` never produces them
from text (the string ``"<s>"`` in a document is spelled with ordinary tokens), only when asked
with ``add_bos`` / ``add_eos``; ``decode`` drops pad/BOS/EOS. User-defined extras (e.g. chat
markers such as ``<|user|>``, ``tokenizer.user_defined_symbols``) are matched in text and never
split: the literal string always becomes its one id, and decodes back to the same string.

Backends (``tokenizer.type``):

* ``bpe`` / ``unigram`` -- SentencePiece (file ``tokenizer.model``). Trained with no
  normalisation (rule ``identity``, so no NFKC), no dummy prefix, repeated whitespace kept, and
  byte fallback: a character outside the vocab is spelled as its UTF-8 bytes (``<0xE4>`` ...), so
  no input is ever ``<unk>``. ``character_coverage`` (0.9995 default) suits CJK.
  One documented change: SentencePiece spells a space as ``▁`` (U+2581), so a literal ``▁`` in
  the input decodes as a space. Everything else round-trips exactly.
* ``bytelevel`` -- byte-level BPE (Hugging Face ``tokenizers``, file ``tokenizer.json``): GPT-2
  style, 256 byte symbols plus merges, no normaliser, no prefix space. Lossless for any text.

A tokenizer dir holds the backend's own file plus ``text2llm-tokenizer.json`` (backend, type,
vocab size, special ids, user symbols, chat template, fingerprint). The chat template
(:mod:`text2llm.chat`; the default when the file has none) turns a conversation into a prompt:
``render_chat`` / ``encode_chat``. ``Tokenizer.save_hf(dir)`` writes a Hugging
Face tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, with the chat template as Jinja) that
``transformers.AutoTokenizer.from_pretrained(dir)`` loads offline and that encodes like this one
(adding BOS by default, as Llama tokenizers do; ``split_special_tokens`` is on, so ``"<s>"`` typed
in text is text there too). SentencePiece models are rebuilt as ``tokenizers`` BPE / Unigram
models with byte fallback.

This module imports neither torch nor (until needed) the backends, so ONNX/ORT inference can
use it without torch.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from pydantic import ValidationError

from text2llm.chat import ChatTemplate, chat_template_jinja, render_chat
from text2llm.data.fastio import GZIP_ERRORS, gzip_decompress
from text2llm.data.readers import is_metadata_file, iter_cleaned
from text2llm.errors import UserError
from text2llm.files import check_output_dir, read_metadata, staged_output

META_FILE = "text2llm-tokenizer.json"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIALS = (PAD, BOS, EOS, UNK)
_TEXT_ENDINGS = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")
BACKEND_FILES = {"sentencepiece": "tokenizer.model", "bytelevel": "tokenizer.json"}


class Tokenizer:
    """One interface over the backends. Load with ``Tokenizer.load(dir)``."""

    def __init__(self, backend: str, path: Path, meta: dict):
        self.backend = backend
        self.path = Path(path)
        self.meta = meta
        if backend not in BACKEND_FILES:
            raise UserError(f"{self.path / META_FILE}: unknown tokenizer backend '{backend}'")
        model_file = self.path / BACKEND_FILES[backend]
        if not model_file.is_file():
            raise UserError(f"{self.path}: tokenizer dir has no {model_file.name}")
        self._sp = self._hf = None
        if backend == "sentencepiece":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        else:
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_file(str(model_file))
            self._hf.encode_special_tokens = True  # "<s>" in text is text, not BOS (extras still match)
        self.specials = frozenset({self.pad_id, self.bos_id, self.eos_id})
        self._chat: ChatTemplate | None = None

    # ---- loading / saving ----------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        meta_path = path / META_FILE
        meta = read_metadata(meta_path, f"{path}: not a tokenizer dir (no {META_FILE}); train one with `text2llm tokenizer train`")
        if "backend" not in meta:
            raise UserError(f"{meta_path}: missing key 'backend'")
        return cls(meta["backend"], path, meta)

    def save(self, out_dir: str | Path) -> Path:
        """Copy the tokenizer files to ``out_dir`` (e.g. beside a checkpoint)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in (BACKEND_FILES[self.backend], META_FILE):
            src = self.path / name
            if src.resolve() != (out / name).resolve():
                shutil.copy2(src, out / name)
        return out

    def save_hf(self, out_dir: str | Path, model_max_length: int | None = None) -> Path:
        """Write a Hugging Face tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
        ``special_tokens_map.json``) that ``transformers.AutoTokenizer`` loads offline.

        It encodes text exactly as :meth:`encode` does; with ``add_special_tokens=True`` (the
        transformers default) it prepends BOS, like Llama tokenizers.
        """
        from tokenizers import processors

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        hf = self._hf_tokenizer()
        hf.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, self.bos_id)]
        )
        hf.save(str(out / "tokenizer.json"))
        specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
        extras = list(self.meta.get("user_defined_symbols", []))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length or 1_000_000_000,
            "padding_side": "left",
            "split_special_tokens": True,  # "<s>" typed in text is text, as in encode()
            "extra_special_tokens": extras,
        }
        if not extras:
            config.pop("extra_special_tokens")
        # transformers' apply_chat_template(messages, tokenize=False) renders exactly render_chat's
        # text; tokenizing that text (BOS added) gives encode_chat's ids
        config["chat_template"] = chat_template_jinja(self.chat_template)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
        return out

    def _hf_tokenizer(self):
        """A fresh ``tokenizers.Tokenizer`` equal to this one (for the HF export)."""
        if self._hf is not None:
            from tokenizers import Tokenizer as HFTokenizer

            return HFTokenizer.from_str(self._hf.to_str())
        return _sentencepiece_to_hf(self)

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

    @property
    def user_defined_symbols(self) -> list[str]:
        return list(self.meta.get("user_defined_symbols", []))

    @property
    def chat_template(self) -> ChatTemplate:
        """The chat template stored with the tokenizer (``chat_template`` in its metadata file);
        the documented default (:class:`text2llm.config.ChatTemplate`) when it has none."""
        if self._chat is None:
            raw = self.meta.get("chat_template")
            try:
                self._chat = ChatTemplate() if raw is None else ChatTemplate.model_validate(raw)
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(map(str, err["loc"]))
                raise UserError(f"{self.path / META_FILE}: chat_template{'.' + where if where else ''}: "
                                f"{err['msg'].removeprefix('Value error, ')}") from None
        return self._chat

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation (:func:`render_chat` with this tokenizer's template)."""
        return render_chat(self.chat_template, messages, add_generation_prompt)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """BOS + the ids of :meth:`render_chat`'s text: the prompt ``generate --chat`` and the
        server's /v1/chat/completions decode from."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=True)

    def id_to_token(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} out of range [0, {self.vocab_size})")
        if self._sp is not None:
            return self._sp.id_to_piece(i)
        return self._hf.id_to_token(i)

    def token_to_id(self, token: str) -> int:
        """Id of ``token`` (a vocab entry, as shown by :meth:`id_to_token`); ``unk_id`` when absent."""
        if self._sp is not None:
            return int(self._sp.piece_to_id(token))
        i = self._hf.token_to_id(token)
        return self.unk_id if i is None else int(i)

    # ---- encode / decode -------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens only when asked."""
        if self._sp is not None:
            ids = self._sp.encode(text)
        else:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_bos:
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False,
                     num_threads: int | None = None) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the backend's own threads.

        ``num_threads``: SentencePiece threads (None = all cores; pack workers use 1). Byte-level
        BPE runs on the ``tokenizers`` thread pool unless ``TOKENIZERS_PARALLELISM=false`` (as
        in pack workers); ``encode_batch_fast`` skips the offsets nobody here reads (less work per token).
        """
        texts = list(texts)
        if self._sp is not None:  # SentencePiece adds the ids itself (no list copies)
            return self._sp.encode(texts, num_threads=num_threads or (os.cpu_count() or 1), add_bos=add_bos,
                                   add_eos=add_eos)
        batch = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        ids = [e.ids for e in batch(texts, add_special_tokens=False)]
        if add_bos or add_eos:
            head = [self.bos_id] if add_bos else []
            tail = [self.eos_id] if add_eos else []
            ids = [head + x + tail for x in ids]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; pad/BOS/EOS are dropped."""
        keep = [int(i) for i in ids if int(i) not in self.specials]
        if self._sp is not None:
            return self._sp.decode(keep)
        return self._hf.decode(keep, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer(backend={self.backend!r}, vocab_size={self.vocab_size}, path='{self.path}')"


# ---- SentencePiece -> Hugging Face tokenizers -----------------------------------------------------


def _sentencepiece_to_hf(tok: Tokenizer):
    """Rebuild a SentencePiece model as a ``tokenizers.Tokenizer`` that encodes identically.

    BPE: the vocab plus merges recovered from it (a piece is a merge of every split into two
    vocab pieces, ranked by the piece's id, which SentencePiece orders by score). Unigram: the
    pieces with their scores. Both: ``" "`` -> ``▁`` and byte fallback, no pre-splitting;
    control and byte pieces can never be produced from text; user symbols are added tokens.
    """
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    sp = tok._sp
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    user = set(tok.user_defined_symbols)
    ordinary = [not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i) or pieces[i] in user)
                for i in range(n)]
    if tok.meta.get("type") == "unigram":
        # control/byte/user pieces get a score that loses to any spelling in ordinary pieces
        vocab = [(p, sp.get_score(i) if ordinary[i] else -1e6) for i, p in enumerate(pieces)]
        model = models.Unigram(vocab, unk_id=tok.unk_id, byte_fallback=True)
    else:
        vocab = {p: i for i, p in enumerate(pieces)}
        merges = []
        for i, p in enumerate(pieces):
            if not ordinary[i] or len(p) < 2:
                continue
            for k in range(1, len(p)):
                a, b = p[:k], p[k:]
                ia, ib = vocab.get(a), vocab.get(b)
                if ia is not None and ib is not None and ordinary[ia] and ordinary[ib]:
                    merges.append((i, ia, ib, a, b))
        merges.sort()
        model = models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=UNK,
                           fuse_unk=True, byte_fallback=True)
    hf = HFTokenizer(model)
    hf.normalizer = normalizers.Replace(Regex(" "), "▁")
    if tok.meta.get("type") == "unigram":
        # Hugging Face's Unigram lattice would match the control and byte pieces ("<s>", "<0x41>")
        # in text, where SentencePiece never does: isolate every character that is not a piece
        # of its own (no piece contains one), so such a spelling can never be matched whole
        known = sorted({p for i, p in enumerate(pieces) if ordinary[i] and len(p) == 1})
        char_class = "".join(re.escape(c) for c in known)
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(f"[^{char_class}]"), behavior="isolated")
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in SPECIALS])
    if user:
        hf.add_tokens([AddedToken(p, special=False, normalized=False) for p in tok.user_defined_symbols])
    return hf


# ---- training ----------------------------------------------------------------------------------


def _file_fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def sample_texts(texts: Iterable[str], max_bytes: int, how: str = "uniform", seed: int = 0) -> list[str]:
    """Up to ``max_bytes`` of UTF-8 text from ``texts`` (documents), in corpus order.

    ``first``: the documents at the start of the corpus. ``uniform``: a uniform random sample of
    documents over the whole corpus (bottom-k by a seeded hash of the text, so it is
    deterministic and needs only ``max_bytes`` of memory), so a corpus sorted by source is
    represented by all its parts.
    """
    if how == "first":
        out, seen = [], 0
        for t in texts:
            if not t:
                continue
            out.append(t)
            seen += len(t.encode("utf-8"))
            if seen >= max_bytes:
                break
        return out
    heap: list[tuple[float, int, str, int]] = []  # (-key, index, text, bytes): a max-heap on the key
    total = 0
    salt = str(seed).encode()
    for i, t in enumerate(texts):
        if not t:
            continue
        nb = len(t.encode("utf-8"))
        key = int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8, key=salt).digest(), "little")
        if total >= max_bytes and heap and key >= -heap[0][0]:
            continue
        heapq.heappush(heap, (-key, i, t, nb))
        total += nb
        while total - heap[0][3] >= max_bytes:  # drop the largest keys while still over budget without them
            total -= heapq.heappop(heap)[3]
    return [t for _, _, t, _ in sorted(heap, key=lambda e: e[1])]


def _lines(docs: Iterable[str]) -> Iterator[str]:
    """Non-empty lines of the documents (SentencePiece trains on lines)."""
    for text in docs:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, cfg, overwrite: bool = False) -> Tokenizer:
    """Train a tokenizer on ``texts`` (an iterable of documents) into ``out_dir``.

    ``cfg`` is a :class:`text2llm.config.TokenizerConfig`. The dir is written whole or not at all.
    ``vocab_size`` is an upper bound: text too small or too uniform to fill it gives fewer tokens
    (the tokenizer's ``vocab_size`` says how many).
    """
    out = check_output_dir(out_dir, overwrite)
    extras = list(cfg.user_defined_symbols)
    for s in extras:
        if not s or s in SPECIALS:
            raise UserError(f"tokenizer.user_defined_symbols: '{s}' is empty or clashes with a built-in special token")
    if len(set(extras)) != len(extras):
        raise UserError("tokenizer.user_defined_symbols: holds duplicates")
    docs = sample_texts(texts, cfg.max_train_bytes, cfg.sample, cfg.seed)
    if not any(d.strip() for d in docs):
        raise UserError("tokenizer training: the input holds no text")
    with staged_output(out, overwrite) as tmp:
        _train_into(tmp, docs, extras, cfg)
    return Tokenizer.load(out)


def _train_into(tmp: Path, docs: list[str], extras: list[str], cfg) -> None:
    """The backend's training and the metadata file, written into the staging dir ``tmp``."""
    if cfg.type in ("bpe", "unigram"):
        meta = _train_sentencepiece(docs, tmp, cfg)
    elif cfg.type == "bytelevel":
        meta = _train_bytelevel(docs, tmp, cfg)
    else:
        raise UserError(f"tokenizer.type '{cfg.type}' is not one of bpe, unigram, bytelevel")
    meta.update({
        "type": cfg.type,
        "special_ids": {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID},
        "special_tokens": {"pad": PAD, "bos": BOS, "eos": EOS, "unk": UNK},
        "user_defined_symbols": extras,
        "chat_template": cfg.chat_template.model_dump(),
        "fingerprint": _file_fingerprint(tmp / BACKEND_FILES[meta["backend"]]),
        "trained_on_bytes": sum(len(d.encode("utf-8")) for d in docs),
        "trained_on_documents": len(docs),
    })
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _train_sentencepiece(docs: list[str], out: Path, cfg) -> dict:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(docs),
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
            input_sentence_size=0,
            hard_vocab_limit=False,  # a small corpus gives fewer pieces (as byte-level BPE does), not an error
            num_threads=cfg.threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        if "required_chars" in msg:
            hint = (" (raise tokenizer.vocab_size or lower tokenizer.character_coverage: byte fallback spells the"
                    " rarer characters)")
        elif "vocab_size" in msg.lower():
            hint = " (lower tokenizer.vocab_size or give more text)"
        else:
            hint = ""
        raise UserError(f"tokenizer training failed: {msg}{hint}") from None
    (out / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return {"backend": "sentencepiece", "vocab_size": sp.get_piece_size()}


def _train_bytelevel(docs: list[str], out: Path, cfg) -> dict:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    extras = list(cfg.user_defined_symbols)
    floor = len(SPECIALS) + len(extras) + 256
    if cfg.vocab_size < floor:
        raise UserError(f"tokenizer.vocab_size: bytelevel needs at least {floor} (4 specials + {len(extras)} extras + 256 bytes)")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in SPECIALS]
        + [AddedToken(s, special=False, normalized=False) for s in extras],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(docs, trainer=trainer, length=len(docs))
    # the trainer registers every entry of `special_tokens` as special; extras must stay matchable
    # in text when encode_special_tokens is on, so mark them non-special
    state = json.loads(hf.to_str())
    for tok in state["added_tokens"]:
        if tok["content"] in extras:
            tok["special"] = False
    for i, s in enumerate(SPECIALS + tuple(extras)):
        if state["model"]["vocab"].get(s) != i:
            raise RuntimeError(f"bytelevel training put {s!r} at id {state['model']['vocab'].get(s)}, expected {i}")
    (out / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
    return {"backend": "bytelevel", "vocab_size": len(state["model"]["vocab"])}


def iter_training_texts(inputs: Sequence[str | Path]) -> Iterator[str]:
    """Documents for tokenizer training from cleaned shard dirs, .jsonl(.gz) files or dirs, or .txt files.

    A .txt file gives one document per paragraph block (split after each blank line, the blank
    line kept); a .jsonl(.gz) file gives the ``text`` field of each line. In a dir, a dataset's
    documentation (``README.txt``, ``LICENSE.txt``, ...) is not read.
    """
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise UserError(f"{p}: no such file or dir")
        if p.is_dir() and (any(p.glob("clean-*.jsonl.gz")) or any(p.glob("clean-*.jsonl"))):
            files = [p]  # a cleaned-shard dir: its clean-* shards only (not rejected-*)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.name.endswith(_TEXT_ENDINGS) and not is_metadata_file(f))
            if not files:
                raise UserError(f"{p}: holds no .jsonl, .jsonl.gz, .txt or .txt.gz files")
        else:
            files = [p]
        for f in files:
            if f.name.endswith((".txt", ".txt.gz")):
                try:
                    raw = gzip_decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
                    text = raw.decode("utf-8")
                except GZIP_ERRORS as e:
                    raise UserError(f"{f}: not a readable gzip file ({e})") from None
                except UnicodeDecodeError as e:
                    raise UserError(f"{f}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                yield from (block for block in re.split(r"(?<=\n\n)", text) if block.strip())
            else:
                for doc in iter_cleaned(f):
                    yield doc.text
