"""Every sampler for a denoiser D(x; sigma), as plain functions with one contract (k-diffusion's):

    sampler(denoise, x, sigmas, *, randn_like=torch.randn_like, callback=None, **its own options) -> x0

``denoise(x, sigma) -> D`` takes x (B, N) float64 and a 0-d float64 sigma and returns float64;
``x`` is the noise at ``sigmas[0]``; ``sigmas`` (float64, decreasing) ends with 0 (vcdm.diffusion.
schedules makes them). Noise is drawn only through ``randn_like`` (pass
``StackedRandomGenerator.randn_like`` for per-seed results); ``callback`` receives a dict with the step
``i``, ``x``, ``sigma``, ``sigma_hat`` and ``denoised`` after every step. Properties of the model stay
in ``denoise``: a ``round_sigma`` attribute, when present, rounds the noise levels the samplers
create (``GuidedModel`` provides it, and takes care of the per-element noise multiplier). The samplers
trust their caller: vcdm.diffusion.settings checks the options, ``sample()`` (vcdm.diffusion.sampling)
puts it all together.

EDM's samplers (``sample_heun`` with churn, ``sample_ablation``) draw their churn noise at every step,
even when the churn is zero, exactly as EDM does, so the random stream of a seed matches EDM's. The
state is kept in float64, as in EDM.

The few-step samplers practitioners reach for at 10-30 network evaluations (Euler ancestral,
DPM-Solver++(2M) and its SDE variants, (3M) SDE, UniPC) work in lambda = -ln(sigma) with the data
prediction D (x = x0 + sigma n, so the ODE is dx/dlambda = D - x and its exact solution over a step of
length h weights D by exponential integrals). The SDE variants (``eta`` > 0) shrink x by an extra
e^(-eta h) and add fresh noise of the matching variance, so a step maps the marginal at sigma_i onto the
marginal at sigma_(i+1) exactly when D is exact. Their last step, to sigma = 0, returns D itself.
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


def sample_heun(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, randn_like: Callable = torch.randn_like,
                callback: Callback = None, churn: Churn = Churn(), second_order: bool = True) -> torch.Tensor:
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
                    solver: str = "heun", alpha: float = 1.0, churn: Churn = Churn()) -> torch.Tensor:
    """EDM's generalized sampler (Algorithm 1 with churn): integrates the ODE in t for the noise schedule
    sigma(t) and the signal scaling s(t) of ``process``, with Euler or a second-order Runge-Kutta step
    (``alpha`` 1: Heun, 0.5: midpoint). ``sigmas`` (any discretisation) are converted to times."""
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

