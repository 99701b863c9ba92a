"""Typed, validated configs for every stage, loaded from TOML presets with ``key=value`` overrides.

A config file has one table per stage::

    [data]       cleaning and filtering         (text2llm.data.config.DataConfig)
    [tokenizer]  tokenizer training             (TokenizerConfig, below)
    [pack]       documents -> token shards      (PackConfig, below)
    [model]      the Transformer                (text2llm.model.config.ModelConfig)
    [train]      the training loop              (text2llm.train.config.TrainConfig)
    [generate]   sampling                       (GenerateConfig, below)
    [run]        what ``text2llm run`` reads    (RunConfig, below)

Every field has a default, so an empty file (or no file) is a valid config: the defaults are the
``configs/tiny-cpu.toml`` demo that finishes in minutes on a 2-core CPU. ``key=value`` overrides
use TOML syntax for the value (``train.lr=1e-3``, ``run.inputs=["a.txt"]``); a bare word is a
string. An unknown key or a bad value raises :class:`ConfigError` with one line naming the key
and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from text2llm.chat import ChatTemplate
from text2llm.data.config import DataConfig
from text2llm.errors import UserError
from text2llm.model.config import ModelConfig
from text2llm.train.config import TrainConfig


class ConfigError(UserError):
    """A config file or override that names an unknown key or holds a bad value."""


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TokenizerConfig(Section):
    """How the tokenizer is trained (``text2llm tokenizer train``)."""

    type: Literal["bpe", "unigram", "bytelevel"] = Field(
        "bpe", description="SentencePiece BPE, SentencePiece unigram, or byte-level BPE (HF tokenizers)"
    )
    vocab_size: int = Field(4096, ge=260, le=1_000_000, description="vocabulary size, special tokens included")
    character_coverage: float = Field(
        0.9995, ge=0.98, le=1.0, description="SentencePiece: share of characters covered, 0.98-1 (0.9995 suits CJK); the rest fall back to bytes"
    )
    max_train_bytes: int = Field(
        50_000_000, ge=1_000, description="train on at most this many bytes of text (see sample)"
    )
    sample: Literal["uniform", "first"] = Field(
        "uniform", description="which documents fill max_train_bytes: a seeded uniform sample of the whole corpus, or the first ones"
    )
    seed: int = Field(0, description="seed of the uniform training-text sample")
    user_defined_symbols: list[str] = Field(
        default_factory=list, description="extra special tokens (e.g. chat markers) that are never split"
    )
    threads: int = Field(2, ge=1, le=256, description="threads used while training the tokenizer")
    chat_template: ChatTemplate = Field(default_factory=ChatTemplate,
                                        description="how chat messages become a prompt (stored with the tokenizer)")


class PackConfig(Section):
    """How cleaned documents become token shards (``text2llm pack``)."""

    val_fraction: float = Field(0.02, ge=0.0, lt=1.0, description="share of documents held out for validation")
    val_min_docs: int = Field(1, ge=0, description="at least this many validation documents when val_fraction > 0")
    seed: int = Field(0, description="seed of the deterministic train/val split (hash of seed and document id)")
    workers: int = Field(1, ge=1, le=256, description="tokenizer worker processes")
    shard_tokens: int = Field(100_000_000, ge=1_000, description="tokens per .bin shard before a new one starts")
    mode: Literal["packed", "padded"] = Field(
        "packed", description="packed: documents back to back (BOS ... EOS); padded: one row of seq_len per document"
    )
    seq_len: int = Field(256, ge=4, description="padded mode: tokens per training row (rows hold seq_len + 1 so inputs and shifted targets both have seq_len); match train.seq_len")
    split_long: bool = Field(False, description="padded mode: split long documents into several rows instead of truncating")


class GenerateConfig(Section):
    """Sampling settings used by ``text2llm generate`` and the sample at the end of ``run``."""

    prompt: str = Field("Once upon a time", description="prompt text")
    max_new_tokens: int = Field(200, ge=1, le=100_000, description="tokens to generate")
    temperature: float = Field(0.8, ge=0.0, le=100.0, description="0 means greedy decoding")
    top_k: int = Field(50, ge=0, description="keep the k most likely tokens (0 = off)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (1 = off)")
    seed: int = Field(1234, description="sampling seed")


class RunConfig(Section):
    """What ``text2llm run`` reads."""

    inputs: list[str] = Field(
        default_factory=list, description="input files or dirs; empty = the bundled TinyStories sample"
    )


class Config(Section):
    """The whole pipeline's configuration: one section per stage."""

    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) must be <= model.max_seq_len ({self.model.max_seq_len})"
            )
        return self

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _drop_none(self.model_dump(mode="json"))

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, out_dir: str | Path, name: str = "config.toml") -> Path:
        path = Path(out_dir) / name
        path.write_text(self.to_toml(), encoding="utf-8")
        return path


def _drop_none(obj: Any) -> Any:
    """TOML has no null: drop None values (they mean 'use the default / decide at run time')."""
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


# ---- loading -----------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> (["train", "lr"], 0.001). The value is TOML; a bare word is a string."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. train.lr=1e-3")
    key, raw = item.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}': empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as  model.norm=rmsnorm
    return key.split("."), value


def _set_path(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys)}: '{k}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def _format_error(err: ValidationError, cls: type[BaseModel]) -> str:
    """Turn pydantic's report into one line: ``key: what is wrong (allowed: ...)``."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(cls, [str(p) for p in first["loc"][:-1]])
        return f"{loc}: unknown key (allowed: {', '.join(allowed)})"
    msg = first["msg"]
    if not loc:  # a model-level validator
        return msg.removeprefix("Value error, ")
    got = first.get("input")
    if got is not None and not isinstance(got, dict):
        msg = f"{msg} (got {got!r})"
    return f"{loc}: {msg.removeprefix('Value error, ')}"


def _allowed_keys(cls: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = cls.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        cls = ann
    return sorted(cls.model_fields)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a TOML preset (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            tree = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid TOML ({e})") from None
    for item in overrides or []:
        keys, value = parse_override(item)
        _set_path(tree, keys, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(f"config error: {where}{_format_error(e, Config)}") from None


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config saved in a run dir or checkpoint (``Config.to_dict()``)."""
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"config error: {_format_error(e, Config)}") from None
