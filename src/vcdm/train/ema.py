"""EDM's exponential moving average of the network weights (Karras et al. 2022, training_loop.py).

The half-life is `halflife_nimg` images, optionally ramped up as `rampup` times the images seen so
far (short early memory while the network changes fast); each step of `batch` images mixes
``ema = beta * ema + (1 - beta) * net`` with ``beta = 0.5 ** (batch / halflife)``. Buffers are copied.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, net: nn.Module, *, halflife_nimg: float, rampup: float | None = None):
        self.net = net
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        self.halflife_nimg, self.rampup = float(halflife_nimg), rampup

    def halflife(self, nimg: int) -> float:
        """The half-life in images after `nimg` images of training."""
        if self.rampup is not None and self.rampup > 0:
            return min(self.halflife_nimg, nimg * self.rampup)
        return self.halflife_nimg

    def beta(self, nimg: int, batch: int) -> float:
        return 0.5 ** (batch / max(self.halflife(nimg), 1e-8))

    @torch.no_grad()
    def update(self, nimg: int, batch: int) -> None:
        """Mix in the network after a step of `batch` images that started at `nimg` images."""
        beta = self.beta(nimg, batch)
        for p_ema, p_net in zip(self.ema.parameters(), self.net.parameters()):
            p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        for b_ema, b_net in zip(self.ema.buffers(), self.net.buffers()):
            b_ema.copy_(b_net)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema.load_state_dict(state)
