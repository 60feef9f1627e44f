"""Noise levels for sampling: the time discretisations of EDM's Table 1 (edm, vp, ve, iddpm) and the
ODE parameterisations sigma(t) and s(t) that EDM's generalized sampler integrates in.

The names are checked by vcdm.diffusion.settings; these functions trust their caller. Every
discretisation returns ``num_steps`` decreasing noise levels, float64, without the final 0
(``append_zero`` adds it). The arithmetic follows EDM's ``ablation_sampler`` operation for operation,
so the levels match EDM's bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Device = torch.device | str | None


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _ramp(num_steps: int, device: Device) -> torch.Tensor:
    """i / (num_steps - 1), i = 0..num_steps-1 (a single step sits at the start)."""
    return torch.arange(num_steps, dtype=torch.float64, device=device) / max(num_steps - 1, 1)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                  device: Device = None) -> torch.Tensor:
    """EDM's time steps (Eq. 5): sigma_max^(1/rho) interpolated linearly to sigma_min^(1/rho), ^rho."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    return (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def vp_sigma(beta_d: float, beta_min: float) -> Callable:
    """The VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return lambda t: (math.e ** (0.5 * beta_d * t ** 2 + beta_min * t) - 1) ** 0.5


def vp_betas(sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """(beta_d, beta_min) that make the VP sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max."""
    beta_d = 2 * (math.log(sigma_min ** 2 + 1) / epsilon_s - math.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    return beta_d, math.log(sigma_max ** 2 + 1) - 0.5 * beta_d


def vp_sigmas(num_steps: int, sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3,
              device: Device = None) -> torch.Tensor:
    """VP (Song et al. 2021): uniform in t from 1 to epsilon_s."""
    return vp_sigma(*vp_betas(sigma_min, sigma_max, epsilon_s))(1 + _ramp(num_steps, device) * (epsilon_s - 1))


def ve_sigmas(num_steps: int, sigma_min: float, sigma_max: float, device: Device = None) -> torch.Tensor:
    """VE (Song et al. 2021): geometric from sigma_max to sigma_min."""
    return (sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** _ramp(num_steps, device)).sqrt()


def iddpm_sigmas(num_steps: int, sigma_min: float, sigma_max: float, C_1: float = 0.001, C_2: float = 0.008,
                 M: int = 1000, device: Device = None) -> torch.Tensor:
    """iDDPM (Nichol & Dhariwal 2021): num_steps of the M cosine-schedule levels inside [sigma_min, sigma_max]."""
    j = torch.arange(M + 1, device=device)
    alpha_bar = (0.5 * math.pi * j / M / (C_2 + 1)).sin() ** 2  # float32, as EDM
    ratio = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1)
    u = torch.zeros(M + 1, dtype=torch.float64, device=device)
    for k in range(M, 0, -1):  # torch ops on 0-d tensors, as EDM, so the levels match EDM's bit for bit
        u[k - 1] = ((u[k] ** 2 + 1) / ratio[k - 1] - 1).sqrt()
    u = u[(u >= sigma_min) & (u <= sigma_max)]
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    return u[((len(u) - 1) / max(num_steps - 1, 1) * i).round().to(torch.int64)]


def default_range(discretization: str, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """EDM's (sigma_min, sigma_max) for each discretisation."""
    if discretization == "vp":
        sigma = vp_sigma(19.9, 0.1)
        return sigma(epsilon_s), sigma(1.0)
    return {"ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}[discretization]


@dataclass(frozen=True)
class Process:
    """x(t) = s(t) (x0 + sigma(t) n): the noise schedule sigma(t) (with its derivative and inverse) and
    the signal scaling s(t) (with its derivative) of EDM's generalized ODE (its Eq. 4)."""
    sigma: Callable
    sigma_deriv: Callable
    sigma_inv: Callable
    s: Callable
    s_deriv: Callable


def process(schedule: str = "linear", scaling: str = "none", beta_d: float = 19.9, beta_min: float = 0.1) -> Process:
    """The Process of a schedule (vp | ve | linear) and a scaling (vp | none); beta_* shape the VP schedule."""
    if schedule == "vp":
        sigma = vp_sigma(beta_d, beta_min)
        sigma_deriv = lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))
        sigma_inv = lambda s: ((beta_min ** 2 + 2 * beta_d * (s ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    elif schedule == "ve":
        sigma, sigma_deriv, sigma_inv = (lambda t: t.sqrt()), (lambda t: 0.5 / t.sqrt()), (lambda s: s ** 2)
    else:  # linear
        sigma, sigma_deriv, sigma_inv = (lambda t: t), (lambda t: 1), (lambda s: s)
    if scaling == "vp":
        s = lambda t: 1 / (1 + sigma(t) ** 2).sqrt()
        s_deriv = lambda t: -sigma(t) * sigma_deriv(t) * s(t) ** 3
    else:  # none
        s, s_deriv = (lambda t: 1), (lambda t: 0)
    return Process(sigma, sigma_deriv, sigma_inv, s, s_deriv)


LINEAR = process()
