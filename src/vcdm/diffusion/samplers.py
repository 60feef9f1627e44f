"""Samplers for a denoiser D(x; sigma), as plain functions in the style of k-diffusion.

A *model* here is ``model(x, sigma) -> D`` with x (B, N) float64, sigma a 0-d float64 tensor and D
float64; ``guided`` builds one from a Denoiser, the conditioning y and a guidance scale. The state is
kept in float64, as in EDM. Every sampler draws its noise through ``randn_like`` (pass
``StackedRandomGenerator.randn_like`` for per-seed results) and draws it at every step, even when the
churn is zero, exactly as EDM does, so the random stream of a seed matches EDM's.

``noise_scale`` is the denoiser's per-element noise multiplier (the original release's noise_mult):
element i is noised at sigma * noise_scale[i]. The probability-flow ODE is invariant to that constant
factor (dx/dsigma = (x - D) / sigma per element either way), so it only scales the injected noise:
the initial noise and the churn.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import tqdm

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("edm", "ablation", "dpm2m")
_KARRAS_OPTS = {"num_steps", "sigma_min", "sigma_max", "rho"}
_CHURN_OPTS = {"S_churn", "S_min", "S_max", "S_noise"}
OPTIONS: dict[str, set[str]] = {
    "edm": _KARRAS_OPTS | _CHURN_OPTS | {"solver"},
    "dpm2m": _KARRAS_OPTS,
    "ablation": _KARRAS_OPTS | _CHURN_OPTS | {"solver", "discretization", "schedule", "scaling",
                                              "epsilon_s", "C_1", "C_2", "M", "alpha"},
}


def _steps(n: int, progress: bool, desc: str):
    return tqdm.tqdm(range(n), desc=desc, unit="step", disable=not progress, leave=False)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """EDM's time steps (Eq. 5): sigma_max^(1/rho) interpolated linearly to sigma_min^(1/rho), ^rho. float64 (num_steps,)."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    return (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def guided(denoiser: Callable, y: torch.Tensor | None = None, guidance: float = 1.0) -> Model:
    """Wrap a denoiser as a model. guidance 1 is a single conditional evaluation; otherwise classifier-free
    guidance D = D(x | 0) + guidance * (D(x | y) - D(x | 0)), both halves in one batched call."""
    if guidance == 1:
        return lambda x, sigma: denoiser(x, sigma, y).to(torch.float64)
    if y is None:
        raise ValueError(f"--guidance {guidance}: classifier-free guidance needs conditioning, but this model has none")
    y_pair = torch.cat([y, torch.zeros_like(y)])

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond, uncond = denoiser(torch.cat([x, x]), sigma, y_pair).to(torch.float64).chunk(2)
        return uncond + guidance * (cond - uncond)
    return model


