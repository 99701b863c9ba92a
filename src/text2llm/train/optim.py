"""The optimizers (AdamW, or Muon on the hidden matrices with AdamW on the rest) with parameter
groups, and learning-rate schedules.

``train.optimizer = "muon"`` (:func:`make_optimizer`): ``torch.optim.Muon`` (momentum, then a
Newton-Schulz orthogonalisation of each 2-D update; Keller Jordan 2024, the modded-nanogpt /
nanochat optimizer) steps the hidden matrices -- attention q/k/v/o and the MLP matrices, in MoE
layers every expert's matrices, each orthogonalised on its own -- and AdamW steps the rest: token
and position embeddings, an untied head, the MoE router (a classifier over experts, as the head is
over the vocabulary), norm gains and biases. Each part has its own peak LR (``train.muon_lr``,
``train.lr``) on the same schedule shape (warm-up, then cosine / constant / wsd down to the same
fraction ``min_lr / lr`` of its peak). Both optimizers step as one :class:`MuonAdamW`, whose
``state_dict`` holds both (so checkpoints, exact resume and the NaN guard treat it as any optimizer).
"""

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


def muon_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the hidden matrices Muon steps: every 2-D weight that is not an embedding,
    the output head or a MoE router (those, and all 1-D tensors, stay with AdamW)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    skip = embedding_params | ({id(head.weight)} if head is not None else set())
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and id(p) not in skip and not n.endswith("router.weight")]


class MuonAdamW:
    """``torch.optim.Muon`` and ``torch.optim.AdamW`` over disjoint parameters, stepped as one
    optimizer: ``param_groups`` lists both's groups (Muon's first),
    ``step`` / ``zero_grad`` call both, and ``state_dict`` is ``{"muon": ..., "adamw": ...}``."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self):
        return {**self.muon.state, **self.adamw.state}

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("not a Muon + AdamW optimizer state (the checkpoint was trained with "
                             "train.optimizer = 'adamw'?)")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer | MuonAdamW:
    """``cfg`` is a TrainConfig. ``optimizer = "adamw"``: AdamW over :func:`param_groups` (fused
    kernels on CUDA). ``"muon"``: :class:`MuonAdamW`, Muon over :func:`muon_params` and AdamW over the
    rest."""
    hidden = muon_params(model) if cfg.optimizer == "muon" else []
    hidden_ids = {id(p) for _, p in hidden}
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings, cfg.decay_norms_and_biases)
    for g in groups:  # what Muon takes leaves AdamW's groups
        keep = [i for i, p in enumerate(g["params"]) if id(p) not in hidden_ids]
        g["params"], g["names"] = [g["params"][i] for i in keep], [g["names"][i] for i in keep]
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    kwargs = {}
    if params and all(p.is_cuda for p in params):
        kwargs["fused"] = True
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)
    if cfg.optimizer != "muon":
        return adamw
    muon = torch.optim.Muon([{"params": [p for _, p in hidden], "names": [n for n, _ in hidden]}], lr=cfg.muon_lr,
                            weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum, nesterov=True,
                            adjust_lr_fn=cfg.muon_adjust_lr)
    return MuonAdamW(muon, adamw)


def set_lr(optimizer, step: int, cfg) -> float:
    """The learning rates of optimizer step ``step`` (0-based) from the config (never from a restored
    state): AdamW's groups get :func:`lr_at`, Muon's ``muon_lr`` times the same factor
    ``lr_at / lr``. Returns the AdamW value (the one the metrics log as ``lr``)."""
    lr = lr_at(step, cfg)
    adamw = optimizer.adamw if isinstance(optimizer, MuonAdamW) else optimizer
    for group in adamw.param_groups:
        group["lr"] = lr
    if isinstance(optimizer, MuonAdamW):
        for group in optimizer.muon.param_groups:
            group["lr"] = cfg.muon_lr * (lr / cfg.lr)
    return lr


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
