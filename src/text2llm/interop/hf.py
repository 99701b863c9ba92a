"""Hugging Face interop: export a checkpoint as a transformers model dir, and import one back.

``export_hf(CKPT, OUT)`` writes::

    OUT/config.json              LlamaConfig (dense, RoPE), MistralConfig / MinistralConfig (sliding windows),
                                 MixtralConfig (MoE) or GPT2Config (learned positions)
    OUT/model.safetensors        the weights under transformers' names (fp32, as trained)
    OUT/generation_config.json   BOS / EOS / PAD ids, so ``model.generate`` stops at EOS
    OUT/tokenizer.json ...       ``Tokenizer.save_hf``: loads with ``AutoTokenizer.from_pretrained(OUT)``
    OUT/text2llm-tokenizer/      the original text2llm tokenizer, so ``import_hf`` restores it exactly

``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` then computes the same logits as our
model (parity tests: tests/test_hf.py). Which architecture a config maps to:

| our config                                          | transformers class  |
|-----------------------------------------------------|---------------------|
| rope, rmsnorm, swiglu (bias on/off), dense          | LlamaForCausalLM    |
| the same, no bias, every layer windowed             | MistralForCausalLM (``sliding_window``) |
| the same, no bias, windowed and full layers mixed   | MinistralForCausalLM (``layer_types``)  |
| the same with n_experts > 0 and moe_every = 1       | MixtralForCausalLM (all layers windowed or none) |
| rope, rmsnorm, swiglu, qk_norm, dense, no window    | Qwen3ForCausalLM (Llama + per-head q/k RMSNorm before RoPE) |
| learned positions, layernorm, gelu, n_kv_head = n_head, dense | GPT2LMHeadModel |

Windows: our ``attention_window`` W means what transformers' ``sliding_window`` W means (a query
sees itself and the W-1 keys before it). For a mix of local and full layers, Ministral is Mistral
with a per-layer ``layer_types`` list ("sliding_attention" / "full_attention") and nothing else:
the same RMSNorm, SwiGLU, bias-free projections and RoPE as ours, so the logits are equal. (Qwen2's
``layer_types`` would need zero q/k/v biases; Qwen3 adds q/k norms (what ``model.qk_norm`` exports
to), Gemma 2/3 norms after each
branch, logit soft-capping and scaled embeddings, GPT-OSS attention sinks: each computes
something else.)

Anything else (e.g. rope with layernorm, MoE in every 2nd layer) is refused with a message naming
the field. Weight names, ours -> Llama/Mixtral (``model.layers.{i}.`` prefix)::

    embed.weight                      model.embed_tokens.weight
    blocks.{i}.attn_norm.weight       input_layernorm.weight
    blocks.{i}.attn.{q,k,v,o}_proj    self_attn.{q,k,v,o}_proj          (same layout: no permutation,
    blocks.{i}.attn.{q,k}_norm        self_attn.{q,k}_norm               (Qwen3)
    blocks.{i}.mlp_norm.weight        post_attention_layernorm.weight    our RoPE rotates halves as HF does)
    blocks.{i}.mlp.{gate,up,down}_proj  mlp.{gate,up,down}_proj
    blocks.{i}.mlp.router             block_sparse_moe.gate
    blocks.{i}.mlp.experts.{e}.{gate,down,up}_proj  block_sparse_moe.experts.{e}.{w1,w2,w3}
    norm.weight / lm_head.weight      model.norm.weight / lm_head.weight (omitted when tied)

``import_hf(HF_DIR, OUT)`` reads such a dir (ours or a hub model of those families, with its
``sliding_window`` and Ministral's ``layer_types`` as our window and pattern; fp32/
bf16/fp16 safetensors, sharded or not, or ``pytorch_model.bin`` loaded with ``weights_only=True``)
and writes a text2llm checkpoint dir (model.safetensors, config.toml, state.json at step 0,
tokenizer/ when the dir carries a text2llm tokenizer) that ``text2llm.load``, ``text2llm generate``
and ``text2llm train`` (``train.init_from``, as a starting point) accept. Weights become fp32.

The MoE auxiliary-loss weight is converted too: transformers' Mixtral loss equals top_k times
ours (ours is 1.0 at perfect balance), so ``router_aux_loss_coef = aux_loss_weight / top_k``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from text2llm.checkpoint import (is_int8, load_model, load_tokenizer, read_checkpoint_config, resolve_checkpoint,
                                 tokenizer_dir, write_checkpoint_dir)
from text2llm.config import Config
from text2llm.errors import UserError
from text2llm.files import staged_output
from text2llm.model.config import ModelConfig
from text2llm.model.transformer import Transformer
from text2llm.tokenizer import Tokenizer

TOKENIZER_COPY = "text2llm-tokenizer"


# ---- which transformers architecture ---------------------------------------------------------


def hf_architecture(cfg: ModelConfig) -> str:
    """"llama", "mistral", "ministral", "mixtral", "qwen3" or "gpt2" for this config, or a UserError naming
    the field that no transformers architecture we export can represent."""
    if cfg.logit_softcap:
        raise UserError(f"model.logit_softcap = {cfg.logit_softcap:g}: Llama / Mistral / Mixtral / GPT-2 have no "
                        "logit soft-cap (only Gemma-2, a different block); export to ONNX instead")
    if cfg.activation == "relu2":
        raise UserError("model.activation = 'relu2': Llama / Mistral / Mixtral / GPT-2 have no ungated ReLU² MLP; "
                        "export to ONNX instead")
    if cfg.positions == "learned":
        if cfg.attention_window:
            raise UserError(f"model.attention_window = {cfg.attention_window}: GPT-2 (learned positions) "
                            "has no sliding window (Mistral needs positions = 'rope')")
        gpt2 = "learned positions export as GPT-2, which needs"
        if cfg.norm != "layernorm":
            raise UserError(f"model.norm = {cfg.norm!r}: {gpt2} layernorm (Llama needs positions = 'rope')")
        if cfg.activation != "gelu":
            raise UserError(f"model.activation = {cfg.activation!r}: {gpt2} gelu (Llama needs positions = 'rope')")
        if cfg.kv_heads != cfg.n_head:
            raise UserError(f"model.n_kv_head = {cfg.n_kv_head}: {gpt2} n_kv_head = n_head (no GQA)")
        if cfg.n_experts:
            raise UserError(f"model.n_experts = {cfg.n_experts}: {gpt2} a dense model (Mixtral needs rope)")
        return "gpt2"
    if cfg.norm != "rmsnorm":
        raise UserError(f"model.norm = {cfg.norm!r}: Llama/Mixtral need rmsnorm "
                        "(GPT-2 export needs positions = 'learned' with layernorm and gelu)")
    if cfg.activation != "swiglu":
        raise UserError(f"model.activation = {cfg.activation!r}: Llama/Mixtral need swiglu "
                        "(GPT-2 export needs positions = 'learned' with layernorm and gelu)")
    if cfg.qk_norm:  # Qwen3: Llama with q/k norms; its MLP has no biases, its sliding windows differ from ours
        qwen3 = "model.qk_norm = true exports as Qwen3, which has"
        if cfg.n_experts:
            raise UserError(f"model.n_experts = {cfg.n_experts}: {qwen3} no experts (Qwen3-MoE routes differently)")
        if cfg.attention_window:
            raise UserError(f"model.attention_window = {cfg.attention_window}: {qwen3} no sliding window here")
        if cfg.bias:
            raise UserError(f"model.bias = true: {qwen3} no MLP biases")
        return "qwen3"
    mixed = "L" in cfg.pattern
    if cfg.attention_window and cfg.bias:
        raise UserError("model.bias = true: Mistral / Ministral (sliding windows) have no biases")
    if not cfg.n_experts:
        return "llama" if not cfg.attention_window else "ministral" if mixed else "mistral"
    if cfg.attention_window and mixed:
        raise UserError(f"model.window_pattern = {cfg.window_pattern!r}: Mixtral windows every layer or none "
                        "(no transformers MoE architecture mixes local and full layers like ours)")
    if cfg.moe_every != 1:
        raise UserError(f"model.moe_every = {cfg.moe_every}: Mixtral has experts in every layer (needs moe_every = 1)")
    if cfg.bias:
        raise UserError("model.bias = true: Mixtral has no biases")
    return "mixtral"


def hf_config(cfg: ModelConfig, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0) -> dict:
    """The config.json that makes transformers build the same network."""
    arch = hf_architecture(cfg)
    common = {"vocab_size": cfg.vocab_size, "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
              "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
              "torch_dtype": "float32", "dtype": "float32", "use_cache": True}
    if arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.ffn_dim,
                "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                "attn_pdrop": cfg.dropout, "scale_attn_weights": True}
    out = {"architectures": [f"{_CLASS_PREFIX[arch]}ForCausalLM"], "model_type": arch,
           **common, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
           "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
           "intermediate_size": cfg.ffn_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
           "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
           "attention_dropout": cfg.dropout}
    if arch == "llama":
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias, pretraining_tp=1)
    elif arch == "qwen3":
        out.update(attention_bias=False, use_sliding_window=False, sliding_window=None,
                   max_window_layers=cfg.n_layer, layer_types=["full_attention"] * cfg.n_layer)
    elif arch == "mixtral":
        out.update(intermediate_size=cfg.moe_dim, num_local_experts=cfg.n_experts,
                   num_experts_per_tok=cfg.moe_top_k, router_aux_loss_coef=cfg.aux_loss_weight / cfg.moe_top_k,
                   output_router_logits=False, router_jitter_noise=0.0, sliding_window=cfg.attention_window or None)
    else:
        out.update(sliding_window=cfg.attention_window)
    if arch == "ministral":
        out.update(layer_types=[_LAYER_TYPE[c] for c in cfg.pattern])
    return out


_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "ministral": "Ministral", "mixtral": "Mixtral", "qwen3": "Qwen3"}
_LAYER_TYPE = {"S": "sliding_attention", "L": "full_attention"}


# ---- weight renaming -------------------------------------------------------------------------

_LLAMA_BLOCK = {  # our name inside blocks.{i}. -> HF name inside model.layers.{i}.
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}_proj.{w}": f"self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")},
    "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight",
    **{f"mlp.{p}_proj.{w}": f"mlp.{p}_proj.{w}" for p in ("gate", "up", "down") for w in ("weight", "bias")},
    "mlp.router.weight": "block_sparse_moe.gate.weight",
}
_EXPERT = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_EXPERT_INV = {v: k for k, v in _EXPERT.items()}
_HUB_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(w[123])\.weight")


def to_hf_state(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (tied head stored once or twice) -> transformers' names and layouts."""
    if hf_architecture(cfg) == "gpt2":
        return _to_gpt2_state(cfg, sd)
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for name, t in sd.items():
        if not name.startswith("blocks."):
            continue
        _, i, rest = name.split(".", 2)
        if rest.startswith("mlp.experts."):
            _, _, e, proj, w = rest.split(".")
            out[f"model.layers.{i}.block_sparse_moe.experts.{e}.{_EXPERT[proj]}.{w}"] = t
        else:
            out[f"model.layers.{i}.{_LLAMA_BLOCK[rest]}"] = t
    return out


