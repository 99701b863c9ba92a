"""Generate with onnxruntime alone: numpy + onnxruntime + the tokenizer library, no torch.

Reads an export dir of :mod:`text2llm.infer.onnx` (``model.onnx``, optional ``model.int8.onnx``,
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

from text2llm.errors import UserError, read_json_file

META_FILE = "text2llm-onnx.json"


def read_meta(export_dir: str | Path) -> dict:
    return read_json_file(Path(export_dir) / META_FILE, f"{export_dir}: not an ONNX export dir (no {META_FILE}); "
                          "make one with `text2llm export onnx CKPT --out DIR`")


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def load_tokenizer(export_dir: str | Path):
    from text2llm.tokenizer import Tokenizer

    sub = read_meta(export_dir).get("tokenizer")
    if not sub:
        raise UserError(f"{export_dir}: this export carries no tokenizer (export it from a checkpoint with tokenizer/)")
    return Tokenizer.load(Path(export_dir) / sub)


def make_session(path: Path, threads: int | None = None, spinning: bool | None = None):
    """An onnxruntime CPU session.

    ``spinning``: let idle worker threads busy-wait for the next op instead of sleeping (faster
    hand-offs between the many small ops of a decode step: batch 8 of the demo model ~4,300 ->
    ~5,300 tokens/s on the 2-core CPU). Spinning threads starve torch when the two *interleave*
    in one process (ENVIRONMENT.md: torch decode 5.8 -> 31.7 ms), so the default (None) spins
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
    """The decoding-engine interface over the exported graph; the KV cache is the ``present`` arrays
    of the previous call, fed back as ``past``."""

    def __init__(self, session, meta: dict, max_len: int | None = None):
        self.sess, self.meta = session, meta
        self.n_layer, self.kv_heads, self.head_dim = meta["n_layer"], meta["kv_heads"], meta["head_dim"]
        self.max_len = min(max_len or meta["max_seq_len"], meta["max_seq_len"])
        self.inputs, self.outputs = meta["inputs"], meta["outputs"]
        self.learned_positions = meta.get("positions") == "learned"

    @classmethod
    def load(cls, export_dir: str | Path, int8: bool = False, threads: int | None = None,
             spinning: bool | None = None) -> "OrtEngine":
        d = Path(export_dir)
        meta = read_meta(d)
        key = "int8" if int8 else "fp32"
        if key not in meta["files"]:
            raise UserError(f"{d}: has no {key} model (export with --int8 to get one)")
        return cls(make_session(d / meta["files"][key], threads, spinning), meta)

    def run(self, ids_BT: np.ndarray, mask_BS: np.ndarray, past: list[np.ndarray]):
        """One graph call: (logits (B, T, V), present arrays)."""
        feed = {"input_ids": ids_BT.astype(np.int64), "attention_mask": mask_BS.astype(np.int64)}
        feed.update(zip(self.inputs[2:], past))
        logits, *present = self.sess.run(None, feed)
        return logits, present

    def prefill(self, ids_BT: np.ndarray, mask_BT: np.ndarray, total_len: int | None = None) -> np.ndarray:
        # (total_len is not needed: the graph's cache grows with each step's present arrays)
        B = ids_BT.shape[0]
        empty = np.zeros((B, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        self.mask = mask_BT.astype(np.int64)
        logits, self.past = self.run(ids_BT, self.mask, [empty] * (2 * self.n_layer))
        return logits[:, -1]

    def step(self, next_B: np.ndarray) -> np.ndarray:
        self.mask = np.concatenate([self.mask, np.ones((len(next_B), 1), np.int64)], axis=1)
        logits, self.past = self.run(next_B[:, None], self.mask, self.past)
        return logits[:, -1]


def generate_cli(a) -> int:
    """``text2llm generate EXPORT_DIR --engine onnx ...``"""
    from text2llm.infer.decoding import cli_loop

    engine = OrtEngine.load(a.ckpt)
    return cli_loop(engine, load_tokenizer(a.ckpt), a, learned_positions=engine.learned_positions)
