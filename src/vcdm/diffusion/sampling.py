"""``sample()``: latents → samples for a Denoiser, by name of a sampler and its options.

The one place that turns a network into what the samplers see (``Model``: conditioning, guidance,
float64, the model's noise multiplier and sigma rounding), builds the noise levels (vcdm.diffusion.
schedules) and runs a sampler of vcdm.diffusion.samplers / solvers. Options are checked here, once,
in the samplers' own terms; command-line layers map them to flags.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import tqdm

from vcdm.diffusion import schedules, solvers
from vcdm.diffusion.guidance import Guidance, guided_denoise
from vcdm.diffusion.samplers import (Callback, Churn, sample_ablation, sample_consistency, sample_dpmpp_2m,
                                     sample_heun)


class Model:
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
           interval: tuple[float, float] | None = None) -> Model:
    return Model(denoiser, y, guidance, gnet=gnet, interval=interval)


@dataclass(frozen=True)
class Spec:
    """A sampler by name: its function, the options it takes, and how they are passed to it."""
    fn: Callable
    options: frozenset[str] = field(default_factory=frozenset)
    churn: bool = False


_SCHEDULE = {"num_steps", "sigma_min", "sigma_max", "rho"}
_CHURN = {"S_churn", "S_min", "S_max", "S_noise"}
_ABLATION = {"solver", "discretization", "schedule", "scaling", "epsilon_s", "C_1", "C_2", "M", "alpha"}
REGISTRY: dict[str, Spec] = {
    "edm": Spec(sample_heun, frozenset(_SCHEDULE | _CHURN | {"solver"}), churn=True),
    "ablation": Spec(sample_ablation, frozenset(_SCHEDULE | _CHURN | _ABLATION), churn=True),
    "dpm2m": Spec(sample_dpmpp_2m, frozenset(_SCHEDULE)),
    "euler_a": Spec(solvers.sample_euler_ancestral, frozenset(_SCHEDULE | {"eta"})),
    "dpm2m_sde": Spec(solvers.sample_dpmpp_2m_sde, frozenset(_SCHEDULE | {"eta"})),
    "dpm3m_sde": Spec(solvers.sample_dpmpp_3m_sde, frozenset(_SCHEDULE | {"eta"})),
    "unipc": Spec(solvers.sample_unipc, frozenset(_SCHEDULE | {"order"})),
    "consistency": Spec(sample_consistency, frozenset(_SCHEDULE)),
}
SAMPLERS = tuple(REGISTRY)
MAX_STEPS = 10_000  # sampling steps: the noise levels and the work grow with them (1e9 would allocate 8 GB)
CONSISTENCY_STEPS = (1, 4)  # the consistency sampler's range of steps (a tuned model's; vcdm tune)
CONSISTENCY_DEFAULT_STEPS = 2
CHURN_SAMPLERS = tuple(name for name, spec in REGISTRY.items() if spec.churn)  # take S_churn/S_min/S_max/S_noise


def evaluations(sampler: str, num_steps: int, solver: str = "heun") -> int:
    """Network evaluations per sample: Heun takes two per step but one on the last (to sigma = 0); the
    other samplers take one per step."""
    return 2 * num_steps - 1 if sampler in CHURN_SAMPLERS and solver == "heun" else num_steps


# Named sampler settings for every stage (`vcdm generate/sample --preset`). "fast", measured with
# benchmarks/solvers.py on digits models (FD by the demo's judge, paired by seed against the original
# release's setting: Heun, 40 steps, S_churn 50 = 79 evaluations): trained 16 kimg, UniPC with 12
# evaluations per stage is better (two-stage -13.6 +- 14.4, unconditional -40.0 +- 21.4; 5 seeds x 200
# images); trained 32 kimg, within the release's seed-to-seed noise (two-stage +1.0 +- 2.6 with 2 seeds x
# 1000 images, against a std of 1.4; unconditional -0.3 +- 15.7 with 5 x 200). UniPC at 24 and 8 scored
# the same as at 12; 12 keeps a margin above the point (about 7 evaluations) where Heun's error shows.
PRESETS: dict[str, dict[str, Any]] = {"fast": dict(sampler="unipc", num_steps=12)}


def noise_levels(model: Model, opts: dict[str, Any], device: torch.device,
                 net_range: tuple[float, float]) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """Pops the discretisation options from ``opts``; returns the rounded noise levels, ending with 0,
    and (sigma_min, sigma_max, epsilon_s). The range defaults to the discretisation's and is clipped to
    the network's ``net_range``."""
    disc = opts.pop("discretization", "edm")
    num_steps, eps = int(opts.pop("num_steps", 18)), opts.pop("epsilon_s", 1e-3)
    if not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f"num_steps: expected 1..{MAX_STEPS}, got {num_steps}")
    lo, hi = schedules.default_range(disc, eps)
    sigma_min = max(opts.pop("sigma_min", lo), net_range[0])
    sigma_max = min(opts.pop("sigma_max", hi), net_range[1])
    rho = opts.pop("rho", 7.0)
    if disc == "vp":
        sigmas = schedules.vp_sigmas(num_steps, sigma_min, sigma_max, eps, device)
    elif disc == "ve":
        sigmas = schedules.ve_sigmas(num_steps, sigma_min, sigma_max, device)
    elif disc == "iddpm":
        iddpm = {k: opts.pop(k) for k in ("C_1", "C_2", "M") if k in opts}
        sigmas = schedules.iddpm_sigmas(num_steps, sigma_min, sigma_max, device=device, **iddpm)
    else:
        sigmas = schedules.karras_sigmas(num_steps, sigma_min, sigma_max, rho, device)
    for k in ("C_1", "C_2", "M"):
        opts.pop(k, None)
    return schedules.append_zero(model.round_sigma(sigmas)), (sigma_min, sigma_max, eps)


