"""The position-wise feed-forward block of every Transformer layer, in a module of its own because
two layers are built from it: the dense layer (``transformer.py``) and each expert of a
Mixture-of-Experts layer (``moe.py``).

Shape legend: D d_model, F hidden size (``cfg.ffn_dim``, or ``cfg.moe_dim`` for an expert); any
leading dims (B, T for a layer; N tokens for an expert).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from text2llm.model.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))  (Shazeer 2020), GELU: down(gelu(up(x))), or ReLU²:
    down(relu(up(x))^2)  (So et al. 2021, "Primer"; the modded-nanogpt / nanochat MLP).
    D -> F -> D; with SwiGLU the gate decides, per hidden unit, how much of ``up`` passes."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        F_ = hidden or cfg.ffn_dim
        self.activation = cfg.activation
        self.swiglu = cfg.activation == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.d_model, F_, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, F_, bias=cfg.bias)
        self.down_proj = nn.Linear(F_, cfg.d_model, bias=cfg.bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))
        if self.activation == "relu2":
            return self.down_proj(F.relu(self.up_proj(x_BTD)).square())
        return self.down_proj(F.gelu(self.up_proj(x_BTD), approximate="tanh"))
