"""AdamW with parameter groups, and learning-rate schedules."""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases and embeddings are not decayed.

    Decaying an embedding pulls rare tokens' vectors to zero, and decaying a norm's gain or a bias
    only fights the model; the usual practice (GPT-3, Llama) decays the 2-D weights of Linear layers.
    """
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # a tied weight appears once
        is_embedding = "embed" in name
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """``cfg`` is a TrainConfig."""
    kwargs = {}
    if any(p.is_cuda for p in model.parameters()):
        kwargs["fused"] = True
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs
    )


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    * warm-up: linear from lr/warmup to lr over ``warmup_steps``;
    * cosine: lr -> min_lr along half a cosine, reaching min_lr at ``max_steps``;
    * constant: lr;
    * wsd (warmup-stable-decay): lr until the last ``decay_fraction`` of steps, then linear to min_lr.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = int(cfg.max_steps * (1 - cfg.decay_fraction))
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, frac)
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    frac = min(1.0, max(0.0, frac))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))
