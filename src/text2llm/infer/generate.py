"""Generation with PyTorch: a preallocated KV cache, batches of prompts, greedy or sampled.

The prompt batch is run once through the model (prefill), filling a :class:`KVCache` sized for
prompt + new tokens; each new token then costs one forward pass over a single position (decode),
attending to the cached keys and values instead of recomputing the whole sequence.

Prompts of different lengths are left-padded and a boolean ``attn_mask`` (True = may attend,
(B, 1, T, S)) keeps the pads out of attention; see :mod:`text2llm.infer.decoding` for why that is
exact with rotary positions and what happens with learned ones. Sampling, stop strings and
streaming live in that module too, shared with the ONNX Runtime engine and the server.

    model, tok = text2llm.load("runs/demo/train")
    generate(model, tok, "Once upon a time", max_new_tokens=50, temperature=0)        # one prompt
    generate_batch(model, tok, ["A cat", "The sun was"], max_new_tokens=50, seed=0)    # a batch
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from text2llm.infer.aot import load_step
from text2llm.infer.decoding import SamplingParams, complete, fit_prompts, iter_tokens
from text2llm.infer.fast_step import FastDecodeStep
from text2llm.infer.packing import pack_weights
from text2llm.model.cache import KVCache
from text2llm.model.transformer import Transformer


# ---- engines -------------------------------------------------------------------------------------

UNBOUNDED_LEN = 1 << 20  # prompt + new tokens, for a model whose context has no limit (every layer windowed)


def _attn_mask(valid_BS: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """(B, 1, T, S) bool for T new queries at positions start..start+T-1 over S = start+T keys:
    causal, pads hidden; every query also sees itself, so a pad query's row is never all-False
    (an all-masked row would give NaN, and a NaN key poisons later layers even when masked)."""
    S = start + T
    q_pos = torch.arange(start, S)[:, None]
    k_pos = torch.arange(S)[None, :]
    causal_TS = k_pos <= q_pos
    return ((causal_TS[None] & valid_BS[:, None, :S]) | (k_pos == q_pos)[None])[:, None]


class TorchEngine:
    """The decoding-engine interface of :mod:`text2llm.infer.decoding` over a PyTorch model.

    ``use_cache=False`` recomputes the whole sequence at every step (the slow reference).
    With the cache, each decode step runs :class:`~text2llm.infer.fast_step.FastDecodeStep` (the
    same arithmetic as the model's ``forward`` in far fewer PyTorch calls) where it covers the
    model, else ``forward``; ``fast_step=False`` forces ``forward`` (for comparisons).
    ``max_len`` caps prompt + new tokens (default: the model's ``max_seq_len``; a model whose every
    layer is windowed, with RoPE, has no cap but ``max_len``: its KV cache is a ring buffer of the
    window per layer, and RoPE rows past the table are computed for their positions).
    Windowed layers keep ring buffers (O(window) memory); the compiled steps (``compile``,
    ``aot_dir``) read fixed full buffers instead, where the band mask does the windowing.

    ``compile=True`` runs each decode step through ``torch.compile(dynamic=True)`` of
    :meth:`~text2llm.model.transformer.Transformer.decode_step`, with inductor's ``freezing``
    (the weights become constants it pre-packs for the CPU's matmul kernels) and its C++ wrapper
    (no Python between kernels). Eager PyTorch spends most of a small model's decode step
    dispatching some hundred tiny ops; the compiled step fuses them. With dynamic shapes one
    compile (tens of seconds on a small CPU, in every new process) serves every batch size, prompt
    length and position. The weights are a snapshot: compile a new engine after changing them.
    The prompt (prefill) runs eagerly.

    ``aot_dir`` (a ``text2llm export aot`` dir, :mod:`text2llm.infer.aot`) runs each decode step
    through the step compiled there ahead of time instead: loaded, not compiled; batches larger
    than its ``max_batch`` decode eagerly.

    ``kv_heads``: the key/value heads this process holds, when a tensor-parallel model holds
    ``n_kv_head / tp`` of them (``text2llm.train.parallelize.shard_for_inference``); the cache is
    sized for those.
    """

    def __init__(self, model, use_cache: bool = True, max_len: int | None = None, compile: bool = False,
                 aot_dir=None, fast_step: bool = True, kv_heads: int | None = None):
        if (compile or aot_dir) and not use_cache:
            raise ValueError("a compiled step needs use_cache=True (the compiled step is the KV-cache step)")
        if compile and aot_dir:
            raise ValueError("compile=True and aot_dir: the AOT export is already compiled")
        self.model, self.use_cache = model, use_cache
        self.cache_cfg = model.cfg if kv_heads is None else model.cfg.model_copy(
            update={"n_kv_head": kv_heads, "head_size": model.cfg.head_dim})
        # packed weights (text2llm.infer.packing); not for FSDP-sharded parameters, which exist
        # whole only inside each block's forward
        sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
        packable = isinstance(model, Transformer) and not sharded
        if packable:
            pack_weights(model)
        self.fast = packable and fast_step
        # inference_mode rather than no_grad: no version counters or view tracking on each of the
        # many small ops a small model's decode step is made of (benchmarks/results/
        # generate-2026-11-28-inference-mode.jsonl). FSDP-sharded models (samples during training) keep no_grad: the
        # unsharded parameters FSDP allocates in this forward belong to the training run, and an
        # inference tensor cannot be written to outside inference mode (a small two-process test
        # trained on fine after an inference_mode forward; the sample path is not worth the risk).
        self.grad_mode = torch.no_grad if sharded else torch.inference_mode
        unbounded = model.cfg.unbounded_context and not (compile or aot_dir) and use_cache
        self.max_len = (max_len or UNBOUNDED_LEN) if unbounded else min(max_len or model.cfg.max_seq_len,
                                                                         model.cfg.max_seq_len)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype if p.is_floating_point() else torch.float32
        self.attention = contextlib.nullcontext  # what the forward passes run under
        if self.device.type == "cuda":
            # cuDNN's attention builds a new plan for every new key length, which a growing KV cache
            # gives at each step (an order of magnitude slower per token on an H200,
            # benchmarks/results/gpu-h200.jsonl); the flash / memory-efficient kernels take any length
            self.attention = functools.partial(
                sdpa_kernel, [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
        self.compiled = self.aot = None
        if aot_dir is not None:  # compiled ahead of time (text2llm.infer.aot): loaded, not compiled
            if self.device.type != "cpu":
                raise ValueError("an AOT export runs on the CPU")
            self.aot, meta = load_step(aot_dir)
            if meta.get("max_seq_len") != model.cfg.max_seq_len:
                raise ValueError(f"{aot_dir}: compiled for a context of {meta.get('max_seq_len')} tokens, "
                                 f"the model has {model.cfg.max_seq_len}")
            self.aot_max_batch = meta["max_batch"]
        if compile:
            from torch._inductor import config as cfg

            step = torch.compile(model.decode_step, dynamic=True)

            def compiled(ids_B1, pos, attn_mask):
                # Inductor settings around every call, so that whichever call compiles (a first
                # batch-1, batched or padded step) gets them; not process-wide: a frozen graph
                # elsewhere (say, eval during training) would keep stale weights. Set by hand:
                # config.patch costs more per call than the two assignments. Freezing, the C++
                # wrapper and dynamic shapes (attention reads only the filled part of the cache)
                # each make the compiled step faster (benchmarks/generate.py, engine torch-compile).
                saved = cfg.freezing, cfg.cpp_wrapper
                cfg.freezing = cfg.cpp_wrapper = True
                try:
                    return step(ids_B1, pos, self.cache, attn_mask)
                finally:
                    cfg.freezing, cfg.cpp_wrapper = saved

            self.compiled = compiled

    def prefill(self, ids_BT: np.ndarray, mask_BT: np.ndarray, total_len: int | None = None) -> np.ndarray:
        """``total_len``: prompt + new tokens this generation needs at most; the cache is sized
        for it (default ``max_len``)."""
        with self.grad_mode():
            return self._prefill(ids_BT, mask_BT, total_len)

    def step(self, next_B: np.ndarray) -> np.ndarray:
        with self.grad_mode():
            return self._step(next_B)

    def _prefill(self, ids_BT: np.ndarray, mask_BT: np.ndarray, total_len: int | None) -> np.ndarray:
        B, T = ids_BT.shape
        L = min(max(total_len or self.max_len, T), self.max_len)
        self.ids = torch.zeros(B, L, dtype=torch.long, device=self.device)
        self.valid = torch.zeros(B, L, dtype=torch.bool, device=self.device)
        self.ids[:, :T] = torch.from_numpy(ids_BT)
        self.valid[:, :T] = torch.from_numpy(mask_BT.astype(bool))
        self.padded = not bool(self.valid[:, :T].all())
        self.len = T
        # (the AOT program takes buffers of the model's full context: that axis is not symbolic)
        cache_len = self.model.cfg.max_seq_len if self.aot is not None else L
        ring = self.aot is None and self.compiled is None
        self.cache = KVCache(self.cache_cfg, B, cache_len, self.device, self.dtype, ring) if self.use_cache else None
        # the eager decode step (text2llm.infer.fast_step), built per generation: weights may change
        # between generations (samples during training); not with torch.compile, which runs every step
        eager_steps = self.use_cache and self.fast and self.compiled is None
        self.fast_step = FastDecodeStep.build(self.model) if eager_steps else None
        return self._forward(0, T)

    def _step(self, next_B: np.ndarray) -> np.ndarray:
        if self.len >= self.ids.size(1):
            raise ValueError(f"sequence full: {self.len} tokens (max_len {self.ids.size(1)})")
        new_B = torch.from_numpy(next_B).to(self.device)
        self.ids[:, self.len] = new_B
        self.valid[:, self.len] = True
        self.len += 1
        if self.aot is not None and len(next_B) <= self.aot_max_batch:
            # one query at the last position sees every valid key: the mask is the valid row, and
            # its length S tells the program the position (S - 1). Inputs contiguous: the compiled
            # program reads them densely, whatever their strides (a numpy column is strided)
            mask = self.valid[:, : self.len].contiguous().view(len(next_B), 1, 1, self.len)
            return self.aot(new_B[:, None].contiguous(), mask, *self.cache.k, *self.cache.v).float().numpy()
        if not self.use_cache:
            return self._forward(0, self.len)
        start = self.len - 1
        if self.compiled is None and self.fast_step is None:
            return self._forward(start, 1)
        if self.compiled is not None:
            mask = _attn_mask(self.valid, start, 1).to(self.device) if self.padded else None
            return self.compiled(new_B[:, None], start, mask).float().cpu().numpy()
        # one query at the last position: its causal row is the valid row itself (the new token's
        # own column was just set), a view instead of a mask built anew each step
        mask = self.valid[:, None, None, : self.len] if self.padded else None
        with self.attention():
            return self.fast_step(new_B, start, self.cache, mask).float().cpu().numpy()

    def _forward(self, start: int, T: int) -> np.ndarray:
        mask = _attn_mask(self.valid, start, T).to(self.device) if self.padded else None
        with self.attention():
            out = self.model(self.ids[:, start : start + T], cache=self.cache, attn_mask=mask, last_only=True)
        return out.logits[:, -1].float().cpu().numpy()


# ---- the public functions ------------------------------------------------------------------------


def generate_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 200, temperature: float = 0.8,
                   top_k: int = 50, top_p: float = 1.0, seed: int | None = None, repetition_penalty: float = 1.0,
                   stop: Sequence[str] = (), use_cache: bool = True,
                   on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """Continuations (prompt not included) of a batch of prompts, decoded together.

    ``on_text(row, piece)`` receives each row's new text as it becomes final (streaming).
    A prompt longer than the context is truncated from the left with a warning.
    """
    p = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, tuple(stop), seed)
    engine = TorchEngine(model, use_cache=use_cache)
    done = complete(engine, tokenizer, list(prompts), p, learned_positions=model.cfg.positions == "learned",
                    on_text=on_text)
    return [c.text for c in done]


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 50,
             top_p: float = 1.0, seed: int | None = None, on_text: Callable[[str], None] | None = None, *,
             repetition_penalty: float = 1.0, stop: Sequence[str] = (), use_cache: bool = True) -> str:
    """Prompt + continuation as text. ``on_text`` receives each new piece of text as it is decoded."""
    cb = None if on_text is None else (lambda _row, s: on_text(s))
    (text,) = generate_batch(model, tokenizer, [prompt], max_new_tokens, temperature, top_k, top_p, seed,
                             repetition_penalty, stop, use_cache, cb)
    return prompt + text


def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
                 top_p: float = 1.0, seed: int | None = None, eos_id: int | None = None,
                 use_cache: bool = True, repetition_penalty: float = 1.0, pad_id: int = 0) -> Iterator[int]:
    """Yield new token ids of one prompt one at a time (stops at EOS, which is not yielded)."""
    p = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, (), seed)
    engine = TorchEngine(model, use_cache=use_cache)
    (ids,), _ = fit_prompts([list(prompt_ids)], engine.max_len, max_new_tokens)
    for tokens in iter_tokens(engine, [ids], p, eos_id, pad_id, vocab_size=model.cfg.vocab_size):
        if tokens[0] < 0:
            return
        yield int(tokens[0])

