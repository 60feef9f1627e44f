"""Few-step samplers with the samplers' contract ``(denoise, x, sigmas, *, randn_like, callback)``:
Euler ancestral, DPM-Solver++(2M) SDE and (3M) SDE, and UniPC — the ones practitioners reach for at
10-30 network evaluations.

All work in lambda = -ln(sigma) with the data prediction D (x = x0 + sigma n, so the ODE is
dx/dlambda = D - x and its exact solution over a step of length h weights D by exponential
integrals). The SDE variants (``eta`` > 0) shrink x by an extra e^(-eta h) and add fresh noise of
the matching variance, so a step maps the marginal at sigma_i onto the marginal at sigma_(i+1)
exactly when D is exact. The last step, to sigma = 0, returns D itself.
"""
from __future__ import annotations

from typing import Callable

import torch

from vcdm.diffusion.samplers import Callback, Denoise, _report


def _noise(x: torch.Tensor, randn_like: Callable, sigma_next: torch.Tensor, eta_h: torch.Tensor,
           S_noise: float) -> torch.Tensor:
    """Noise that restores the variance removed by the extra e^(-eta h) contraction."""
    return randn_like(x) * sigma_next * (-torch.expm1(-2 * eta_h)).sqrt() * S_noise


def sample_euler_ancestral(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                           randn_like: Callable = torch.randn_like, callback: Callback = None, eta: float = 1.0,
                           S_noise: float = 1.0) -> torch.Tensor:
    """Euler steps to sigma_down, then noise up to sigma_(i+1) (Ho et al.'s ancestral sampling in
    sigma form): sigma_up^2 = eta^2 sigma_(i+1)^2 (sigma_i^2 - sigma_(i+1)^2) / sigma_i^2."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_up = torch.minimum(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2).sqrt())
        sigma_down = (sigma_next ** 2 - sigma_up ** 2).sqrt()
        x = denoised + sigma_down / sigma * (x - denoised)
        if sigma_next > 0:
            x = x + randn_like(x) * sigma_up * S_noise
        _report(callback, i, x, sigma, sigma, denoised)
    return x


def sample_dpmpp_2m_sde(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                        randn_like: Callable = torch.randn_like, callback: Callback = None, eta: float = 1.0,
                        S_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022): the exponential integrator with D linear in lambda through
    the previous step's D (midpoint form), plus the SDE's contraction and noise."""
    old, h_old = None, None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = (sigmas[i] / sigmas[i + 1]).log()
            eta_h = eta * h
            weight = -torch.expm1(-h - eta_h)  # 1 - e^(-(1+eta) h)
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + weight * denoised
            if old is not None:
                x = x + 0.5 * weight * (h / h_old) * (denoised - old)
            if eta:
                x = x + _noise(x, randn_like, sigmas[i + 1], eta_h, S_noise)
            h_old = h
        old = denoised
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
    return x


def sample_dpmpp_3m_sde(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                        randn_like: Callable = torch.randn_like, callback: Callback = None, eta: float = 1.0,
                        S_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: D quadratic in lambda through the two previous steps' D."""
    ds: list[torch.Tensor] = []  # previous D, most recent first
    hs: list[torch.Tensor] = []  # previous step lengths in lambda, most recent first
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = (sigmas[i] / sigmas[i + 1]).log()
            h_eta = h * (eta + 1)
            x = (-h_eta).exp() * x - torch.expm1(-h_eta) * denoised
            phi_2 = torch.expm1(-h_eta) / h_eta + 1  # weights of h D' and h^2 D''/2 in the integral
            if len(ds) >= 2:
                r0, r1 = hs[0] / h, hs[1] / h
                d1_0, d1_1 = (denoised - ds[0]) / r0, (ds[0] - ds[1]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif ds:
                x = x + phi_2 * (denoised - ds[0]) / (hs[0] / h)
            if eta:
                x = x + _noise(x, randn_like, sigmas[i + 1], eta * h, S_noise)
            hs = [h, *hs[:1]]
        ds = [denoised, *ds[:1]]
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
    return x


def _unipc_coefficients(rks: list[torch.Tensor], hh: torch.Tensor, B_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """UniPC's order conditions (Zhao et al. 2023, Eq. 8 with B(h) = e^h - 1): R rho = b."""
    p = len(rks)
    rks_t = torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in rks])
    R = torch.stack([rks_t ** k for k in range(p)])
    b, h_phi_k, factorial = [], torch.expm1(hh) / hh - 1, 1
    for k in range(1, p + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return R, torch.stack(b)


def _unipc_step(x: torch.Tensor, sigma_s: torch.Tensor, sigma_t: torch.Tensor, ms: list[torch.Tensor],
                lams: list[torch.Tensor], order: int, m_t: torch.Tensor | None = None) -> torch.Tensor:
    """x at sigma_t from x at sigma_s and the last ``order`` model outputs ``ms`` (at ``lams``, the last at
    sigma_s): the predictor UniP, or with ``m_t`` = D at the predicted x_t, the corrector UniC."""
    lam_s, lam_t = lams[-1], -sigma_t.log()
    h = lam_t - lam_s
    hh, m0 = -h, ms[-1]
    B_h = torch.expm1(hh)
    rks = [(lams[-1 - k] - lam_s) / h for k in range(1, order)]
    D1s = [(ms[-1 - k] - m0) / r for k, r in zip(range(1, order), rks)]
    x_t = sigma_t / sigma_s * x - B_h * m0
    if m_t is None:  # predictor: order - 1 differences
        if order == 1:
            return x_t
        if order == 2:
            rhos = [torch.tensor(0.5, dtype=torch.float64)]
        else:
            R, b = _unipc_coefficients(rks + [torch.ones_like(h)], hh, B_h)
            rhos = list(torch.linalg.solve(R[:-1, :-1], b[:-1]))
    else:  # corrector: one more difference, to the D just computed at x_t
        rks, D1s = rks + [torch.ones_like(h)], D1s + [m_t - m0]
        rhos = [torch.tensor(0.5, dtype=torch.float64)] if order == 1 else list(torch.linalg.solve(*_unipc_coefficients(rks, hh, B_h)))
    return x_t - B_h * sum(rho * d for rho, d in zip(rhos, D1s))


def sample_unipc(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, randn_like: Callable = torch.randn_like,
                 callback: Callback = None, order: int = 2) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), variant bh2, data prediction: a multistep predictor of order ``order``
    and the corrector that reuses the next step's network evaluation (order + 1, no extra cost).
    Deterministic: ``randn_like`` is not used."""
    if order not in (1, 2, 3):
        raise ValueError(f"order: expected 1, 2 or 3, got {order}")
    ms: list[torch.Tensor] = []
    lams: list[torch.Tensor] = []
    x_prev, used = x, 0
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoise(x, sigmas[i])
        if i > 0 and sigmas[i + 1] > 0:  # correct x_i with D at the predicted x_i
            x = _unipc_step(x_prev, sigmas[i - 1], sigmas[i], ms, lams, used, m_t=denoised)
        ms, lams = (ms + [denoised])[-order:], (lams + [-sigmas[i].log()])[-order:]
        if sigmas[i + 1] == 0:
            x_prev, x = x, denoised
        else:
            used = min(order, len(ms), n - 1 - i)  # lower orders at the start and for the last steps
            x_prev, x = x, _unipc_step(x, sigmas[i], sigmas[i + 1], ms, lams, used)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
    return x


NAMES = {"euler_a": "Euler ancestral", "dpm2m_sde": "DPM-Solver++(2M) SDE", "dpm3m_sde": "DPM-Solver++(3M) SDE",
         "unipc": "UniPC (bh2)"}
