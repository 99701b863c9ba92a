"""Sampling with a KV cache: greedy, temperature, top-k, top-p.

The prompt is run once through the model (prefill), filling a preallocated :class:`KVCache`;
each new token then costs one forward pass over a single position (decode), attending to the
cached keys and values instead of recomputing the whole sequence.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterator

import torch

from text2llm.model.transformer import KVCache


def filter_logits(logits_BV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set with mass >= top_p."""
    if top_k and top_k < logits_BV.size(-1):
        kth = torch.topk(logits_BV, top_k, dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits_BV, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass *before* it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, idx, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B,) next ids. temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    probs = filter_logits(logits_BV.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
                 top_p: float = 1.0, seed: int | None = None, eos_id: int | None = None,
                 use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time (stops at EOS, which is not yielded)."""
    cfg = model.cfg
    device = next(model.parameters()).device
    if len(prompt_ids) >= cfg.max_seq_len:
        warnings.warn(f"prompt of {len(prompt_ids)} tokens truncated from the left to fit the context of {cfg.max_seq_len}")
        prompt_ids = prompt_ids[-(cfg.max_seq_len - 1):]
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - len(prompt_ids))
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = KVCache(cfg, batch_size=1, device=device, dtype=next(model.parameters()).dtype) if use_cache else None
    logits = model(ids, cache=cache).logits[:, -1]
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        token = int(nxt.item())
        if eos_id is not None and token == eos_id:
            return
        yield token
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if cache is not None:
            logits = model(nxt[:, None], cache=cache).logits[:, -1]
        else:
            logits = model(ids).logits[:, -1]


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 50,
             top_p: float = 1.0, seed: int | None = None, on_text: Callable[[str], None] | None = None) -> str:
    """Prompt + continuation as text. ``on_text`` receives each new piece of text as it is decoded."""
    prompt_ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    new: list[int] = []
    shown = ""
    for token in generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, tokenizer.eos_id):
        new.append(token)
        if on_text is not None:
            text = tokenizer.decode(new)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                on_text(text[len(shown):])
                shown = text
    return prompt + tokenizer.decode(new)


def generate_cli(a) -> int:
    """``text2llm generate CKPT ...`` with the PyTorch engine."""
    import sys

    import text2llm

    model, tok = text2llm.load(a.ckpt)
    prompts = (line.rstrip("\n") for line in sys.stdin) if a.interactive else [a.prompt or "Once upon a time"]
    for prompt in prompts:
        if a.stream:
            print(prompt, end="", flush=True)
            generate(model, tok, prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed,
                     on_text=lambda s: print(s, end="", flush=True))
            print()
        else:
            print(generate(model, tok, prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed))
    return 0
