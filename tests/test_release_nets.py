"""The original release's networks and training options (issue 9): ConcatUNet/FiLM/ControlNet parity from
vendored numbers, ImageNet fine-tuning from a class-conditional ADM, conditioning dropout, and the
release's --equally_weight_tensors."""
from __future__ import annotations

import torch

from vcdm.diffusion.loss import equally_weighted


def test_equally_weighted_is_a_per_round_mean_per_tensor():
    loss = torch.tensor([[1.0, 1.0, 3.0], [3.0, 3.0, 5.0]])
    assert equally_weighted(loss, [2, 1]).item() == 2.0 + 4.0
    # Gradient accumulation: each round contributes its own full mean (the release divides by the round's
    # batch, not by the per-process batch), so two rounds of one sample add up to twice the mean.
    rounds = equally_weighted(loss[:1], [2, 1]) + equally_weighted(loss[1:], [2, 1])
    assert rounds.item() == (1.0 + 3.0) + (3.0 + 5.0)