def _to_gpt2_state(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 keeps Conv1D weights as (in, out), fuses q/k/v into c_attn and always has biases."""
    D = cfg.d_model

    def bias(name: str, n: int) -> torch.Tensor:
        return sd.get(name, torch.zeros(n))

    out = {"transformer.wte.weight": sd["embed.weight"], "transformer.wpe.weight": sd["pos_embed.weight"],
           "transformer.ln_f.weight": sd["norm.weight"], "transformer.ln_f.bias": bias("norm.bias", D)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        out[h + "ln_1.weight"], out[h + "ln_1.bias"] = sd[b + "attn_norm.weight"], bias(b + "attn_norm.bias", D)
        out[h + "ln_2.weight"], out[h + "ln_2.bias"] = sd[b + "mlp_norm.weight"], bias(b + "mlp_norm.bias", D)
        qkv = [sd[f"{b}attn.{p}_proj.weight"] for p in "qkv"]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv).t().contiguous()
        out[h + "attn.c_attn.bias"] = torch.cat([bias(f"{b}attn.{p}_proj.bias", D) for p in "qkv"])
        out[h + "attn.c_proj.weight"] = sd[b + "attn.o_proj.weight"].t().contiguous()
        out[h + "attn.c_proj.bias"] = bias(b + "attn.o_proj.bias", D)
        out[h + "mlp.c_fc.weight"] = sd[b + "mlp.up_proj.weight"].t().contiguous()
        out[h + "mlp.c_fc.bias"] = bias(b + "mlp.up_proj.bias", cfg.ffn_dim)
        out[h + "mlp.c_proj.weight"] = sd[b + "mlp.down_proj.weight"].t().contiguous()
        out[h + "mlp.c_proj.bias"] = bias(b + "mlp.down_proj.bias", D)
    return out


def from_hf_config(hf: dict, where: str = "config.json") -> ModelConfig:
    """A transformers config.json (llama, mistral, ministral, mixtral, qwen3, gpt2) -> our ModelConfig, or a UserError."""
    try:
        return _from_hf_config(hf, where)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"{where}: not representable in text2llm: {'.'.join(map(str, err['loc']))} "
                        f"{err['msg'].removeprefix('Value error, ')}") from None


def _from_hf_config(hf: dict, where: str) -> ModelConfig:
    mt = hf.get("model_type")

    def need(key: str):
        if key not in hf:
            raise UserError(f"{where}: missing '{key}' (needed for model_type {mt!r})")
        return hf[key]

    tie = bool(hf.get("tie_word_embeddings", mt == "gpt2"))
    if mt == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"{where}: activation_function {hf['activation_function']!r} is not supported "
                            "(text2llm's gelu is the tanh approximation, 'gelu_new')")
        d = need("n_embd")
        return ModelConfig(vocab_size=need("vocab_size"), d_model=d, n_layer=need("n_layer"), n_head=need("n_head"),
                           ffn_hidden=hf.get("n_inner") or 4 * d, max_seq_len=need("n_positions"),
                           positions="learned", norm="layernorm", activation="gelu", bias=True,
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=tie,
                           init_std=hf.get("initializer_range", 0.02))
    if mt not in ("llama", "mistral", "ministral", "mixtral", "qwen3"):
        raise UserError(f"{where}: model_type {mt!r} is not supported (llama, mistral, ministral, mixtral, qwen3, gpt2)")
    if mt == "qwen3" and (hf.get("use_sliding_window") or hf.get("attention_bias")):
        raise UserError(f"{where}: a Qwen3 config with {'use_sliding_window' if hf.get('use_sliding_window') else 'attention_bias'} "
                        "is not supported (text2llm's qk_norm model has neither)")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu, as SwiGLU)")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"{where}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported "
                        "(text2llm implements plain RoPE)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    d, n_head = need("hidden_size"), need("num_attention_heads")
    if hf.get("head_dim") not in (None, d // n_head):
        raise UserError(f"{where}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads ({d // n_head})")
    window, pattern = _window_of(hf, mt, need("num_hidden_layers"), need("max_position_embeddings"), where) \
        if mt != "qwen3" else (0, "")
    bias = bool(hf.get("attention_bias", False))
    if bias != bool(hf.get("mlp_bias", False)):
        raise UserError(f"{where}: attention_bias != mlp_bias; text2llm has one 'bias' switch for all layers")
    kw = dict(vocab_size=need("vocab_size"), d_model=d, n_layer=need("num_hidden_layers"), n_head=n_head,
              n_kv_head=0 if hf.get("num_key_value_heads") in (None, n_head) else hf["num_key_value_heads"], ffn_hidden=need("intermediate_size"),
              max_seq_len=need("max_position_embeddings"), rope_theta=theta, norm_eps=hf.get("rms_norm_eps", 1e-6),
              tie_embeddings=tie, bias=bias, init_std=hf.get("initializer_range", 0.02),
              attention_window=window, window_pattern=pattern, qk_norm=mt == "qwen3")
    if mt == "mixtral":
        k = hf.get("num_experts_per_tok", 2)
        kw.update(n_experts=need("num_local_experts"), moe_top_k=k, moe_ffn_hidden=kw["ffn_hidden"],
                  aux_loss_weight=hf.get("router_aux_loss_coef", 0.001) * k)
    return ModelConfig(**kw)


def _window_of(hf: dict, mt: str, n_layer: int, max_len: int, where: str) -> tuple[int, str]:
    """(attention_window, window_pattern) of a llama / mistral / ministral / mixtral config.json:
    ``sliding_window`` (ignored by Llama, and where it covers the whole context) and, for
    Ministral-style configs, ``layer_types``."""
    window = hf.get("sliding_window") or 0
    if mt == "llama" or window >= max_len:
        return 0, ""
    types = hf.get("layer_types") if mt == "ministral" else None
    if not types:
        return window, ""
    if len(types) != n_layer or set(types) - set(_LAYER_TYPE.values()):
        raise UserError(f"{where}: layer_types must list {n_layer} of 'sliding_attention' / 'full_attention'")
    pattern = "".join("S" if t == "sliding_attention" else "L" for t in types)
    if "S" not in pattern:
        return 0, ""
    if "L" not in pattern:
        return window, ""
    period = next(p for p in range(1, n_layer + 1) if (pattern[:p] * n_layer)[:n_layer] == pattern)
    return window, pattern[:period]  # the shortest pattern that repeats to it, e.g. SSSL


def from_hf_state(cfg: ModelConfig, hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' state dict -> ours (fp32). Mixtral experts may be per-expert (hub format,
    ``block_sparse_moe.experts.{e}.w1``) or fused (transformers 5: ``mlp.experts.gate_up_proj``)."""
    hf_sd = {k: v.float() for k, v in hf_sd.items()}
    if cfg.positions == "learned":  # GPT-2: invert _to_gpt2_state
        hf_sd = {k.removeprefix("transformer."): v for k, v in hf_sd.items()}
        sd = {"embed.weight": hf_sd["wte.weight"], "pos_embed.weight": hf_sd["wpe.weight"],
              "norm.weight": hf_sd["ln_f.weight"], "norm.bias": hf_sd["ln_f.bias"]}
        for i in range(cfg.n_layer):
            h, b = f"h.{i}.", f"blocks.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                sd[f"{b}{ours}.weight"], sd[f"{b}{ours}.bias"] = hf_sd[f"{h}{theirs}.weight"], hf_sd[f"{h}{theirs}.bias"]
            for p, w, bb in zip("qkv", hf_sd[h + "attn.c_attn.weight"].t().chunk(3), hf_sd[h + "attn.c_attn.bias"].chunk(3)):
                sd[f"{b}attn.{p}_proj.weight"], sd[f"{b}attn.{p}_proj.bias"] = w.contiguous(), bb
            for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
                sd[f"{b}{ours}.weight"] = hf_sd[f"{h}{theirs}.weight"].t().contiguous()
                sd[f"{b}{ours}.bias"] = hf_sd[f"{h}{theirs}.bias"]
    else:
        inverse = {v: k for k, v in _LLAMA_BLOCK.items()}
        inverse["mlp.gate.weight"] = "mlp.router.weight"
        inverse = {k.replace("block_sparse_moe.", "mlp."): v for k, v in inverse.items()}  # transformers 5 names the router mlp.gate
        sd = {"embed.weight": hf_sd["model.embed_tokens.weight"], "norm.weight": hf_sd["model.norm.weight"]}
        for name, t in hf_sd.items():
            if not name.startswith("model.layers."):
                continue
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            b = f"blocks.{i}."
            rest = rest.replace("block_sparse_moe.", "mlp.")
            if m := _HUB_EXPERT.fullmatch(rest):  # mlp.experts.{e}.w1.weight
                sd[f"{b}mlp.experts.{m[1]}.{_EXPERT_INV[m[2]]}.weight"] = t
            elif rest == "mlp.experts.gate_up_proj":  # (E, 2F, D): gate then up
                for e, gu in enumerate(t):
                    sd[f"{b}mlp.experts.{e}.gate_proj.weight"], sd[f"{b}mlp.experts.{e}.up_proj.weight"] = gu.chunk(2)
            elif rest == "mlp.experts.down_proj":  # (E, D, F)
                for e, dn in enumerate(t):
                    sd[f"{b}mlp.experts.{e}.down_proj.weight"] = dn
            elif rest in inverse:
                sd[b + inverse[rest]] = t
            elif not rest.endswith("rotary_emb.inv_freq"):
                raise UserError(f"unexpected weight '{name}' in the Hugging Face checkpoint")
    if "lm_head.weight" in hf_sd:
        sd["lm_head.weight"] = hf_sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in sd.items()}


