"""ModelConfig: every knob of the decoder, validated, plus named presets.

Shapes are derived here once (``head_dim``, ``ffn_dim``, ``moe_dim``, which layers are MoE) so the
model code never guesses. Importing this module does not import torch.

Presets
-------
``[model] preset = "gpt2-124m"`` (or ``model.preset=gpt2-124m`` on the command line) starts from a
named shape; any key written next to it overrides the preset's value::

    [model]
    preset = "llama-1b"
    n_layer = 8          # a half-depth Llama-1B

Presets fix the *shape* only. ``vocab_size`` stays 0 (= taken from your tokenizer), so the nominal
size in a preset's name assumes the reference vocabulary noted in :data:`PRESETS`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# name -> (description, values). Values are ModelConfig fields; explicit keys override them.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "test-100k": ("~100K parameters with a 256-token vocab: unit tests and smoke runs", dict(
        d_model=64, n_layer=2, n_head=4, ffn_hidden=128, max_seq_len=256)),
    "test-moe": ("~150K parameters (~100K active), 4 experts top-2 in every layer: MoE tests", dict(
        d_model=64, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=128, max_seq_len=256,
        n_experts=4, moe_top_k=2, moe_ffn_hidden=64)),
    "tiny": ("~5M parameters with an 8K vocab: the CPU demo (the defaults)", dict(
        d_model=256, n_layer=4, n_head=4, max_seq_len=256)),
    "dense-10m": ("~11M parameters with a 4K vocab: benchmarks/model.py's dense model", dict(
        d_model=384, n_layer=6, n_head=6, ffn_hidden=1024, max_seq_len=256)),
    "moe-8x2-10m": ("dense-10m with 8 experts top-2 of half width: same active parameters", dict(
        d_model=384, n_layer=6, n_head=6, ffn_hidden=1024, max_seq_len=256,
        n_experts=8, moe_top_k=2, moe_ffn_hidden=512)),
    "gpt2-124m": ("GPT-2 small (124M with GPT-2's 50257-token vocab): learned positions, LayerNorm, GELU, biases", dict(
        d_model=768, n_layer=12, n_head=12, ffn_hidden=3072, max_seq_len=1024, positions="learned",
        norm="layernorm", activation="gelu", bias=True, tie_embeddings=True, norm_eps=1e-5)),
    "llama-1b": ("Llama-3.2-1B shape (1.24B with its 128256-token vocab): GQA 32/8, SwiGLU 8192, theta 5e5", dict(
        d_model=2048, n_layer=16, n_head=32, n_kv_head=8, ffn_hidden=8192, max_seq_len=2048,
        rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True)),
}


class ModelConfig(BaseModel):
    """A decoder-only Transformer (Llama-style by default), optionally with Mixture-of-Experts MLPs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: str | None = Field(None, description=f"start from a named shape ({', '.join(PRESETS)}); explicit keys override it")
    vocab_size: int = Field(0, ge=0, description="vocabulary size; 0 = take it from the tokenizer / token shards")
    d_model: int = Field(192, ge=8, description="width of the residual stream")
    n_layer: int = Field(4, ge=1, description="number of Transformer blocks")
    n_head: int = Field(4, ge=1, description="attention (query) heads")
    n_kv_head: int = Field(0, ge=0, description="key/value heads for GQA/MQA; 0 = n_head (plain multi-head)")
    head_size: int = Field(0, ge=0, description="width of one attention head; 0 = d_model // n_head (set when heads are pruned)")
    ffn_hidden: int = Field(0, ge=0, description="MLP hidden size; 0 = 8/3 * d_model rounded up to a multiple of 32 (swiglu) or 4 * d_model (gelu, relu2)")
    max_seq_len: int = Field(256, ge=2, description="longest context the model is built for")
    positions: Literal["rope", "learned"] = Field("rope", description="rotary embeddings or a learned position table")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency")
    norm: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description="normalisation layer")
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of the norm")
    activation: Literal["swiglu", "gelu", "relu2"] = Field("swiglu", description="MLP type (gelu = tanh approximation, "
                                                             "as GPT-2; relu2 = down(relu(up(x))^2), ungated, as "
                                                             "modded-nanogpt / nanochat)")
    tie_embeddings: bool = Field(True, description="share the token embedding with the output head")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on attention and residual branches")
    bias: bool = Field(False, description="biases in Linear layers (and LayerNorm)")
    init_std: float = Field(0.02, gt=0, description="std of the normal init; residual projections are scaled by 1/sqrt(2*n_layer)")
    zero_init_output: bool = Field(False, description="initialise the residual branches' output projections (attention "
                                   "o_proj, MLP / expert down_proj) to zero: every block starts as the identity "
                                   "(modded-nanogpt / nanochat)")
    # ---- refinements of the 2025 small-model recipes (nanochat, modded-nanogpt) ----
    qk_norm: bool = Field(False, description="RMSNorm (with a learned gain per head dim) on each head's queries and "
                          "keys before RoPE, as Qwen3 / OLMo-2: attention logits no longer grow with the scale of q, k")
    logit_softcap: float = Field(0.0, ge=0, description="soft-cap the output logits: cap * tanh(logits / cap) "
                                 "(Gemma-2, modded-nanogpt); 0 = off")
    # ---- sparse attention (model/attention.py) ----
    attention_window: int = Field(0, ge=0, description="sliding-window attention: a token attends to itself and the window-1 tokens before it; 0 = dense (every earlier token)")
    window_pattern: str = Field("", description="which layers use the window: S = windowed, L = full, repeated over the depth (e.g. SSSL); empty = every layer S")
    # ---- Mixture-of-Experts (model/moe.py) ----
    n_experts: int = Field(0, ge=0, description="experts per MoE layer; 0 = dense model (no MoE)")
    moe_top_k: int = Field(2, ge=1, description="experts each token is routed to (token-choice top-k)")
    moe_every: int = Field(1, ge=1, description="every k-th layer is MoE (layers k-1, 2k-1, ...); 1 = every layer")
    moe_ffn_hidden: int = Field(0, ge=0, description="hidden size of each expert MLP; 0 = the dense MLP's size (ffn_dim)")
    aux_loss_weight: float = Field(0.01, ge=0, description="weight of the load-balancing loss (Switch/Mixtral; 1.0 = perfectly balanced)")
    z_loss_weight: float = Field(0.001, ge=0, description="weight of the router z-loss (ST-MoE: mean logsumexp(router logits)^2)")
    capacity_factor: float = Field(0.0, ge=0, description="training only: an expert takes at most factor*tokens*top_k/n_experts tokens, the rest are dropped (0 = no limit)")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(f"model.preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
            data = {**PRESETS[name][1], **data}
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if not self.head_size and self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.kv_heads > self.n_head or self.n_head % self.kv_heads:
            raise ValueError(f"model.n_kv_head ({self.n_kv_head}) must divide model.n_head ({self.n_head})")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"model.d_model / model.n_head = {self.head_dim} must be even for RoPE")
        if self.window_pattern and not self.attention_window:
            raise ValueError(f"model.window_pattern ({self.window_pattern!r}) needs model.attention_window > 0")
        if set(self.window_pattern) - {"S", "L"}:
            raise ValueError(f"model.window_pattern ({self.window_pattern!r}): only the letters S (windowed) "
                             "and L (full) are allowed")
        if self.attention_window and "S" not in self.pattern:
            raise ValueError(f"model.window_pattern ({self.window_pattern!r}) leaves none of the {self.n_layer} "
                             "layers windowed (set model.attention_window = 0 for a dense model)")
        if self.attention_window > self.max_seq_len:
            raise ValueError(f"model.attention_window ({self.attention_window}) must be <= model.max_seq_len "
                             f"({self.max_seq_len})")
        if self.n_experts:
            if self.moe_top_k > self.n_experts:
                raise ValueError(f"model.moe_top_k ({self.moe_top_k}) must be <= model.n_experts ({self.n_experts})")
            if self.moe_every > self.n_layer:
                raise ValueError(f"model.moe_every ({self.moe_every}) must be <= model.n_layer ({self.n_layer}), "
                                 "or no layer would be MoE")
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "preset" and value != self.preset:  # a preset fills in fields only when the config is built
            raise ValueError("model.preset can only be given when the config is built "
                             "(ModelConfig(preset=...), [model] preset = ... in TOML, or model.preset=... override)")
        super().__setattr__(name, value)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.activation == "swiglu":
            return 32 * -(-(8 * self.d_model // 3) // 32)
        return 4 * self.d_model  # gelu, relu2

    @property
    def moe_dim(self) -> int:
        """Hidden size of one expert MLP."""
        return self.moe_ffn_hidden or self.ffn_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer ``i`` is MoE when ``(i + 1) % moe_every == 0`` (Qwen-MoE's ``decoder_sparse_step``)."""
        return self.n_experts > 0 and (layer_idx + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layer) if self.is_moe_layer(i)]

    @property
    def pattern(self) -> str:
        """``window_pattern`` repeated over the depth: one letter per layer (all L when dense)."""
        if not self.attention_window:
            return "L" * self.n_layer
        p = self.window_pattern or "S"
        return (p * -(-self.n_layer // len(p)))[: self.n_layer]

    def layer_window(self, layer_idx: int) -> int:
        """The attention window of layer ``i`` in tokens (itself included); 0 = full causal attention."""
        return self.attention_window if self.pattern[layer_idx] == "S" else 0

    @property
    def unbounded_context(self) -> bool:
        """Every layer windowed, with rotary positions: the model attends to at most ``attention_window``
        tokens at any position, so its KV cache has a fixed size and it can decode past ``max_seq_len``
        (a learned position table has no row there; a full layer would see distances it never trained on)."""
        return self.positions == "rope" and "L" not in self.pattern


def describe_presets() -> str:
    """One line per preset, for ``--help`` texts and error messages."""
    return "\n".join(f"{name:12s} {desc}" for name, (desc, _) in PRESETS.items())
