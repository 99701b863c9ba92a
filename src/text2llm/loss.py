"""The language-model loss, defined once: token cross-entropy, the ignore index, bits-per-byte.

Every stage that scores next-token predictions (the training step, evaluation, pruning,
distillation) calls these, so a padded target, a mean and a bits-per-byte figure mean the
same thing everywhere::

    token NLL      -log p(target) per target token, in nats; logits are upcast to float32 first
    ignored        targets equal to IGNORE_INDEX (padding) are neither scored nor counted
    lm_loss        sum of token NLL / number of counted targets
    bits-per-byte  total NLL / ln 2 / UTF-8 bytes of the scored text (comparable across tokenizers)

Only torch and math are imported here: the model, the loader and the trainer all sit above it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets the loss skips (torch cross_entropy's default ignore_index)


def _cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def token_nll_sum(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL (nats, a float32 0-d tensor) over the targets that are not IGNORE_INDEX."""
    return _cross_entropy(logits_BTV, targets_BT, "sum")


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; targets equal to IGNORE_INDEX (padding) do not count."""
    return _cross_entropy(logits_BTV, targets_BT, "mean")


def count_targets(targets_BT: torch.Tensor) -> torch.Tensor:
    """Number of target tokens the loss counts (an integer 0-d tensor): those that are not IGNORE_INDEX."""
    return (targets_BT != IGNORE_INDEX).sum()


def ignore_padding(targets_BT: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``targets_BT`` with every ``pad_id`` target replaced by IGNORE_INDEX (a new tensor)."""
    return targets_BT.masked_fill(targets_BT == pad_id, IGNORE_INDEX)


def bits_per_byte(loss_nats_per_token: float, tokens: int, n_bytes: int) -> float:
    """Mean loss per token (nats) over a text of ``tokens`` tokens and ``n_bytes`` UTF-8 bytes ->
    bits per byte of that text. For a total NLL in nats, ``bits_per_byte(total, 1, n_bytes)``."""
    return loss_nats_per_token / math.log(2) * tokens / max(1, n_bytes)