# ---- export / import -------------------------------------------------------------------------


def export_hf(ckpt: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a transformers model dir for CKPT (a checkpoint dir, or a run dir's latest checkpoint)."""
    src = resolve_checkpoint(ckpt)
    if is_int8(src):
        raise UserError(f"{src}: has no model.safetensors (a quantized checkpoint cannot be exported to "
                        "Hugging Face; export the float checkpoint it was made from)")
    cfg = read_checkpoint_config(src).model
    if cfg.vocab_size <= 0:
        raise UserError(f"{src / 'config.toml'}: model.vocab_size is 0; not a trained checkpoint")
    hf_architecture(cfg)  # refuse early, before any file is written
    tok = None
    if tokenizer_dir(src) is not None:
        tok = load_tokenizer(src)
    else:
        warnings.warn(f"{src}: no tokenizer/ dir; exporting the model without a tokenizer")
    ids = dict(bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id) if tok else {}

    model, _ = load_model(src)
    hf_sd = to_hf_state(cfg, model.state_dict())
    with staged_output(out_dir, overwrite) as tmp:
        config = hf_config(cfg, **ids)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        save_file({k: v.detach().contiguous() for k, v in hf_sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if tok is not None:
            tok.save_hf(tmp, model_max_length=cfg.max_seq_len)
            tok.save(tmp / TOKENIZER_COPY)
    return Path(out_dir)


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, sharded safetensors (model.safetensors.index.json) or pytorch_model.bin."""
    if (hf_dir / "model.safetensors").is_file():
        return load_file(str(hf_dir / "model.safetensors"))
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(load_file(str(hf_dir / shard)))
        return sd
    if (hf_dir / "pytorch_model.bin").is_file():  # never unpickle arbitrary objects
        return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def import_hf(hf_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Turn a transformers Llama / Mistral / Ministral / Mixtral / GPT-2 dir into a text2llm checkpoint dir."""
    src = Path(hf_dir)
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: not a Hugging Face model dir (no config.json)")
    try:
        hf = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{src / 'config.json'}: not valid JSON ({e})") from None
    mcfg = from_hf_config(hf, where=str(src / "config.json"))
    sd = from_hf_state(mcfg, read_hf_weights(src))
    biases = [k for k in sd if k.endswith(".bias")]
    if mcfg.positions == "learned" and biases and all(not sd[k].any() for k in biases):
        # GPT-2 always stores biases; all zero means a bias-free model (as text2llm exports one)
        mcfg = ModelConfig(**{**mcfg.model_dump(exclude={"preset"}), "bias": False})
        sd = {k: v for k, v in sd.items() if k not in biases}
    model = Transformer(mcfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = set(missing) - ({"lm_head.weight"} if mcfg.tie_embeddings else set())
    if missing or unexpected:
        raise UserError(f"{src}: weights do not match config.json (missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]})")
    if mcfg.tie_embeddings:  # load_state_dict may have put lm_head into the shared tensor last
        model.embed.weight.data.copy_(sd["embed.weight"])
    cfg = Config(model=mcfg, train={"seq_len": min(256, mcfg.max_seq_len)})
    with staged_output(out_dir, overwrite) as tmp:
        write_checkpoint_dir(tmp, model, cfg, None, {"step": 0, "tokens_seen": 0, "imported_from": str(src)},
                             metadata={"source": str(src)})
        if (src / TOKENIZER_COPY).is_dir():
            Tokenizer.load(src / TOKENIZER_COPY).save(tmp / "tokenizer")
        else:
            warnings.warn(f"{src}: carries no text2llm tokenizer ({TOKENIZER_COPY}/); the checkpoint has no "
                          "tokenizer/ (copy one in to generate text)")
    return Path(out_dir)
