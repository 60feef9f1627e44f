"""Per-seed random numbers: one seed gives one sample, whatever the batch it is drawn in.

Each seed owns a ``torch.Generator`` on the sampling device, seeded with ``seed mod 2**32``, and every
draw takes one slice per sample from its own generator, in batch order. This is how EDM's and the
original release's ``generate.py`` draw, so the same seed yields the same initial noise (and churn
noise) as they do.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch


class StackedRandomGenerator:
    def __init__(self, device: str | torch.device, seeds: Iterable[int]):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def _check(self, size: Sequence[int]) -> None:
        if len(size) == 0 or size[0] != len(self.generators):
            raise ValueError(f"size {list(size)}: first dimension must equal the number of seeds ({len(self.generators)})")

    def randn(self, size: Sequence[int], **kwargs) -> torch.Tensor:
        self._check(size)
        kwargs.setdefault("device", self.device)
        return torch.stack([torch.randn(list(size[1:]), generator=g, **kwargs) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, high: int, size: Sequence[int], **kwargs) -> torch.Tensor:
        self._check(size)
        kwargs.setdefault("device", self.device)
        return torch.stack([torch.randint(high, list(size[1:]), generator=g, **kwargs) for g in self.generators])