def consistency_levels(model: Model, opts: dict[str, Any], device: torch.device,
                       net_range: tuple[float, float]) -> torch.Tensor:
    """The consistency sampler's levels for ``num_steps`` n (1..4, default 2): Karras's n + 1 levels
    without the last, sigma_min, where a step would change nothing, then 0 (n = 1: [sigma_max, 0];
    n = 2 with EDM's range and rho 7: [80, 2.52, 0])."""
    num_steps = int(opts.pop("num_steps", CONSISTENCY_DEFAULT_STEPS))
    lo, hi = CONSISTENCY_STEPS
    if not lo <= num_steps <= hi:
        raise ValueError(f"num_steps: the consistency sampler takes {lo}..{hi} steps, got {num_steps}")
    sigmas, _ = noise_levels(model, {**opts, "num_steps": num_steps + 1}, device, net_range)
    for k in _SCHEDULE:
        opts.pop(k, None)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def progress_bar(num_steps: int, desc: str) -> Callback:
    bar = tqdm.tqdm(total=num_steps, desc=desc, unit="step", leave=False)

    def update(info: dict[str, Any]) -> None:
        bar.update(1)
        if info["i"] == num_steps - 1:
            bar.close()
    return update


def sample(denoiser: Callable, latents: torch.Tensor, y: torch.Tensor | None = None, *, sampler: str = "edm",
           randn_like: Callable = torch.randn_like, guidance: float = 1.0, gnet: Callable | None = None,
           guidance_interval: tuple[float, float] | None = None, callback: Callback = None,
           progress: bool = False, **opts: Any) -> torch.Tensor:
    """Generate x0 (float64 (B, N)) from unit-variance ``latents`` (B, N).

    ``sampler``: one of SAMPLERS — ``edm`` (Heun, or ``solver='euler'``, with churn; EDM's defaults: 18
    steps, sigma 0.002..80, rho 7), ``ablation`` (EDM's generalized sampler: solver, discretization,
    schedule, scaling), ``dpm2m`` (DPM-Solver++(2M)), ``euler_a``, ``dpm2m_sde``, ``dpm3m_sde``, ``unipc``
    (Karras levels), ``consistency`` (a consistency-tuned model's multistep sampler, 1-4 steps, default 2;
    vcdm.diffusion.consistency). Options set to None take their default; the sigma range is clipped to the
    denoiser's ``sigma_min``/``sigma_max``. ``guidance``, ``gnet``, ``guidance_interval``: see ``Model``.
    """
    if sampler not in REGISTRY:
        raise ValueError(f"sampler: expected one of {'|'.join(SAMPLERS)}, got '{sampler}'")
    spec = REGISTRY[sampler]
    opts = {k: v for k, v in opts.items() if v is not None}
    unknown = sorted(set(opts) - spec.options)
    if unknown:
        raise ValueError(f"sampler '{sampler}' does not take option(s) {', '.join(unknown)} "
                         f"(it takes {', '.join(sorted(spec.options))})")
    numbers = {**opts, "guidance": guidance}
    bad = [k for k, v in numbers.items() if isinstance(v, (int, float)) and not math.isfinite(v)
           and not (k == "S_max" and v == math.inf)]  # S_max inf: churn at every level (EDM's default)
    if bad:  # a NaN or inf option would run the whole sampler and return NaN samples
        raise ValueError(f"{bad[0]}: expected a finite number, got {numbers[bad[0]]}")
    model = Model(denoiser, y, guidance, gnet=gnet, interval=guidance_interval)
    if spec.churn:
        opts["churn"] = Churn(**{k: opts.pop(k) for k in sorted(_CHURN) if k in opts})
    if sampler == "edm":
        solver = opts.pop("solver", "heun")
        if solver not in ("heun", "euler"):
            raise ValueError(f"solver: expected heun|euler, got '{solver}'")
        opts["second_order"] = solver == "heun"
    net_range = float(getattr(denoiser, "sigma_min", 0.0)), float(getattr(denoiser, "sigma_max", math.inf))
    if sampler == "consistency":
        sigmas = consistency_levels(model, opts, latents.device, net_range)
    else:
        sigmas, (sigma_min, sigma_max, eps) = noise_levels(model, opts, latents.device, net_range)
    if sampler == "ablation":
        opts["process"] = schedules.process(opts.pop("schedule", "linear"), opts.pop("scaling", "none"),
                                            *schedules.vp_betas(sigma_min, sigma_max, eps))
    if progress:
        callback = _chain(callback, progress_bar(len(sigmas) - 1, sampler))
    x = latents.to(torch.float64) * sigmas[0]
    return model.to_data(spec.fn(model, x, sigmas, randn_like=randn_like, callback=callback, **opts))


def _chain(first: Callback, second: Callback) -> Callback:
    if first is None:
        return second
    return lambda info: (first(info), second(info))
