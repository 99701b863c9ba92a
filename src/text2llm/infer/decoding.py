"""The decoding loop shared by every engine (PyTorch, ONNX Runtime, the HTTP server). numpy only.

An *engine* runs the network; this module does everything around it::

    engine.max_len                       longest sequence (prompt + new tokens) the engine can hold
    engine.prefill(ids_BT, mask_BT, total_len)
                                         -> logits of the last position (B, V) float32; total_len
                                            (optional) = prompt + the most new tokens that will follow
    engine.step(next_B)                  -> logits of the new position (B, V); the engine keeps its cache

Batches of prompts with different lengths are **left-padded**: every row ends at the same
position, so one decode step serves all rows. ``mask_BT`` (1 = real token, 0 = padding) keeps pad
tokens out of attention. With rotary positions this is exact: attention scores depend only on the
distance between two tokens, which padding does not change. A model with a *learned* position
table would see shifted positions, so :func:`length_groups` splits such a batch into groups of
equal prompt length, each decoded without padding.

Sampling (temperature, top-k, top-p, repetition penalty) is done here in numpy with a seeded
``numpy.random.Generator``, so both engines draw the same tokens from the same logits and a seed
reproduces a sample. ``temperature == 0`` is greedy (argmax).

This module must not import torch: the ONNX runtime path and the server use it without torch.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from text2llm.errors import UserError


class Engine(Protocol):
    max_len: int

    def prefill(self, ids_BT: np.ndarray, mask_BT: np.ndarray, total_len: int | None = None) -> np.ndarray: ...

    def step(self, next_B: np.ndarray) -> np.ndarray: ...


@dataclass
class SamplingParams:
    """How the next token is chosen. Validated on construction (a bad value is a UserError)."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the prompt or output
    stop: Sequence[str] = field(default_factory=tuple)  # stop when one of these texts appears (not returned)
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens: must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise UserError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p: must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise UserError(f"repetition_penalty: must be > 0 (1 = off), got {self.repetition_penalty}")
        self.stop = tuple(s for s in self.stop if s)


# ---- sampling ------------------------------------------------------------------------------------


