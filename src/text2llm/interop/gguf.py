"""Export a checkpoint as one GGUF file for llama.cpp, Ollama, LM Studio and the like.

``text2llm export gguf CKPT --out FILE.gguf [--type f32|f16|q8_0]`` writes the file with the
``gguf`` package's ``GGUFWriter`` (llama.cpp's own writer, as its ``convert_hf_to_gguf.py`` uses
it), as llama.cpp's ``llama`` architecture:

| GGUF                                   | from                                                   |
|----------------------------------------|--------------------------------------------------------|
| ``llama.context_length``               | model.max_seq_len                                      |
| ``llama.embedding_length``             | model.d_model                                          |
| ``llama.block_count``                  | model.n_layer                                          |
| ``llama.feed_forward_length``          | the MLP's hidden size (an expert's, for MoE)           |
| ``llama.attention.head_count`` / ``head_count_kv`` | n_head / the K/V heads (GQA)               |
| ``llama.attention.key_length`` / ``value_length``, ``llama.rope.dimension_count`` | the head dim |
| ``llama.rope.freq_base``               | model.rope_theta                                       |
| ``llama.attention.layer_norm_rms_epsilon`` | model.norm_eps                                     |
| ``llama.expert_count`` / ``expert_used_count`` | model.n_experts / moe_top_k (MoE only)         |
| ``tokenizer.ggml.*``                   | the checkpoint's tokenizer (below)                     |
| ``tokenizer.chat_template``            | its chat template as Jinja (:mod:`text2llm.chat`)      |

Tensors, ours -> llama.cpp's names (``blk.{i}.`` for ``blocks.{i}.``)::

    embed.weight                    token_embd.weight
    attn_norm.weight                blk.{i}.attn_norm.weight
    attn.{q,k,v,o}_proj.{weight,bias}  blk.{i}.attn_{q,k,v,output}.{weight,bias}   (q, k permuted: below)
    mlp_norm.weight                 blk.{i}.ffn_norm.weight
    mlp.{gate,up,down}_proj         blk.{i}.ffn_{gate,up,down}
    mlp.router.weight               blk.{i}.ffn_gate_inp.weight                    (MoE)
    mlp.experts.{e}.{gate,up,down}_proj  blk.{i}.ffn_{gate,up,down}_exps.weight    (MoE: the E experts stacked)
    norm.weight                     output_norm.weight
    lm_head.weight                  output.weight                                   (only when not tied:
                                                                                     llama.cpp reuses token_embd)

**The q/k permutation.** Our RoPE rotates the two halves of each head (x_j with x_{j+Dh/2}, the
Hugging Face Llama layout); llama.cpp rotates adjacent pairs (x_{2j} with x_{2j+1}). So, exactly
as ``convert_hf_to_gguf.py`` does for ``LlamaForCausalLM``, the rows of each head of q_proj and
k_proj (weights and biases) are reordered so that row ``2j + h`` is our row ``h * Dh/2 + j``
(:func:`permute`; k with the K/V head count). Both q and k move the same way, so every
attention score, and so the logits, are unchanged.

Tokenizers (special ids pad 0, bos 1, eos 2, unk 3 in every text2llm tokenizer):

* SentencePiece (``tokenizer.model``): ``tokenizer.ggml.model = "llama"``, the pieces, their
  scores and token types (normal, unknown, control, user-defined, byte), and no added space
  prefix (our models are trained without SentencePiece's dummy prefix).
* byte-level BPE (``tokenizer.json``): ``tokenizer.ggml.model = "gpt2"``, pre-tokenizer
  ``"gpt-2"`` (the same split), the byte-level tokens and the merges.

Types: ``f32`` writes every tensor as trained; ``f16`` and ``q8_0`` convert the matrices (1-D
tensors, norms, biases and the MoE router stay f32, as in ``convert_hf_to_gguf.py``; a matrix
whose rows do not split into q8_0's 32-value blocks falls back to f16, as there).

Refused with one line: learned positions, LayerNorm or GELU (GPT-2-style models: llama.cpp's
``llama`` architecture has RoPE, RMSNorm and SwiGLU), MoE in only some layers or with biases,
and int8 checkpoints (export the float checkpoint they came from).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from text2llm.chat import chat_template_jinja
from text2llm.checkpoint import is_int8, load_model, load_tokenizer, read_checkpoint_config, resolve_checkpoint
from text2llm.errors import UserError, require
from text2llm.files import OVERWRITE_HINT
from text2llm.model.config import ModelConfig
from text2llm.tokenizer import Tokenizer

TYPES = ("f32", "f16", "q8_0")
_BLOCK = {  # ours inside blocks.{i}. -> llama.cpp's inside blk.{i}.
    "attn_norm.weight": "attn_norm.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    **{f"attn.{p}_proj.{w}": f"attn_{q}.{w}" for p, q in zip("qkvo", ("q", "k", "v", "output"))
       for w in ("weight", "bias")},
    **{f"mlp.{p}_proj.{w}": f"ffn_{p}.{w}" for p in ("gate", "up", "down") for w in ("weight", "bias")},
    "mlp.router.weight": "ffn_gate_inp.weight",
}


def check_gguf(cfg: ModelConfig) -> None:
    """A UserError naming the field when llama.cpp's llama architecture cannot hold this model."""
    llama = "GGUF export writes llama.cpp's llama architecture, which has"
    if cfg.positions != "rope":
        raise UserError(f"model.positions = {cfg.positions!r}: {llama} rotary positions (GPT-2-style models are not exported)")
    if cfg.norm != "rmsnorm":
        raise UserError(f"model.norm = {cfg.norm!r}: {llama} RMSNorm")
    if cfg.activation != "swiglu":
        raise UserError(f"model.activation = {cfg.activation!r}: {llama} SwiGLU MLPs")
    if cfg.n_experts and cfg.moe_every != 1:
        raise UserError(f"model.moe_every = {cfg.moe_every}: {llama} experts in every layer or in none")
    if cfg.n_experts and cfg.bias:
        raise UserError(f"model.bias = true with experts: {llama} no expert biases")
    if cfg.qk_norm:
        raise UserError(f"model.qk_norm = true: {llama} no QK-norm")
    if cfg.logit_softcap:
        raise UserError(f"model.logit_softcap = {cfg.logit_softcap:g}: {llama} no logit soft-cap")
    if cfg.attention_window:  # (the file would carry no window: llama.cpp would attend densely)
        raise UserError(f"model.attention_window = {cfg.attention_window}: {llama} no sliding-window attention")


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (weight (H*Dh, D) or bias (H*Dh,)) from our rotate-halves RoPE
    layout to llama.cpp's adjacent pairs: ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Our state dict -> llama.cpp's tensor names and layouts (float32 numpy), in file order."""
    out = {"token_embd.weight": sd["embed.weight"]}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        experts: dict[str, list[torch.Tensor]] = {}
        for name, t in sd.items():
            if not name.startswith(b):
                continue
            rest = name[len(b):]
            if rest.startswith("mlp.experts."):  # mlp.experts.{e}.{gate,up,down}_proj.weight
                _, _, e, proj, _ = rest.split(".")
                experts.setdefault(proj, [None] * cfg.n_experts)[int(e)] = t
                continue
            if rest.startswith("attn.q_proj."):
                t = permute(t, cfg.n_head)
            elif rest.startswith("attn.k_proj."):
                t = permute(t, cfg.kv_heads)
            out[f"blk.{i}.{_BLOCK[rest]}"] = t
        for proj in ("gate", "up", "down"):
            if experts:
                out[f"blk.{i}.ffn_{proj}_exps.weight"] = torch.stack(experts[f"{proj}_proj"])  # (E, F, D) / (E, D, F)
    out["output_norm.weight"] = sd["norm.weight"]
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return {k: v.detach().float().contiguous().numpy() for k, v in out.items()}


def _write_tokenizer(w, tok: Tokenizer, n_vocab: int) -> None:
    """tokenizer.ggml.*: what llama.cpp needs to tokenize as ``tok`` does."""
    import gguf

    T = gguf.TokenType
    user = set(tok.user_defined_symbols)
    if tok.backend == "sentencepiece":
        sp = tok._sp
        tokens, scores, types = [], [], []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            tokens.append(piece)
            scores.append(sp.get_score(i))
            types.append(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                         T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else
                         T.USER_DEFINED if piece in user else T.NORMAL)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_add_space_prefix(False)  # trained with add_dummy_prefix=False
    else:
        state = json.loads((tok.path / "tokenizer.json").read_text(encoding="utf-8"))
        by_id = {i: t for t, i in state["model"]["vocab"].items()}
        tokens = [by_id[i] for i in range(len(by_id))]
        specials = {t["content"] for t in state.get("added_tokens", []) if t.get("special")}
        types = [T.CONTROL if t in specials else T.USER_DEFINED if t in user else T.NORMAL for t in tokens]
        scores = None
        merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")  # ByteLevel(use_regex=True): GPT-2's split
        w.add_token_merges(merges)
    for i in range(len(tokens), n_vocab):  # a model vocab larger than the tokenizer's (as convert pads it)
        tokens.append(f"[PAD{i}]")
        types.append(T.UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_unk_token_id(tok.unk_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(True)  # every text2llm prompt starts with BOS
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template_jinja(tok.chat_template))


def _quantized(name: str, data: np.ndarray, kind: str):
    """(data, GGML type) for one tensor: the matrices in ``kind``, the rest f32 (convert_hf_to_gguf's rule)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    keep_f32 = data.ndim <= 1 or name.endswith(("_norm.weight", ".bias", "ffn_gate_inp.weight"))
    qtype = Q.F32 if kind == "f32" or keep_f32 else Q.F16 if kind == "f16" else Q.Q8_0
    if qtype == Q.F32:
        return data, qtype
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # rows that do not split into 32-value blocks
        return gguf.quants.quantize(data, Q.F16), Q.F16


def export_gguf(ckpt: str | Path, out: str | Path, type: str = "f32", overwrite: bool = False) -> Path:
    """Write CKPT (a checkpoint dir, or a run dir's latest checkpoint) as the GGUF file ``out``."""
    require("gguf", "export", "export gguf")
    import gguf

    if type not in TYPES:
        raise UserError(f"--type: {type!r} is not one of {', '.join(TYPES)}")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a directory; give the GGUF file to write, e.g. --out model.gguf")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists ({OVERWRITE_HINT})")
    src = resolve_checkpoint(ckpt)
    if is_int8(src):
        raise UserError(f"{src}: an int8 checkpoint (compress quantize); export the float checkpoint it came "
                        "from, with --type q8_0 for llama.cpp's own 8-bit format")
    cfg = read_checkpoint_config(src).model
    check_gguf(cfg)
    tok = load_tokenizer(src)
    model, _ = load_model(src)
    tensors = gguf_tensors(cfg, model.state_dict())

    w = gguf.GGUFWriter(None, "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(Path(ckpt).resolve().name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[type])
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.moe_dim if cfg.n_experts else cfg.ffn_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.n_experts:
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.moe_top_k)
    _write_tokenizer(w, tok, cfg.vocab_size)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, data in tensors.items():
        data, qtype = _quantized(name, data, type)
        w.add_tensor(name, data, raw_dtype=qtype)

    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")  # whole or not at all
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        w.write_header_to_file(path=partial)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(partial, out)
    except OSError as e:
        raise UserError(f"{out}: cannot write ({e.strerror or e})") from None
    finally:
        partial.unlink(missing_ok=True)
    return out
