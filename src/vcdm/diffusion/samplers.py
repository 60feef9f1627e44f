"""Samplers for a denoiser D(x; sigma), as plain functions with one contract (k-diffusion's):

    sampler(denoise, x, sigmas, *, randn_like=torch.randn_like, callback=None, **its own options) -> x0

``denoise(x, sigma) -> D`` takes x (B, N) float64 and a 0-d float64 sigma and returns float64;
``x`` is the noise at ``sigmas[0]``; ``sigmas`` (float64, decreasing) ends with 0 (vcdm.diffusion.
schedules makes them). Noise is drawn only through ``randn_like`` (pass
``StackedRandomGenerator.randn_like`` for per-seed results); ``callback`` receives a dict with the step
``i``, ``x``, ``sigma``, ``sigma_hat`` and ``denoised`` after every step. Properties of the model stay
in ``denoise``: a ``round_sigma`` attribute, when present, rounds the noise levels the samplers
create (``Model`` provides it, and takes care of the per-element noise multiplier).

EDM's samplers (``sample_heun`` with churn, ``sample_ablation``) draw their churn noise at every step,
even when the churn is zero, exactly as EDM does, so the random stream of a seed matches EDM's. The
state is kept in float64, as in EDM. ``sample()`` (vcdm.diffusion.sampling) puts it all together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from vcdm.diffusion.schedules import LINEAR, Process

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None] | None


def round_sigma(denoise: Denoise, sigma: torch.Tensor) -> torch.Tensor:
    """The noise level the model can represent closest to ``sigma`` (identity for most models)."""
    return getattr(denoise, "round_sigma", torch.as_tensor)(sigma)


def _report(callback: Callback, i: int, x: torch.Tensor, sigma: torch.Tensor, sigma_hat: torch.Tensor,
            denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


@dataclass(frozen=True)
class Churn:
    """EDM's stochasticity (Algorithm 2): at levels in [S_min, S_max], raise sigma by a factor
    1 + min(S_churn / num_steps, sqrt(2) - 1) with fresh noise scaled by S_noise."""
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0

    def gamma(self, sigma: torch.Tensor, num_steps: int) -> float:
        return min(self.S_churn / num_steps, math.sqrt(2) - 1) if self.S_min <= sigma <= self.S_max else 0


NO_CHURN = Churn()


def sample_heun(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, randn_like: Callable = torch.randn_like,
                callback: Callback = None, churn: Churn = NO_CHURN, second_order: bool = True) -> torch.Tensor:
    """EDM's stochastic sampler (Algorithm 2): churn, then a Heun step (Euler on the last step, or
    everywhere with ``second_order=False``)."""
    num_steps = len(sigmas) - 1
    for i in range(num_steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        t_hat = round_sigma(denoise, t_cur + churn.gamma(t_cur, num_steps) * t_cur)
        x_hat = x + (t_hat ** 2 - t_cur ** 2).sqrt() * churn.S_noise * randn_like(x)
        denoised = denoise(x_hat, t_hat)
        d_cur = (x_hat - denoised) / t_hat
        x = x_hat + (t_next - t_hat) * d_cur
        if second_order and i < num_steps - 1:
            d_prime = (x - denoise(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        _report(callback, i, x, t_cur, t_hat, denoised)
    return x


def sample_euler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """First-order version of ``sample_heun`` (same churn)."""
    return sample_heun(denoise, x, sigmas, second_order=False, **kwargs)


def sample_dpmpp_2m(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                    randn_like: Callable = torch.randn_like, callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep in lambda = -ln(sigma); first order on the first and
    last step. Deterministic: ``randn_like`` is not used."""
    old = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = (sigmas[i] / sigmas[i + 1]).log()
            d = denoised
            if old is not None:
                r = (sigmas[i - 1] / sigmas[i]).log() / h
                d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old
            x = sigmas[i + 1] / sigmas[i] * x - torch.expm1(-h) * d
        old = denoised
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
    return x


def sample_ablation(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                    randn_like: Callable = torch.randn_like, callback: Callback = None, process: Process = LINEAR,
                    solver: str = "heun", alpha: float = 1.0, churn: Churn = NO_CHURN) -> torch.Tensor:
    """EDM's generalized sampler (Algorithm 1 with churn): integrates the ODE in t for the noise schedule
    sigma(t) and the signal scaling s(t) of ``process``, with Euler or a second-order Runge-Kutta step
    (``alpha`` 1: Heun, 0.5: midpoint). ``sigmas`` (any discretisation) are converted to times."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver: expected euler|heun, got '{solver}'")
    p, num_steps = process, len(sigmas) - 1

    def slope(x, t, denoised):  # dx/dt of the probability-flow ODE (EDM's Eq. 4)
        return (p.sigma_deriv(t) / p.sigma(t) + p.s_deriv(t) / p.s(t)) * x - p.sigma_deriv(t) * p.s(t) / p.sigma(t) * denoised

    t_steps = torch.cat([p.sigma_inv(sigmas[:-1]), sigmas.new_zeros(1)])
    x = x * p.s(t_steps[0])
    for n in range(num_steps):
        t_cur, t_next = t_steps[n], t_steps[n + 1]
        t_hat = p.sigma_inv(round_sigma(denoise, p.sigma(t_cur) + churn.gamma(p.sigma(t_cur), num_steps) * p.sigma(t_cur)))
        x_hat = (p.s(t_hat) / p.s(t_cur) * x + (p.sigma(t_hat) ** 2 - p.sigma(t_cur) ** 2).clip(min=0).sqrt()
                 * p.s(t_hat) * churn.S_noise * randn_like(x))
        h = t_next - t_hat
        denoised = denoise(x_hat / p.s(t_hat), p.sigma(t_hat))
        d_cur = slope(x_hat, t_hat, denoised)
        if solver == "euler" or n == num_steps - 1:
            x = x_hat + h * d_cur
        else:
            x_prime, t_prime = x_hat + alpha * h * d_cur, t_hat + alpha * h
            d_prime = slope(x_prime, t_prime, denoise(x_prime / p.s(t_prime), p.sigma(t_prime)))
            x = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
        _report(callback, n, x, sigmas[n], p.sigma(t_hat), denoised)
    return x


def sample_consistency(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                       randn_like: Callable = torch.randn_like, callback: Callback = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) for a consistency-tuned denoiser
    (vcdm.diffusion.consistency): denoise, re-noise to the next level with fresh noise, denoise again;
    one evaluation per level before the final 0."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        x = denoised if sigmas[i + 1] == 0 else denoised + sigmas[i + 1] * randn_like(denoised)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
    return x
