"""Knowledge distillation of the probability-flow ODE (Luhman & Luhman 2021; ``vcdm tune --method kd``): the
trained model's deterministic sampler, solved per training sample, becomes the target of a one-evaluation map.

Why, beside ECT/ECD (vcdm.diffusion.consistency): those learn the ODE's map through a chain of short gaps,
each only as good as the network's own estimate at the end of the gap. A network that predicts x0 directly
(the DALL-E 2 prior: no c_skip to anchor small gaps) stayed 20-40 FD behind its own 12-step sampler at 1-4
steps on the demo, whatever the schedule. Regressing onto the solved map has no such chain: the target is the
teacher's sample itself. The price is the solve, 2 ``teacher_steps`` - 1 frozen evaluations per sample and
step, which is small for the prior (a transformer on a 512-vector) and large for an image U-Net.

Each sample is noised as in training, x_t = x + t n, at t = the consistency sampler's first level
(sigma_max, EDM's 80) with probability ``top_fraction`` (what one-step sampling uses) and otherwise at ln t ~
N(P_mean, P_std^2) within the sampler's range (what its re-noised later steps use). The target is the
teacher's ODE solved from (x_t, t) to 0 by EDM's Heun sampler on Karras's levels from t to sigma_min; the error
is weighted by EDM's lambda(t) (1 for x0-predicted elements, as in training).
"""
from __future__ import annotations

import torch
from torch import nn

from vcdm.diffusion.consistency import heun_step
from vcdm.diffusion.loss import EDMLoss, _inner
from vcdm.diffusion.schedules import default_range, karras_sigmas

SAMPLER_RANGE = default_range("edm")  # the consistency sampler's levels lie in it (clipped to the network's)


def sampler_range(inner: nn.Module) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the consistency sampler's levels for a denoiser: EDM's range clipped to its own."""
    return max(SAMPLER_RANGE[0], float(inner.sigma_min)), min(SAMPLER_RANGE[1], float(inner.sigma_max))


def ode_solution(teacher: nn.Module, x_t: torch.Tensor, t: torch.Tensor, steps: int, sigma_min: float,
                 y: torch.Tensor | None, augment_labels: torch.Tensor | None, rho: float = 7.0) -> torch.Tensor:
    """The teacher's probability-flow ODE solved from x_t at t (B, 1) to 0: Heun steps over Karras's ``steps``
    levels from each sample's t to sigma_min, then the teacher's denoised output there (EDM's last, Euler,
    step to 0): 2 steps - 1 evaluations, EDM's sampler with num_steps = steps."""
    levels = karras_sigmas(steps, sigma_min, t.double(), rho, t.device).to(x_t.dtype)  # (B, steps)
    x = x_t
    for i in range(steps - 1):
        x = heun_step(teacher, x, levels[:, i:i + 1], levels[:, i + 1:i + 2], y, augment_labels)
    return teacher(x, levels[:, -1], y, augment_labels=augment_labels).to(x_t.dtype)


class DistillLoss(EDMLoss):
    """Squared error, weighted by EDM's lambda(t), between the tuned network at (x_t, t) and the frozen
    ``teacher``'s ODE solution from there (set by the training loop once the checkpoint's weights are loaded).
    Returns (B, latent_dim) like the diffusion losses."""

    def __init__(self, teacher_steps: int, P_mean: float = -1.1, P_std: float = 2.0, sigma_data: float = 0.5,
                 cond_drop: float = 0.0, top_fraction: float = 0.5, teacher: nn.Module | None = None):
        super().__init__(P_mean, P_std, sigma_data, cond_drop)
        if teacher_steps < 2:
            raise ValueError(f"teacher_steps: expected at least 2 (one Heun step), got {teacher_steps}")
        self.teacher_steps, self.top_fraction, self.teacher = teacher_steps, top_fraction, teacher

    def __call__(self, denoiser: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                 augment_labels: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("DistillLoss needs its teacher (the checkpoint's frozen network) before the first step")
        inner = _inner(denoiser)
        sigma_min, top = sampler_range(inner)
        t = self.sample_sigma(x.shape[0], x.device, generator).clamp(sigma_min, top)
        at_top = torch.rand([x.shape[0], 1], device=x.device, generator=generator) < self.top_fraction
        t = torch.where(at_top, torch.full_like(t, top), t)
        n = torch.randn(x.shape, device=x.device, generator=generator) * inner.noise_scale
        if y is not None and self.cond_drop > 0:
            keep = torch.rand([x.shape[0], 1], device=x.device, generator=generator) >= self.cond_drop
            y = y * keep.to(y.dtype)
        x_t = x + t * n
        with torch.no_grad():
            target = ode_solution(self.teacher, x_t, t, self.teacher_steps, sigma_min, y, augment_labels)
        weight = self.weight(t * inner.noise_scale).masked_fill(inner.x0_mask, 1.0)
        return weight * (denoiser(x_t, t.flatten(), y, augment_labels=augment_labels) - target) ** 2
