"""AdamW with parameter groups, and learning-rate schedules."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False,
                 decay_norms_and_biases: bool = False) -> list[dict]:
    """Split parameters into a decayed and a not-decayed group.

    By default weight decay applies to the 2-D weights of Linear layers only: decaying an
    embedding pulls rare tokens' vectors to zero, and decaying a norm's gain or a bias only
    fights the model (GPT-3, Llama practice). A tied output head is the embedding, so it follows
    ``decay_embeddings``. Each group carries a ``names`` list so a reader can check the split.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = ([], []), ([], [])
    for name, p in model.named_parameters():  # named_parameters() yields a tied weight once
        if not p.requires_grad:
            continue
        if id(p) in embedding_params:
            wanted = decay_embeddings
        elif p.dim() < 2:  # norm gains, biases
            wanted = decay_norms_and_biases
        else:
            wanted = True
        group = decay if wanted and weight_decay > 0 else no_decay
        group[0].append(p)
        group[1].append(name)
    groups = [
        {"params": decay[0], "names": decay[1], "weight_decay": weight_decay},
        {"params": no_decay[0], "names": no_decay[1], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``cfg`` is a TrainConfig. Fused kernels on CUDA."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings, cfg.decay_norms_and_biases)
    params = [p for g in groups for p in g["params"]]
    kwargs = {}
    if params and all(p.is_cuda for p in params):
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    * warm-up: linear from lr/warmup to lr over the first ``warmup_steps`` steps;
    * cosine (default): lr -> min_lr along half a cosine, reaching min_lr at ``max_steps``;
    * constant: lr;
    * wsd (warmup-stable-decay): lr until the last ``decay_fraction`` of steps, then linear to min_lr.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, int(cfg.max_steps * (1 - cfg.decay_fraction)))
        if step < decay_start:
            return cfg.lr
        frac = (step + 1 - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, frac)
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - 1 - cfg.warmup_steps)
    frac = min(1.0, max(0.0, frac))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))