def sample_heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, randn_like: Callable = torch.randn_like,
                S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf, S_noise: float = 1.0,
                noise_scale: float | torch.Tensor = 1.0, round_sigma: Callable = torch.as_tensor,
                second_order: bool = True, progress: bool = False) -> torch.Tensor:
    """EDM's stochastic sampler (Algorithm 2): churn, then a Heun step (Euler on the last step, or
    everywhere with ``second_order=False``). ``x`` is noise at sigmas[0]; ``sigmas`` ends with 0."""
    num_steps = len(sigmas) - 1
    for i in _steps(num_steps, progress, "heun" if second_order else "euler"):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = round_sigma(t_cur + gamma * t_cur)
        x_hat = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * noise_scale * randn_like(x)
        d_cur = (x_hat - model(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d_cur
        if second_order and i < num_steps - 1:
            d_prime = (x - model(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x


def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """First-order version of ``sample_heun`` (same churn)."""
    return sample_heun(model, x, sigmas, second_order=False, **kwargs)


def sample_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep in lambda = -ln(sigma); first order on the first and last step."""
    old = None
    for i in _steps(len(sigmas) - 1, progress, "dpm++2m"):
        denoised = model(x, sigmas[i])
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
    return x


def sample_ablation(model: Model, latents: torch.Tensor, *, randn_like: Callable = torch.randn_like,
                    num_steps: int = 18, sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0,
                    solver: str = "heun", discretization: str = "edm", schedule: str = "linear", scaling: str = "none",
                    epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, alpha: float = 1.0,
                    S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf, S_noise: float = 1.0,
                    net_sigma_min: float = 0.0, net_sigma_max: float = math.inf, round_sigma: Callable = torch.as_tensor,
                    noise_scale: float | torch.Tensor = 1.0, progress: bool = False) -> torch.Tensor:
    """EDM's generalized sampler (Algorithm 1 with churn): any solver × time discretization × noise
    schedule sigma(t) × signal scaling s(t) of the paper's Table 1. ``latents`` are unit-variance noise."""
    for name, value, allowed in (("solver", solver, ("euler", "heun")), ("discretization", discretization, ("vp", "ve", "iddpm", "edm")),
                                 ("schedule", schedule, ("vp", "ve", "linear")), ("scaling", scaling, ("vp", "none"))):
        if value not in allowed:
            raise ValueError(f"--{name if name != 'discretization' else 'disc'}: expected one of {'|'.join(allowed)}, got '{value}'")

    def vp_sigma(beta_d, beta_min):
        return lambda t: (math.e ** (0.5 * beta_d * t ** 2 + beta_min * t) - 1) ** 0.5

    # Default range per discretization, clipped to what the network supports.
    if sigma_min is None:
        sigma_min = {"vp": vp_sigma(19.9, 0.1)(epsilon_s), "ve": 0.02, "iddpm": 0.002, "edm": 0.002}[discretization]
    if sigma_max is None:
        sigma_max = {"vp": vp_sigma(19.9, 0.1)(1.0), "ve": 100.0, "iddpm": 81.0, "edm": 80.0}[discretization]
    sigma_min, sigma_max = max(sigma_min, net_sigma_min), min(sigma_max, net_sigma_max)

    # VP constants that make sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max.
    beta_d = 2 * (math.log(sigma_min ** 2 + 1) / epsilon_s - math.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * beta_d

    device = latents.device
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    ramp = i / max(num_steps - 1, 1)
    if discretization == "vp":
        sigma_steps = vp_sigma(beta_d, beta_min)(1 + ramp * (epsilon_s - 1))
    elif discretization == "ve":
        sigma_steps = (sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** ramp).sqrt()
    elif discretization == "iddpm":
        j = torch.arange(M + 1, device=device)
        alpha_bar = (0.5 * math.pi * j / M / (C_2 + 1)).sin() ** 2  # float32, as EDM
        ratio = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1)
        u = torch.zeros(M + 1, dtype=torch.float64, device=device)
        for k in range(M, 0, -1):  # torch ops on 0-d tensors, as EDM, so the steps match EDM's bit for bit
            u[k - 1] = ((u[k] ** 2 + 1) / ratio[k - 1] - 1).sqrt()
        u = u[(u >= sigma_min) & (u <= sigma_max)]
        sigma_steps = u[((len(u) - 1) / max(num_steps - 1, 1) * i).round().to(torch.int64)]
    else:
        sigma_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho, device)

    if schedule == "vp":
        sigma = vp_sigma(beta_d, beta_min)
        sigma_deriv = lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))
        sigma_inv = lambda s: ((beta_min ** 2 + 2 * beta_d * (s ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    elif schedule == "ve":
        sigma, sigma_deriv, sigma_inv = (lambda t: t.sqrt()), (lambda t: 0.5 / t.sqrt()), (lambda s: s ** 2)
    else:
        sigma, sigma_deriv, sigma_inv = (lambda t: t), (lambda t: 1), (lambda s: s)
    if scaling == "vp":
        s = lambda t: 1 / (1 + sigma(t) ** 2).sqrt()
        s_deriv = lambda t: -sigma(t) * sigma_deriv(t) * s(t) ** 3
    else:
        s, s_deriv = (lambda t: 1), (lambda t: 0)

    def slope(x, t, denoised):  # dx/dt of the probability-flow ODE (Eq. 4)
        return (sigma_deriv(t) / sigma(t) + s_deriv(t) / s(t)) * x - sigma_deriv(t) * s(t) / sigma(t) * denoised

    t_steps = append_zero(sigma_inv(round_sigma(sigma_steps)))
    x = latents.to(torch.float64) * (sigma(t_steps[0]) * s(t_steps[0])) * noise_scale
    for n in _steps(num_steps, progress, f"{solver}/{discretization}/{schedule}/{scaling}"):
        t_cur, t_next = t_steps[n], t_steps[n + 1]
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= sigma(t_cur) <= S_max else 0
        t_hat = sigma_inv(round_sigma(sigma(t_cur) + gamma * sigma(t_cur)))
        x_hat = (s(t_hat) / s(t_cur) * x + (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt()
                 * s(t_hat) * S_noise * noise_scale * randn_like(x))
        h = t_next - t_hat
        d_cur = slope(x_hat, t_hat, model(x_hat / s(t_hat), sigma(t_hat)))
        if solver == "euler" or n == num_steps - 1:
            x = x_hat + h * d_cur
        else:
            x_prime, t_prime = x_hat + alpha * h * d_cur, t_hat + alpha * h
            d_prime = slope(x_prime, t_prime, model(x_prime / s(t_prime), sigma(t_prime)))
            x = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x


def sample(denoiser: Callable, latents: torch.Tensor, y: torch.Tensor | None = None, *, sampler: str = "edm",
           randn_like: Callable = torch.randn_like, guidance: float = 1.0, progress: bool = False,
           **opts: Any) -> torch.Tensor:
    """Generate x0 (float64 (B, N)) from unit-variance ``latents`` (B, N).

    ``sampler``: ``edm`` (Heun, or ``solver='euler'``, with churn; EDM's defaults: 18 steps, sigma 0.002..80,
    rho 7), ``ablation`` (EDM's generalized sampler: solver, discretization, schedule, scaling) or
    ``dpm2m`` (DPM-Solver++(2M) on Karras sigmas). Options set to None take their default. The sigma
    range is clipped to the denoiser's ``sigma_min``/``sigma_max``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler: expected one of {'|'.join(SAMPLERS)}, got '{sampler}'")
    opts = {k: v for k, v in opts.items() if v is not None}
    unknown = sorted(set(opts) - OPTIONS[sampler])
    if unknown:
        raise ValueError(f"sampler '{sampler}' does not take option(s) {', '.join(unknown)} "
                         f"(it takes {', '.join(sorted(OPTIONS[sampler]))})")
    num_steps = int(opts.pop("num_steps", 18))
    if num_steps < 1:
        raise ValueError(f"--steps: expected at least 1 step, got {num_steps}")
    model = guided(denoiser, y, guidance)
    scale = getattr(denoiser, "noise_scale", None)
    noise_scale = 1.0 if scale is None else scale.to(device=latents.device, dtype=torch.float64)
    round_sigma = getattr(denoiser, "round_sigma", torch.as_tensor)
    net_min, net_max = float(getattr(denoiser, "sigma_min", 0.0)), float(getattr(denoiser, "sigma_max", math.inf))
    if sampler == "ablation":
        return sample_ablation(model, latents, randn_like=randn_like, num_steps=num_steps, net_sigma_min=net_min,
                               net_sigma_max=net_max, round_sigma=round_sigma, noise_scale=noise_scale,
                               progress=progress, **opts)

    sigma_min = max(opts.pop("sigma_min", 0.002), net_min)
    sigma_max = min(opts.pop("sigma_max", 80.0), net_max)
    sigmas = append_zero(round_sigma(karras_sigmas(num_steps, sigma_min, sigma_max, opts.pop("rho", 7.0), latents.device)))
    x = latents.to(torch.float64) * sigmas[0] * noise_scale
    if sampler == "dpm2m":
        return sample_dpmpp_2m(model, x, sigmas, progress=progress)
    solver = opts.pop("solver", "heun")
    if solver not in ("heun", "euler"):
        raise ValueError(f"--solver: expected heun|euler, got '{solver}'")
    return sample_heun(model, x, sigmas, randn_like=randn_like, noise_scale=noise_scale, round_sigma=round_sigma,
                       second_order=solver == "heun", progress=progress, **opts)
