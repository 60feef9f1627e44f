"""The averages of the network weights that training keeps and writes with each snapshot.

`EMA`: EDM's exponential moving average (Karras et al. 2022, training_loop.py). The half-life is
`halflife_nimg` images, optionally ramped up as `rampup` times the images seen so far (short early
memory while the network changes fast); each step of `batch` images mixes
``ema = beta * ema + (1 - beta) * net`` with ``beta = 0.5 ** (batch / halflife)``. Buffers are copied.

`PowerFunctionEMA`: EDM2's power-function profiles (Karras et al. 2024), one copy of the network per
length, for post-hoc EMA (`vcdm phema`; the maths is in phema.py).
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn

from vcdm.train.phema import power_beta, std_to_gamma


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

    def snapshots(self) -> Iterator[tuple[float | None, dict[str, torch.Tensor], dict]]:
        """(EMA length for the file name: None, weights, what the config records) for each network a snapshot
        writes (vcdm.train.outputs.snapshot_name)."""
        yield None, self.ema.state_dict(), {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema.load_state_dict(state)


class PowerFunctionEMA:
    """Profiles of relative standard deviation `stds`, each averaging the network with weights ∝ t**gamma
    over the t images seen (EDM2's PowerFunctionEMA). A step of `batch` images that ends at t decays
    each average by ``beta = (1 - batch / t) ** (gamma + 1)``, so the first step replaces the initial copy.
    Parameters are averaged, buffers copied. Previews sample the first profile."""

    def __init__(self, net: nn.Module, stds: list[float]):
        self.net = net
        self.stds = [float(s) for s in stds]
        self.gammas = [std_to_gamma(s) for s in self.stds]
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.stds]
        self.keys = [f"{s:.3f}" for s in self.stds]  # the state's prefixes, as the snapshot names write the lengths
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"EMA lengths {self.stds} are not distinct to three decimals (snapshot names)")

    @property
    def ema(self) -> nn.Module:
        return self.emas[0]

    def halflife(self, nimg: int) -> float:
        """Images after `nimg` until the first profile's average of the first `nimg` weighs one half."""
        return nimg * (2 ** (1 / (self.gammas[0] + 1)) - 1)

    @torch.no_grad()
    def update(self, nimg: int, batch: int) -> None:
        """Mix in the network after a step of `batch` images that started at `nimg` images."""
        for gamma, ema in zip(self.gammas, self.emas):
            weight = 1 - power_beta(gamma, nimg + batch, batch)
            for p_ema, p_net in zip(ema.parameters(), self.net.parameters()):
                p_ema.lerp_(p_net.detach(), weight)
            for b_ema, b_net in zip(ema.buffers(), self.net.buffers()):
                b_ema.copy_(b_net)

    def snapshots(self) -> Iterator[tuple[float | None, dict[str, torch.Tensor], dict]]:
        """One network per profile, named by its length (network-snapshot-<kimg>-<std>.safetensors) with
        float16 parameters, as EDM2 writes them (half the disk; buffers stay as they are), one at a time."""
        for std, gamma, ema in zip(self.stds, self.gammas, self.emas):
            params = {name for name, _ in ema.named_parameters()}
            state = {k: v.to(torch.float16) if k in params else v for k, v in ema.state_dict().items()}
            yield std, state, {"ema_profile": {"std": std, "gamma": gamma}}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every profile's weights, flat, under "<std>/" prefixes."""
        return {f"{key}/{name}": t for key, ema in zip(self.keys, self.emas) for name, t in ema.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        found = sorted({k.split("/", 1)[0] for k in state if "/" in k})
        if found != sorted(self.keys):
            raise ValueError(f"the state's EMA is {'profiles ' + ','.join(found) if found else 'the classic --ema'}, "
                             f"these options track profiles {','.join(self.keys)} (--ema-std)")
        for key, ema in zip(self.keys, self.emas):
            ema.load_state_dict({k[len(key) + 1:]: v for k, v in state.items() if k.startswith(key + "/")})
