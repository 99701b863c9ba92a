"""Mixture-of-Experts MLP: a router picks the top-k of E expert MLPs for every token.

Shape legend: N tokens (B*T flattened), D d_model, E experts, k experts per token (top-k),
A = N*k assignments (one per token and chosen expert), C capacity per expert.

One forward pass::

    logits_NE = router(x_ND)                     a Linear D -> E, no bias
    probs_NE  = softmax(logits_NE)               over all experts (in fp32)
    w_Nk, e_Nk = top-k(probs_NE)                 token-choice routing
    w_Nk /= w_Nk.sum(-1)                         renormalise over the chosen k (Mixtral)
    y_N = sum_j w_Nj * expert[e_Nj](x_N)

Dispatch is batched per expert: the A assignments are sorted by expert, each expert runs once on
its contiguous block of tokens (a Python loop over the E experts, never over tokens), and the
results are scattered back with ``index_add_``. This is the same math as transformers'
MixtralSparseMoeBlock, so an exported model gives the same logits. Under torch.export / ONNX
export, whose graphs cannot hold data-dependent group sizes, every expert runs on every token and a
gate that is zero outside the top-k mixes them (same result, E/k times the expert FLOPs).

Losses (returned already weighted, summed into ``ModelOutput.aux_loss``):

* load balancing (Switch Transformer eq. 4, Mixtral):  E * sum_e f_e * P_e, where f_e is the share
  of the A assignments that went to expert e and P_e the mean router probability of e. It is 1.0
  when routing is uniform and grows as it collapses; gradients reach the router through P_e.
* router z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(logits_N)^2; keeps logits small.

Capacity (``capacity_factor`` > 0, training only): expert e keeps at most
C = ceil(factor * A / E) assignments; first choices are served before second choices, earlier
tokens before later ones, and the rest are dropped (the token keeps its residual stream, and its
other experts' outputs). Inference never drops, so a KV-cache decode equals a full forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from text2llm.model.config import ModelConfig
from text2llm.model.mlp import MLP


@dataclass
class RouterStats:
    """What one MoE layer reports besides its output."""

    aux_loss: torch.Tensor  # scalar: weighted load-balancing loss + weighted z-loss
    load_E: torch.Tensor  # int64 (E,): assignments routed to each expert (sums to N*k)
    dropped_E: torch.Tensor  # int64 (E,): of those, dropped for lack of capacity


class MoE(nn.Module):
    """Top-k routed experts used in place of the MLP. ``forward(x_BTD) -> (y_BTD, RouterStats)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.moe_top_k
        self.aux_w, self.z_w, self.capacity_factor = cfg.aux_loss_weight, cfg.z_loss_weight, cfg.capacity_factor
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        # each expert is the model's own MLP block, with hidden size moe_dim
        self.experts = nn.ModuleList(MLP(cfg, hidden=cfg.moe_dim) for _ in range(cfg.n_experts))

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        B, T, D = x_BTD.shape
        E, k = self.n_experts, self.top_k
        x_ND = x_BTD.reshape(-1, D)
        N = x_ND.size(0)

        # ---- route ----
        logits_NE = self.router(x_ND).float()
        probs_NE = logits_NE.softmax(dim=-1)
        w_Nk, e_Nk = probs_NE.topk(k, dim=-1)
        w_Nk = w_Nk / w_Nk.sum(dim=-1, keepdim=True)
        e_A = e_Nk.t().reshape(-1)  # choice-major: all first choices, then all second choices...
        load_E = torch.zeros(E, dtype=torch.long, device=x_ND.device).index_add_(0, e_A, torch.ones_like(e_A))

        if _exporting():  # torch.export / ONNX cannot trace data-dependent group sizes
            y_ND = self._all_experts(x_ND, w_Nk, e_Nk)
            return y_ND.view(B, T, D), self._stats(logits_NE, probs_NE, load_E, load_E)

        # ---- group the A = N*k assignments by expert ----
        # being choice-major, a stable sort puts first choices ahead of second choices in each block
        order_A = torch.argsort(e_A, stable=True)
        token_A = order_A % N  # which token each sorted assignment belongs to
        weight_A = w_Nk.t().reshape(-1)[order_A]
        kept_E = load_E
        if self.capacity_factor > 0 and self.training:
            capacity = math.ceil(self.capacity_factor * N * k / E)
            kept_E = load_E.clamp(max=capacity)
            start_E = torch.cumsum(load_E, 0) - load_E  # where each expert's block starts
            rank_A = torch.arange(N * k, device=x_ND.device) - start_E[e_A[order_A]]
            keep_A = rank_A < capacity
            token_A, weight_A = token_A[keep_A], weight_A[keep_A]

        # ---- run each expert once on its block of tokens ----
        x_AD = x_ND[token_A]
        outs = [expert(chunk) for expert, chunk in zip(self.experts, x_AD.split(kept_E.tolist()))]
        y_AD = (torch.cat(outs) * weight_A[:, None]).to(x_ND.dtype)  # under autocast experts return bf16
        y_ND = torch.zeros_like(x_ND).index_add_(0, token_A, y_AD)

        return y_ND.view(B, T, D), self._stats(logits_NE, probs_NE, load_E, kept_E)

    def _all_experts(self, x_ND, w_Nk, e_Nk):
        """Export path, same math: every expert runs on every token, weighted by a gate that is
        zero outside each token's top-k (E/k times the FLOPs; static shapes for torch.export/ONNX)."""
        gate_NE = torch.zeros(x_ND.size(0), self.n_experts, dtype=w_Nk.dtype, device=x_ND.device)
        gate_NE = gate_NE.scatter(1, e_Nk, w_Nk)
        y_ND = torch.zeros_like(x_ND)
        for e, expert in enumerate(self.experts):
            y_ND = y_ND + (expert(x_ND) * gate_NE[:, e : e + 1]).to(x_ND.dtype)
        return y_ND

    def _stats(self, logits_NE, probs_NE, load_E, kept_E) -> RouterStats:
        """Weighted auxiliary losses and load counts (see the module docstring)."""
        f_E = load_E.to(probs_NE.dtype) / load_E.sum()  # share of assignments per expert (no gradient)
        P_E = probs_NE.mean(dim=0)  # mean router probability (gradient flows here)
        balance = self.n_experts * (f_E * P_E).sum()
        z = torch.logsumexp(logits_NE, dim=-1).pow(2).mean()
        aux = self.aux_w * balance + self.z_w * z
        return RouterStats(aux, load_E.detach(), (load_E - kept_E).detach())


def _exporting() -> bool:
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
