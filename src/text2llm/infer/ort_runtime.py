"""Generate with onnxruntime alone: numpy + onnxruntime + the tokenizer library, no torch.

Reads an export dir of :mod:`text2llm.interop.onnx` (``model.onnx``, optional ``model.int8.onnx``,
``tokenizer/``, ``text2llm-onnx.json``) and plugs the graph into the decoding loop of
:mod:`text2llm.infer.decoding` (left padding, sampling, stop strings, streaming)::

    engine = OrtEngine.load("exports/onnx")              # or OrtEngine.load(dir, int8=True)
    tok = load_tokenizer("exports/onnx")
    complete(engine, tok, ["Once upon a time"], SamplingParams(max_new_tokens=50, temperature=0))

This module (and everything it imports) must never import torch or ``text2llm.model``; a test
runs it with torch made unimportable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from text2llm.errors import UserError, require
from text2llm.files import read_metadata
from text2llm.tokenizer import Tokenizer

META_FILE = "text2llm-onnx.json"


def read_meta(export_dir: str | Path) -> dict:
    return read_metadata(Path(export_dir) / META_FILE, f"{export_dir}: not an ONNX export dir (no {META_FILE}); "
                          "make one with `text2llm export onnx CKPT --out DIR`")


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def load_tokenizer(export_dir: str | Path):
    sub = read_meta(export_dir).get("tokenizer")
    if not sub:
        raise UserError(f"{export_dir}: this export carries no tokenizer (export it from a checkpoint with tokenizer/)")
    return Tokenizer.load(Path(export_dir) / sub)


def make_session(path: Path, threads: int | None = None, spinning: bool | None = None):
    """An onnxruntime CPU session.

    ``spinning``: let idle worker threads busy-wait for the next op instead of sleeping (faster
    hand-offs between the many small ops of a decode step; benchmarks/generate.py). Spinning
    threads starve torch when the two *interleave* in one process (torch's decode becomes several
    times slower), so the default (None) spins
    only when torch has not been imported: the onnxruntime-only deployment path."""
    import onnxruntime as ort

    spin = "1" if (("torch" not in sys.modules) if spinning is None else spinning) else "0"
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


class OrtEngine:
    """The decoding-engine interface over the exported graph.

    The KV cache is one zeroed buffer per layer and per key/value, of capacity prompt + new tokens,
    allocated at the prefill and bound as both ``past`` and ``present`` of every call (IOBinding), so
    each step writes only its new keys/values in place."""

    def __init__(self, session, meta: dict, max_len: int | None = None):
        self.sess, self.meta = session, meta
        self.n_layer, self.kv_heads, self.head_dim = meta["n_layer"], meta["kv_heads"], meta["head_dim"]
        self.max_len = min(max_len or meta["max_seq_len"], meta["max_seq_len"])
        self.inputs, self.outputs = meta["inputs"], meta["outputs"]
        self.learned_positions = meta.get("positions") == "learned"

    @classmethod
    def load(cls, export_dir: str | Path, int8: bool = False, threads: int | None = None,
             spinning: bool | None = None) -> "OrtEngine":
        require("onnxruntime", "export", "generate / serve of an ONNX export")
        d = Path(export_dir)
        meta = read_meta(d)
        if meta.get("format_version", 1) < 2:
            raise UserError(f"{d}: an export of format version {meta.get('format_version', 1)} (its graph copies the "
                            "KV cache at every step); export the checkpoint again with `text2llm export onnx`")
        key = "int8" if int8 else "fp32"
        if key not in meta["files"]:
            raise UserError(f"{d}: has no {key} model (export with --int8 to get one)")
        return cls(make_session(d / meta["files"][key], threads, spinning), meta)

    def new_cache(self, batch: int, capacity: int) -> list:
        """Zeroed KV buffers (B, K, capacity, Dh) as onnxruntime values, one per graph ``past`` input."""
        import onnxruntime as ort

        shape = (batch, self.kv_heads, capacity, self.head_dim)
        return [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for _ in self.inputs[2:]]

    def bind(self, past: list):
        """An IOBinding with ``past`` (the buffers of :meth:`new_cache`) bound as both the graph's
        past inputs and its present outputs: each call writes its new keys/values in place."""
        io = self.sess.io_binding()
        io.bind_output("logits")  # (outputs come back in binding order: logits first)
        for name_in, name_out, buf in zip(self.inputs[2:], self.outputs[1:], past):
            io.bind_ortvalue_input(name_in, buf)
            io.bind_ortvalue_output(name_out, buf)
        return io

    def run(self, ids_BT: np.ndarray, mask_BS: np.ndarray, io) -> np.ndarray:
        """One graph call on the binding ``io`` of :meth:`bind`: the last position's logits
        (B, 1, V). The bound buffers hold P tokens (P = mask length - T) and get the new ones at
        P..P+T-1."""
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids_BT, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask_BS, dtype=np.int64))
        io.bind_output("logits")  # a new array each call: the caller may keep the last one
        self.sess.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()

    def prefill(self, ids_BT: np.ndarray, mask_BT: np.ndarray, total_len: int | None = None) -> np.ndarray:
        B, T = ids_BT.shape
        self.mask = mask_BT.astype(np.int64)
        capacity = min(total_len or self.max_len, self.max_len)
        if T > capacity:
            raise ValueError(f"prompt of {T} tokens exceeds the cache capacity {capacity}")
        self.past = self.new_cache(B, capacity)
        self.io = self.bind(self.past)
        return self.run(ids_BT, self.mask, self.io)[:, -1]

    def step(self, next_B: np.ndarray) -> np.ndarray:
        capacity = self.past[0].shape()[2]
        if self.mask.shape[1] >= capacity:
            raise ValueError(f"sequence full: {self.mask.shape[1]} tokens (cache capacity {capacity})")
        self.mask = np.concatenate([self.mask, np.ones((len(next_B), 1), np.int64)], axis=1)
        return self.run(next_B[:, None], self.mask, self.io)[:, -1]

