"""Guidance: one denoiser pulled away from a weaker one, D_w = D_g + w * (D - D_g).

The guide D_g is either the same network given the null (all-zero) conditioning — classifier-free
guidance, both halves in one batched call — or a second network ``gnet`` evaluated on the same input:
a smaller or less-trained version of the same model (autoguidance, Karras et al. 2024) or an
unconditional model (classifier-free guidance by a second network, as EDM2's release does it).
w = 1 is the unguided denoiser, and the guide is not evaluated.

A guidance interval (Kynkäänniemi et al. 2024) guides only the evaluations at noise levels
lo < sigma <= hi; the others use the unguided D. Whether an evaluation is guided depends on the noise
level it is made at, so a Heun step may guide its first evaluation and not its second.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Net = Callable[..., torch.Tensor]  # (x, sigma, y) -> D


@dataclass(frozen=True)
class Guidance:
    """``scale`` w; ``gnet``: the guiding network (None: the null condition); ``interval``: (lo, hi]."""
    scale: float = 1.0
    gnet: Net | None = None
    interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"guidance: expected a positive scale, got {self.scale}")
        if self.interval is not None:
            lo, hi = map(float, self.interval)
            if not 0 <= lo < hi:
                raise ValueError(f"guidance interval: expected 0 <= lo < hi, got ({lo:g}, {hi:g})")
            object.__setattr__(self, "interval", (lo, hi))

    @property
    def classifier_free(self) -> bool:
        return self.scale != 1 and self.gnet is None

    def applies(self, sigma: float | torch.Tensor) -> bool:
        """Whether an evaluation at noise level ``sigma`` (one level for the whole batch) is guided."""
        if self.scale == 1:
            return False
        if self.interval is None:
            return True
        lo, hi = self.interval
        return lo < float(sigma) <= hi


def guided_denoise(denoiser: Net, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None,
                   guidance: Guidance) -> torch.Tensor:
    """D_w(x; sigma, y) in float64; the networks see ``x`` and ``y`` as given."""
    if not guidance.applies(sigma):
        return denoiser(x, sigma, y).to(torch.float64)
    if guidance.gnet is None:
        y_pair = torch.cat([y, torch.zeros_like(y)])
        cond, uncond = denoiser(torch.cat([x, x]), sigma, y_pair).to(torch.float64).chunk(2)
        return uncond + guidance.scale * (cond - uncond)
    D = denoiser(x, sigma, y).to(torch.float64)
    D_g = guidance.gnet(x, sigma, y).to(torch.float64)
    return D_g + guidance.scale * (D - D_g)

