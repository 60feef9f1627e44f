"""``sample()``: latents → samples for a Denoiser, by a sampler's name and its settings.

The one place that turns a network into what the samplers see (``GuidedModel``: conditioning, guidance,
float64, the model's noise multiplier and sigma rounding), builds the noise levels (vcdm.diffusion.
schedules) and runs a sampler of vcdm.diffusion.samplers. The settings are a ``SamplerOptions``
(vcdm.diffusion.settings), which checks them once; everything here trusts it.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import tqdm

from vcdm.diffusion import samplers, schedules
from vcdm.diffusion.guidance import Guidance, guided_denoise
from vcdm.diffusion.samplers import Callback, Churn
from vcdm.diffusion.settings import TAKES, SamplerOptions


class GuidedModel:
    """A denoiser as the samplers see it: ``model(x, sigma) -> D`` in float64, given the conditioning ``y``.

    ``guidance`` != 1 guides it (vcdm.diffusion.guidance): D = D_g + guidance * (D - D_g), where the guide
    D_g is ``gnet`` or, without one, the denoiser given the null condition (classifier-free guidance);
    ``interval`` (lo, hi] limits guidance to those noise levels. A denoiser's ``noise_scale`` (the original
    release's per-element noise multiplier: element i is noised at sigma * noise_scale[i]) is absorbed by a
    change of variables: the samplers integrate u = x / noise_scale with unit noise, which is exact because
    every sampler is linear in (x, D, noise). ``round_sigma`` is the denoiser's own, when it has one.
    """

    def __init__(self, denoiser: Callable, y: torch.Tensor | None = None, guidance: float = 1.0, *,
                 gnet: Callable | None = None, interval: tuple[float, float] | None = None):
        self.guidance = Guidance(guidance, gnet, interval)
        if self.guidance.classifier_free and y is None:
            raise ValueError(f"guidance {guidance}: classifier-free guidance needs conditioning, but y is None")
        self.denoiser, self.y = denoiser, y
        self.round_sigma = getattr(denoiser, "round_sigma", torch.as_tensor)
        scale = getattr(denoiser, "noise_scale", None)
        self.noise_scale = None if scale is None or bool((scale == 1).all()) else scale.to(torch.float64)

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return guided_denoise(self.denoiser, x, sigma, self.y, self.guidance)

    def __call__(self, u: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.noise_scale is None:
            return self._denoise(u, sigma)
        scale = self.noise_scale.to(u.device)
        return self._denoise(u * scale, sigma) / scale

    def to_data(self, u: torch.Tensor) -> torch.Tensor:
        """Sampler coordinates → data coordinates."""
        return u if self.noise_scale is None else u * self.noise_scale.to(u.device)


def guided(denoiser: Callable, y: torch.Tensor | None = None, guidance: float = 1.0, *, gnet: Callable | None = None,
           interval: tuple[float, float] | None = None) -> GuidedModel:
    return GuidedModel(denoiser, y, guidance, gnet=gnet, interval=interval)


FUNCTIONS: dict[str, Callable] = {  # sampler name (vcdm.diffusion.settings.SAMPLERS) → function
    "edm": samplers.sample_heun,
    "ablation": samplers.sample_ablation,
    "dpm2m": samplers.sample_dpmpp_2m,
    "euler_a": samplers.sample_euler_ancestral,
    "dpm2m_sde": samplers.sample_dpmpp_2m_sde,
    "dpm3m_sde": samplers.sample_dpmpp_3m_sde,
    "unipc": samplers.sample_unipc,
    "consistency": samplers.sample_consistency,
}


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def noise_levels(model: GuidedModel, opts: SamplerOptions, device: torch.device, net_range: tuple[float, float],
                 num_steps: int | None = None) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """The rounded noise levels of ``opts``' discretisation, ending with 0, and (sigma_min, sigma_max,
    epsilon_s). The range defaults to the discretisation's and is clipped to the network's ``net_range``."""
    disc, eps = _or(opts.discretization, "edm"), _or(opts.epsilon_s, 1e-3)
    num_steps = _or(num_steps, opts.num_steps)
    lo, hi = schedules.default_range(disc, eps)
    sigma_min = max(_or(opts.sigma_min, lo), net_range[0])
    sigma_max = min(_or(opts.sigma_max, hi), net_range[1])
    if disc == "vp":
        sigmas = schedules.vp_sigmas(num_steps, sigma_min, sigma_max, eps, device)
    elif disc == "ve":
        sigmas = schedules.ve_sigmas(num_steps, sigma_min, sigma_max, device)
    elif disc == "iddpm":
        iddpm = {k: getattr(opts, k) for k in ("C_1", "C_2", "M") if getattr(opts, k) is not None}
        sigmas = schedules.iddpm_sigmas(num_steps, sigma_min, sigma_max, device=device, **iddpm)
    else:
        sigmas = schedules.karras_sigmas(num_steps, sigma_min, sigma_max, opts.karras_rho, device)
    return schedules.append_zero(model.round_sigma(sigmas)), (sigma_min, sigma_max, eps)


def consistency_levels(model: GuidedModel, opts: SamplerOptions, device: torch.device,
                       net_range: tuple[float, float]) -> torch.Tensor:
    """The consistency sampler's levels for ``num_steps`` n (1..4): Karras's n + 1 levels without the
    last, sigma_min, where a step would change nothing, then 0, at ``opts.karras_rho`` (n = 1: [sigma_max, 0];
    n = 2 with EDM's range: [80, 0.80, 0]; n = 4: [80, 9.1, 0.80, 0.050, 0]); or ``opts.levels``, then 0."""
    if opts.levels is not None:
        return schedules.append_zero(model.round_sigma(torch.tensor(opts.levels, dtype=torch.float64, device=device)))
    sigmas, _ = noise_levels(model, opts, device, net_range, opts.num_steps + 1)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def sampler_arguments(opts: SamplerOptions, levels: tuple[float, float, float]) -> dict[str, Any]:
    """The keyword arguments of the sampler function of ``opts``, beyond (model, x, sigmas)."""
    name = opts.resolved_sampler
    args: dict[str, Any] = {}
    if "S_churn" in TAKES[name]:
        args["churn"] = Churn(opts.S_churn, opts.S_min, opts.S_max, opts.S_noise)
    if name == "edm":
        args["second_order"] = _or(opts.solver, "heun") == "heun"
    elif name == "ablation":
        sigma_min, sigma_max, eps = levels
        args.update(solver=_or(opts.solver, "heun"), alpha=_or(opts.alpha, 1.0),
                    process=schedules.process(_or(opts.schedule, "linear"), _or(opts.scaling, "none"),
                                              *schedules.vp_betas(sigma_min, sigma_max, eps)))
    elif "eta" in TAKES[name] and opts.eta is not None:
        args["eta"] = opts.eta
    elif name == "unipc" and opts.order is not None:
        args["order"] = opts.order
    return args


def progress_bar(num_steps: int, desc: str) -> Callback:
    bar = tqdm.tqdm(total=num_steps, desc=desc, unit="step", leave=False)

    def update(info: dict[str, Any]) -> None:
        bar.update(1)
        if info["i"] == num_steps - 1:
            bar.close()
    return update


def sample(denoiser: Callable, latents: torch.Tensor, y: torch.Tensor | None = None, *,
           options: SamplerOptions | None = None, sampler: str | None = "edm", randn_like: Callable = torch.randn_like,
           gnet: Callable | None = None, callback: Callback = None, progress: bool = False,
           **settings: Any) -> torch.Tensor:
    """Generate x0 (float64 (B, N)) from unit-variance ``latents`` (B, N).

    The settings are ``options``, or ``sampler`` and ``settings`` (SamplerOptions' fields; None takes the
    default) — ``edm`` (Heun, or ``solver='euler'``, with churn; EDM's defaults: 18 steps, sigma
    0.002..80, rho 7), ``ablation`` (EDM's generalized sampler: solver, discretization, schedule,
    scaling), ``dpm2m`` (DPM-Solver++(2M)), ``euler_a``, ``dpm2m_sde``, ``dpm3m_sde``, ``unipc`` (Karras
    levels), ``consistency`` (a consistency-tuned model's multistep sampler, 1-4 steps, default 2;
    vcdm.diffusion.consistency). The sigma range is clipped to the denoiser's ``sigma_min``/``sigma_max``.
    ``gnet``: the guiding network, evaluated as the denoiser is (see ``GuidedModel``).
    """
    if options is not None and settings:
        raise TypeError(f"sample: pass the settings as options or as keywords, not both (got {sorted(settings)})")
    if options is None:
        options = SamplerOptions(sampler=sampler, **{k: v for k, v in settings.items() if v is not None})
    model = GuidedModel(denoiser, y, options.guidance, gnet=gnet, interval=options.guidance_interval)
    net_range = float(getattr(denoiser, "sigma_min", 0.0)), float(getattr(denoiser, "sigma_max", math.inf))
    if options.resolved_sampler == "consistency":
        sigmas, levels = consistency_levels(model, options, latents.device, net_range), (0.0, 0.0, 0.0)
    else:
        sigmas, levels = noise_levels(model, options, latents.device, net_range)
    if progress:
        callback = _chain(callback, progress_bar(len(sigmas) - 1, options.resolved_sampler))
    x = latents.to(torch.float64) * sigmas[0]
    fn = FUNCTIONS[options.resolved_sampler]
    return model.to_data(fn(model, x, sigmas, randn_like=randn_like, callback=callback,
                            **sampler_arguments(options, levels)))


def _chain(first: Callback, second: Callback) -> Callback:
    if first is None:
        return second
    return lambda info: (first(info), second(info))
