"""Preconditioned denoiser D(x; sigma) over a Structure's flat latent.

``kind='edm'`` is EDM's preconditioning (Karras et al. 2022, Table 1); ``'vp'`` and ``'ve'`` are EDM's
VPPrecond / VEPrecond, so EDM's published VP/VE networks run unchanged. On top, the original release's
per-tensor options:

- ``noise_mult``: tensor k is noised at sigma * noise_mult[k]. That per-element sigma enters c_skip,
  c_out and c_in (and the loss weight); c_noise, i.e. what the network is told, uses the base sigma.
- ``pred_x0``: for these tensors the network predicts x0 directly (c_skip = 0, c_out = 1; c_in unchanged).

Both are indexed per data tensor, as the original release's flags are (see ``Structure.tensor_values``).

``logvar_channels > 0`` adds EDM2's learned uncertainty: ``denoiser(..., return_logvar=True)`` also returns
u(sigma) = logvar_linear(logvar_fourier(ln(sigma) / 4)), shape (B, 1), which EDM2's loss divides by (Karras
et al. 2024, Eq. 21). EDM2's Precond is ``kind='edm'`` with sigma_data 0.5 plus this head. The head's
layers are attached to the network module itself (``net.logvar_fourier``, ``net.logvar_linear``, EDM2's
names), so they are part of the network's state dict: EMA, optimiser, training states, snapshots and
checkpoints carry them with no change, and a DDP wrapper of the network synchronises their gradients
(they are used outside its forward, so a loss that uses the head must use it at every step, as EDM2's
does). Attaching is idempotent: rebuilding a Denoiser around a loaded network keeps the loaded head.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from vcdm.data.structure import Structure
from vcdm.nets.edm2 import MPConv, MPFourier

KINDS = ("edm", "vp", "ve")


class Denoiser(nn.Module):
    def __init__(self, net: nn.Module, structure: Structure, kind: str = "edm", sigma_data: float = 0.5,
                 noise_mult: str | Sequence[float] | float | None = None,
                 pred_x0: str | Sequence[int] | int | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 logvar_channels: int = 0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"denoiser kind: expected one of {', '.join(KINDS)}, got '{kind}'")
        if logvar_channels:
            attach_uncertainty_head(net, logvar_channels)
        self.logvar_channels = int(logvar_channels)
        self.net, self.structure, self.kind = net, structure, kind
        self.sigma_data = float(sigma_data)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        self.noise_mult = structure.tensor_values(noise_mult, "--noise_mult", 1.0)
        if any(not (m > 0 and math.isfinite(m)) for m in self.noise_mult):
            raise ValueError(f"--noise_mult: every multiplier must be a positive number, got {list(self.noise_mult)}")
        flags = structure.tensor_values(pred_x0, "--pred_x0", 0)
        if any(v not in (0, 1) for v in flags):
            raise ValueError(f"--pred_x0: expected 0 or 1 per tensor, got {list(flags)}")
        self.pred_x0 = tuple(int(v) for v in flags)
        self.register_buffer("noise_scale", structure.per_tensor(self.noise_mult, "--noise_mult", 1.0).float(), persistent=False)
        self.register_buffer("x0_mask", structure.per_tensor(self.pred_x0, "--pred_x0", 0).bool(), persistent=False)
        self._sigma_range = (sigma_min, sigma_max)
        default_range = {"edm": (0.0, math.inf), "ve": (0.02, 100.0),
                         "vp": (float(self.vp_sigma(epsilon_t)), float(self.vp_sigma(1.0)))}[kind]
        self.sigma_min = float(default_range[0] if sigma_min is None else sigma_min)
        self.sigma_max = float(default_range[1] if sigma_max is None else sigma_max)
        names = structure.latent_names
        if getattr(net, "flat_latent", False):  # e.g. ConcatUNet: splits the flat latent into its tensors itself
            self.net_shape = (structure.latent_dim,)
        elif len(names) == 1:
            self.net_shape = structure.shape(names[0])
        elif all(len(structure.shape(n)) == 1 for n in names):
            self.net_shape = (structure.latent_dim,)  # several vectors (e.g. embedding + one-hot) → one vector
        else:
            raise ValueError(f"--exist/--observed: latent tensors {list(names)} cannot be modelled jointly "
                             "(only several 1-D tensors can); observe all but one of them")

    def config(self) -> dict[str, Any]:
        """Keyword arguments such that ``Denoiser(net, structure, **config())`` rebuilds this one (JSON-able)."""
        cfg = {"kind": self.kind, "sigma_data": self.sigma_data, "noise_mult": list(self.noise_mult),
               "pred_x0": list(self.pred_x0), "sigma_min": self._sigma_range[0], "sigma_max": self._sigma_range[1]}
        if self.kind == "vp":
            cfg.update(beta_d=self.beta_d, beta_min=self.beta_min, M=self.M, epsilon_t=self.epsilon_t)
        if self.logvar_channels:
            cfg.update(logvar_channels=self.logvar_channels)
        return cfg

    def vp_sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def vp_sigma_inv(self, sigma: float | torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def round_sigma(self, sigma: float | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) per element, shape (B, N), and c_noise, shape (B,), for base sigma (B, 1)."""
        s = sigma * self.noise_scale  # per-element noise level
        if self.kind == "edm":
            sd = self.sigma_data
            c_skip = sd ** 2 / (s ** 2 + sd ** 2)
            c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
            c_in = 1 / (sd ** 2 + s ** 2).sqrt()
            c_noise = sigma.log() / 4
        elif self.kind == "vp":
            c_skip, c_out, c_in = torch.ones_like(s), -s, 1 / (s ** 2 + 1).sqrt()
            c_noise = (self.M - 1) * self.vp_sigma_inv(sigma)
        else:
            c_skip, c_out, c_in = torch.ones_like(s), s, torch.ones_like(s)
            c_noise = (0.5 * sigma).log()
        c_skip = c_skip.masked_fill(self.x0_mask, 0.0)
        c_out = c_out.masked_fill(self.x0_mask, 1.0)
        return c_skip, c_out, c_in, c_noise.flatten()

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor, y: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None,
                return_logvar: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """D(x; sigma), shape (B, N); with ``return_logvar``, (D, u(sigma)) with u of shape (B, 1)."""
        if return_logvar and not self.logvar_channels:
            raise ValueError("return_logvar: this denoiser has no uncertainty head (logvar_channels=0)")
        B, N = x.shape
        if N != self.structure.latent_dim:
            raise ValueError(f"denoiser input has {N} values per sample, expected latent_dim {self.structure.latent_dim}")
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1).expand(B, 1)
        label_dim = getattr(self.net, "label_dim", 0)
        if y is not None:
            y = y.to(torch.float32).reshape(B, -1)
            if y.shape[1] != label_dim:
                raise ValueError(f"conditioning y has {y.shape[1]} values per sample, the network takes {label_dim}")
        elif label_dim:
            y = torch.zeros([B, label_dim], device=x.device)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F = self.net((c_in * x).reshape(B, *self.net_shape), c_noise, y, augment_labels=augment_labels)
        D = c_skip * x + c_out * F.to(torch.float32).reshape(B, N)
        if not return_logvar:
            return D
        return D, self.net.logvar_linear(self.net.logvar_fourier(sigma.log().flatten() / 4)).reshape(B, 1)


UNCERTAINTY_HEAD = "logvar_"  # the prefix of the uncertainty head's module names in the network


def attach_uncertainty_head(net: nn.Module, channels: int) -> None:
    """Give ``net`` EDM2's uncertainty head (``logvar_fourier``, ``logvar_linear``) on its device, unless it
    has one of this width already (e.g. loaded from a checkpoint)."""
    if channels < 0:
        raise ValueError(f"logvar_channels: expected a count >= 0, got {channels}")
    head = getattr(net, "logvar_linear", None)
    if head is not None:
        if head.in_channels != channels:
            raise ValueError(f"logvar_channels: the network's uncertainty head has {head.in_channels} channels, "
                             f"not {channels}")
        return
    device = next(net.parameters(), torch.empty(0)).device
    with torch.device(device):
        net.logvar_fourier = MPFourier(channels)
        net.logvar_linear = MPConv(channels, 1, kernel=[])