def filter_logits_np(logits_BV: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """-inf for every logit outside the top-k and outside the smallest set with mass >= top_p."""
    logits_BV = np.array(logits_BV, dtype=np.float32, copy=True)
    V = logits_BV.shape[-1]
    if top_k and top_k < V:
        kth = np.partition(logits_BV, V - top_k, axis=-1)[..., V - top_k : V - top_k + 1]
        logits_BV[logits_BV < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-logits_BV, axis=-1, kind="stable")
        sorted_l = np.take_along_axis(logits_BV, order, -1)
        probs = _softmax(sorted_l)
        drop_sorted = np.cumsum(probs, -1) - probs >= top_p  # mass *before* the token already reaches top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        logits_BV[drop] = -np.inf
    return logits_BV


def apply_repetition_penalty(logits_BV: np.ndarray, seen_BV: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style penalty (Keskar et al. 2019): a seen token's logit is divided by ``penalty`` when
    positive and multiplied by it when negative."""
    if penalty == 1.0:
        return logits_BV
    pen = np.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return np.where(seen_BV, pen, logits_BV).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def sample_np(logits_BV: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """(B,) next ids: argmax when temperature is 0, else a draw from the filtered distribution."""
    if p.temperature <= 0:
        return logits_BV.argmax(-1)
    probs = _softmax(filter_logits_np(logits_BV / p.temperature, p.top_k, p.top_p).astype(np.float64))
    u = 1.0 - rng.random(probs.shape[0])[:, None]  # inverse-CDF draw, u in (0, 1]: one per row
    idx = (np.cumsum(probs, -1) < u * probs.sum(-1, keepdims=True)).sum(-1)
    return np.minimum(idx, probs.shape[-1] - 1)


# ---- prompts -------------------------------------------------------------------------------------


def fit_prompts(prompts: list[list[int]], max_len: int, max_new_tokens: int) -> tuple[list[list[int]], int]:
    """Truncate prompts longer than the context from the left (with a warning) so that at least one
    new token fits; return them and the number of new tokens that fit after the longest."""
    if max_len < 2:
        raise UserError(f"context of {max_len} tokens is too short to generate")
    out = []
    for ids in prompts:
        if not ids:
            raise UserError("prompt: empty (no tokens)")
        if len(ids) > max_len - 1:
            warnings.warn(f"prompt of {len(ids)} tokens truncated from the left to {max_len - 1} "
                          f"to fit the context of {max_len}", stacklevel=3)
            ids = ids[-(max_len - 1):]
        out.append(list(ids))
    longest = max(len(x) for x in out)
    return out, max(0, min(max_new_tokens, max_len - longest))


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids_BT int64, mask_BT int64): prompts right-aligned, pad on the left, mask 1 on real tokens."""
    T = max(len(x) for x in prompts)
    ids = np.full((len(prompts), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), T), dtype=np.int64)
    for b, x in enumerate(prompts):
        ids[b, T - len(x):] = x
        mask[b, T - len(x):] = 1
    return ids, mask


def length_groups(prompts: list[list[int]], by_length: bool) -> list[list[int]]:
    """Row indices to decode together: all rows, or (learned positions) rows of equal prompt length."""
    if not by_length:
        return [list(range(len(prompts)))]
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(prompts):
        groups.setdefault(len(x), []).append(i)
    return list(groups.values())


# ---- the loop ------------------------------------------------------------------------------------


def iter_tokens(engine: Engine, prompts: list[list[int]], p: SamplingParams, eos_id: int | None, pad_id: int,
                done_B: np.ndarray | None = None, vocab_size: int | None = None,
                on_logits: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Iterator[np.ndarray]:
    """Yield the next token of every row, (B,) int64, once per decode step; -1 for finished rows.

    A row finishes at EOS (not yielded) or when the caller sets ``done_B[row] = True`` between two
    yields (e.g. a stop string appeared). Prompts must already fit (:func:`fit_prompts`).
    ``on_logits(logits_BV, next_B)``, called before each yield, sees the engine's logits of the
    step (before the repetition penalty) and the tokens drawn from them.
    """
    B = len(prompts)
    done_B = np.zeros(B, dtype=bool) if done_B is None else done_B
    n_new = min(p.max_new_tokens, engine.max_len - max(len(x) for x in prompts))
    if n_new <= 0:
        return
    rng = np.random.default_rng(p.seed)
    ids_BT, mask_BT = left_pad(prompts, pad_id)
    logits = engine.prefill(ids_BT, mask_BT, ids_BT.shape[1] + n_new)
    seen = None
    if p.repetition_penalty != 1.0:
        seen = np.zeros((B, vocab_size or logits.shape[-1]), dtype=bool)
        for b, x in enumerate(prompts):
            seen[b, x] = True
        seen = seen[:, : logits.shape[-1]]
    for i in range(n_new):
        raw = logits
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
        nxt = sample_np(logits, p, rng).astype(np.int64)
        if on_logits is not None:
            on_logits(raw, nxt)
        if eos_id is not None:
            done_B |= nxt == eos_id
        out = np.where(done_B, -1, nxt)
        if seen is not None:
            seen[np.arange(B), nxt] = True
        yield out
        if done_B.all() or i == n_new - 1:
            return
        logits = engine.step(np.where(done_B, pad_id, nxt))


class TextStream:
    """Incremental detokenisation of one row, with stop strings.

    ``push(token)`` returns the text that is now safe to show: never half a multi-byte character
    (a trailing U+FFFD) and never a tail that could still become a stop string. ``stopped`` turns
    True when a stop string appears; the text before it is kept, the stop string is dropped.
    ``lstrip``: the text starts at its first non-whitespace character (a chat reply, whose space
    after the template's ``Assistant:`` belongs to the turn, not to the reply).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), lstrip: bool = False):
        self.tok, self.stop, self.lstrip = tokenizer, tuple(stop), lstrip
        self.ids: list[int] = []
        self.text = ""  # final text so far (up to a stop string)
        self.shown = 0
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        for s in self.stop:
            i = text.find(s)
            if i >= 0:
                text, self.stopped = text[:i], True
        if self.lstrip:  # after the stop strings: a reply that opens with "\nUser:" is empty
            text = text.lstrip()
        self.text = text
        if self.stopped:
            return self._emit(len(text))
        safe = len(text)
        while safe and text[safe - 1] == "\ufffd":
            safe -= 1
        hold = max((k for s in self.stop for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
        return self._emit(safe - hold)

    def finish(self) -> str:
        """The rest of the text (at the end of generation)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.shown: upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return piece


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model (log-softmax of the engine's logits
    at that step: before temperature, top-k/top-p and the repetition penalty), and the ``top``
    most likely tokens of that step, best first, as (id, logprob)."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    text: str  # the continuation only
    tokens: int  # new tokens generated (a stop string's tokens included)
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    ids: list[int] = field(default_factory=list)  # the new tokens (a stop string's included)
    logprobs: list[TokenLogprob] | None = None  # one per id, when complete() was asked for them


def log_softmax_np(logits_BV: np.ndarray) -> np.ndarray:
    x = logits_BV.astype(np.float32) - logits_BV.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def step_logprobs(logits_BV: np.ndarray, next_B: np.ndarray, top: int) -> list[TokenLogprob]:
    """Per row: the drawn token's logprob and the ``top`` most likely tokens (``top`` may be 0)."""
    lp_BV = log_softmax_np(logits_BV)
    best_BN = (np.argsort(-lp_BV, axis=-1, kind="stable")[:, :top] if top  # (no sort when no top list is asked)
               else np.empty((len(lp_BV), 0), dtype=np.int64))
    return [TokenLogprob(int(t), float(lp[t]), [(int(i), float(lp[i])) for i in best])
            for t, lp, best in zip(next_B, lp_BV, best_BN)]


def token_spans(tokenizer, ids: Sequence[int]) -> list[tuple[str, int]]:
    """(text, character offset) of each token in ``decode(ids)``: what the token adds to the text
    decoded so far. A token that completes a multi-byte character replaces the U+FFFD its first
    bytes decoded to, so its text starts where that character starts."""
    out, prev = [], ""
    for k in range(len(ids)):
        cur = tokenizer.decode(ids[: k + 1])
        start = len(os.path.commonprefix([prev, cur]))
        out.append((cur[start:], start))
        prev = cur
    return out


def complete(engine: Engine, tokenizer, prompts: Sequence[str], p: SamplingParams, *, add_bos: bool = True,
             learned_positions: bool = False, on_text: Callable[[int, str], None] | None = None,
             prompt_ids: list[list[int]] | None = None, logprobs: int | None = None,
             lstrip: bool = False) -> list[Completion]:
    """Generate a continuation for every prompt (one batch). ``on_text(row, piece)`` streams text.

    ``logprobs`` (N >= 0): each completion also carries its tokens' :class:`TokenLogprob` with the
    N most likely alternatives. ``lstrip``: drop the whitespace a continuation starts with (chat
    replies, :class:`TextStream`)."""
    if prompt_ids is None:
        prompt_ids = [([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(t) for t in prompts]
    fitted, _ = fit_prompts(prompt_ids, engine.max_len, p.max_new_tokens)
    results: list[Completion | None] = [None] * len(fitted)
    for rows in length_groups(fitted, learned_positions):
        streams = [TextStream(tokenizer, p.stop, lstrip) for _ in rows]
        done = np.zeros(len(rows), dtype=bool)
        eos_seen = np.zeros(len(rows), dtype=bool)
        scored: list[list[TokenLogprob]] = [[] for _ in rows]
        step: list[TokenLogprob] = []

        def keep_logprobs(logits_BV, next_B):
            step[:] = step_logprobs(logits_BV, next_B, logprobs)

        for tokens in iter_tokens(engine, [fitted[r] for r in rows], p, tokenizer.eos_id, tokenizer.pad_id, done,
                                  tokenizer.vocab_size, keep_logprobs if logprobs is not None else None):
            for j, t in enumerate(tokens):
                if t < 0:
                    eos_seen[j] |= not streams[j].stopped
                    continue
                if step and not streams[j].stopped:  # (push keeps no token once stopped)
                    scored[j].append(step[j])
                piece = streams[j].push(int(t))
                if streams[j].stopped:
                    done[j] = True
                if piece and on_text is not None:
                    on_text(rows[j], piece)
        for j, r in enumerate(rows):
            s = streams[j]
            rest = s.finish()
            if rest and on_text is not None:
                on_text(r, rest)
            reason = "stop" if (s.stopped or eos_seen[j] or done[j]) else "length"
            results[r] = Completion(s.text, len(s.ids), len(fitted[r]), reason, s.ids,
                                    scored[j] if logprobs is not None else None)
    return results  # type: ignore[return-value]


def chat_prompt(tokenizer, messages: Sequence[dict], p: SamplingParams) -> tuple[list[int], SamplingParams]:
    """A conversation's prompt ids (:meth:`~text2llm.tokenizer.Tokenizer.encode_chat`) and ``p``
    with the chat template's stop strings added; decode it with ``complete(..., lstrip=True)``."""
    extra = tuple(s for s in tokenizer.chat_template.stop if s not in p.stop)
    return tokenizer.encode_chat(messages), dataclasses.replace(p, stop=tuple(p.stop) + extra)


# ---- the command line (shared by both engines) ---------------------------------------------------


def cli_loop(engine: Engine, tokenizer, a, learned_positions: bool = False) -> int:
    """``text2llm generate``: one prompt, or (``--interactive``) one per line of stdin."""
    p = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       repetition_penalty=a.repetition_penalty, stop=tuple(a.stop), seed=a.seed)
    if getattr(a, "chat", False):
        return _cli_chat(engine, tokenizer, p, a.system, a.stream, learned_positions)
    if a.interactive:
        prompts = _stdin_prompts()
    else:
        prompts = iter([a.prompt if a.prompt is not None else "Once upon a time"])
    for prompt in prompts:
        if a.stream:
            print(prompt, end="", flush=True)
            complete(engine, tokenizer, [prompt], p, learned_positions=learned_positions,
                     on_text=lambda _row, s: print(s, end="", flush=True))
            print(flush=True)
        else:
            (c,) = complete(engine, tokenizer, [prompt], p, learned_positions=learned_positions)
            print(prompt + c.text, flush=True)
    return 0


def _cli_chat(engine: Engine, tokenizer, p: SamplingParams, system: str | None, stream: bool,
              learned_positions: bool) -> int:
    """``text2llm generate --chat``: every line of stdin is a user turn; each reply is printed and
    kept in the conversation. The oldest turns are dropped when the conversation outgrows the context."""
    history = [{"role": "system", "content": system}] if system else []
    for line in _stdin_prompts():
        history.append({"role": "user", "content": line})
        ids, params = chat_prompt(tokenizer, history, p)
        while len(ids) + p.max_new_tokens > engine.max_len and len(history) - bool(system) > 1:
            del history[bool(system)]  # the oldest turn after the system message
            ids, params = chat_prompt(tokenizer, history, p)
        show = (lambda _row, s: print(s, end="", flush=True)) if stream else None
        (c,) = complete(engine, tokenizer, [], params, prompt_ids=[ids], learned_positions=learned_positions,
                        on_text=show, lstrip=True)
        print("" if stream else c.text, flush=True)
        history.append({"role": "assistant", "content": c.text})
    return 0


def _stdin_prompts() -> Iterator[str]:
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        line = line.rstrip("\r\n")
        if line.strip():
            yield line
