"""text2llm.loss: the one token loss (sum, mean, ignored padding) and bits-per-byte."""

from __future__ import annotations

import math

import pytest
import torch

from text2llm.loss import IGNORE_INDEX, bits_per_byte, count_targets, ignore_padding, lm_loss, token_nll_sum


def test_sum_mean_and_count_skip_ignored_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.bfloat16)
    y = torch.randint(0, 11, (2, 5))
    y[0, 3:] = IGNORE_INDEX
    y[1, 4] = IGNORE_INDEX
    keep = y != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), -1)  # upcast first, as the loss does
    ref = -logp[keep, y[keep]].sum()
    total = token_nll_sum(logits, y)
    assert total.dtype == torch.float32 and total.item() == pytest.approx(ref.item(), rel=1e-6)
    assert int(count_targets(y)) == 7
    assert lm_loss(logits, y).item() == pytest.approx(total.item() / 7, rel=1e-6)


def test_ignore_padding_masks_exactly_the_pad_targets():
    y = torch.tensor([[5, 0, 3, 0]])
    out = ignore_padding(y, pad_id=0)
    assert out.tolist() == [[5, IGNORE_INDEX, 3, IGNORE_INDEX]] and y.tolist() == [[5, 0, 3, 0]]  # a new tensor


def test_bits_per_byte_one_definition():
    # 1000 tokens at 2 nats each over 4000 bytes: 2000 nats / ln 2 / 4000 bytes
    assert bits_per_byte(2.0, 1000, 4000) == pytest.approx(2000 / math.log(2) / 4000)
    assert bits_per_byte(2000.0, 1, 4000) == 2000.0 / math.log(2) / 4000  # a total NLL: bitwise the same formula
    assert bits_per_byte(1.0, 10, 0) == 10 / math.log(2)  # no bytes recorded: per 1 byte, not a division by zero
