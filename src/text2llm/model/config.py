"""ModelConfig: every knob of the decoder, validated, plus named presets.

Shapes are derived here once (``head_dim``, ``ffn_hidden``) so the model code never guesses.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """A decoder-only Transformer (Llama-style by default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    vocab_size: int = Field(0, ge=0, description="vocabulary size; 0 = take it from the tokenizer / token shards")
    d_model: int = Field(256, ge=8, description="width of the residual stream")
    n_layer: int = Field(4, ge=1, description="number of Transformer blocks")
    n_head: int = Field(4, ge=1, description="attention (query) heads")
    n_kv_head: int = Field(0, ge=0, description="key/value heads for GQA/MQA; 0 = n_head (plain multi-head)")
    ffn_hidden: int = Field(0, ge=0, description="MLP hidden size; 0 = 8/3 * d_model rounded up to a multiple of 32 (swiglu) or 4 * d_model (gelu)")
    max_seq_len: int = Field(256, ge=2, description="longest context the model is built for")
    positions: Literal["rope", "learned"] = Field("rope", description="rotary embeddings or a learned position table")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency")
    norm: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description="normalisation layer")
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of the norm")
    activation: Literal["swiglu", "gelu"] = Field("swiglu", description="MLP type")
    tie_embeddings: bool = Field(True, description="share the token embedding with the output head")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on attention and residual branches")
    bias: bool = Field(False, description="biases in Linear layers")
    init_std: float = Field(0.02, gt=0, description="std of the normal init; residual projections are scaled by 1/sqrt(2*n_layer)")

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.kv_heads > self.n_head or self.n_head % self.kv_heads:
            raise ValueError(f"model.n_kv_head ({self.n_kv_head}) must divide model.n_head ({self.n_head})")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"model.d_model / model.n_head = {self.head_dim} must be even for RoPE")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.activation == "swiglu":
            return 32 * -(-(8 * self.d_model // 3) // 32)
        return 4 * self.d_model
