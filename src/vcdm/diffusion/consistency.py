"""Easy Consistency Tuning (ECT; Geng et al. 2024, "Consistency Models Made Easy"): a trained diffusion
model of either stage becomes a sampler of 1-4 network evaluations (`vcdm tune`).

Why ECT: it fine-tunes the denoiser as it is, with one extra forward pass per step and no other
network. The consistency function is the denoiser itself, f(x, t) = D(x; t) with EDM's (or EDM2's)
preconditioning, so tuning starts from the diffusion model. The loss pulls f(x_t, t) towards the
stopped-gradient f(x_r, r) on the same noise, x_t = x + t n and x_r = x + r n, for r < t given by

    r = max(0, t (1 - q^-(a+1) (1 + k sigmoid(-b t)))),   a = the tuning stage, 0 .. stages-1,

which starts diffusion-like (r = 0 at small t: the target is the data, the denoising loss) and shrinks
t - r by q at each stage (continuous-time consistency in the limit). The boundary f(x, 0) = x is
imposed where r = 0 by taking the data as the target (EDM's c_skip -> 1 only as sigma -> 0, and
sigma = 0 is never evaluated). Continuous-time consistency (sCM, Lu & Song 2024) needs Jacobian-vector
products through the network, which flash attention and the U-Nets' custom layers here do not provide;
ECT reaches comparable few-step quality at small compute from a pretrained EDM/EDM2 model.

Distillation (ECD, Song et al. 2023's consistency distillation on ECT's schedule; ``--method ecd``) takes
x_r from the checkpoint's own frozen network instead: one Heun step of its probability-flow ODE from x_t to r.
The same-noise point x + r n is right only on average over the data that could have made x_t; at the large
gaps a short tuning needs, its error pulls f towards the posterior mean (measured: the demo prior, which
predicts x0, collapsed onto few embeddings under ECT; benchmarks/fewstep.py). The teacher costs two more
forward passes per step.

Each sample's squared error is divided by its own stopped root, sqrt(||f_t - f_r||^2 + c^2) (ECT's adaptive
weighting: the gradient of the pseudo-Huber loss sqrt(||.||^2 + c^2) - c), and by the gap t - r (per element at
its own noise level, (t - r) times the element's noise scale), ECT's weighting. The gap keeps the per-sample
gradient of the size of df/dt as t - r shrinks: on the exact Gaussian model (tests/test_consistency.py) a
single stage at ECT's smallest gap (q 256) reaches the consistency function's parameter within 3% in 200 steps,
where EDM's lambda(t) = (t^2 + sigma_data^2) / (t sigma_data)^2 in its place stops 18% short. Its value per
sample is ||.||^2 / (sqrt(||.||^2 + c^2) (t - r)) and its gradient twice the pseudo-Huber one (Adam does not
see the factor). Both passes draw the same dropout masks. Defaults are ECT's for CIFAR-10: ln t ~ N(-1.1, 2.0^2),
q 2, k 8, b 1, 8 stages, c 0.
"""
from __future__ import annotations

import torch
from torch import nn

from vcdm.diffusion.loss import EDMLoss, _inner


def ect_gap(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """t - r of ECT's mapping at tuning stage ``stage`` (0-based): t q^-(stage+1) (1 + k sigmoid(-b t)), at most t.
    Computed directly, it stays positive where r rounds to t (a huge q)."""
    return t * (q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * t))).clamp(max=1)


def ect_r(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """ECT's mapping t -> r of tuning stage ``stage`` (0-based): r / t = 1 - q^-(stage+1) (1 + k sigmoid(-b t)),
    clipped at 0."""
    return t - ect_gap(t, stage, q, k, b)


class ECTLoss(EDMLoss):
    """The ECT loss of a tuning run of ``total_nimg`` images, in ``stages`` equal stages.

    ``set_nimg`` tells it where the run is (the training step calls it before each step, so a resumed
    run is at the same stage). Returns (B, latent_dim) like the diffusion losses. With a ``teacher`` (a
    frozen denoiser: the tuned checkpoint's own network) it is consistency distillation instead (ECD):
    x_r is one Heun step of the teacher's probability-flow ODE from x_t, not x + r n.
    """

    def __init__(self, total_nimg: int, P_mean: float = -1.1, P_std: float = 2.0, sigma_data: float = 0.5,
                 q: float = 2.0, k: float = 8.0, b: float = 1.0, stages: int = 8, c: float = 0.0,
                 cond_drop: float = 0.0, teacher: nn.Module | None = None):
        super().__init__(P_mean, P_std, sigma_data, cond_drop)
        self.total_nimg, self.q, self.k, self.b, self.stages, self.c = max(int(total_nimg), 1), q, k, b, stages, c
        self.stage, self.teacher = 0, teacher

    def set_nimg(self, nimg: int) -> None:
        self.stage = min(self.stages * nimg // self.total_nimg, self.stages - 1)

    def __call__(self, denoiser: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                 augment_labels: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        inner = _inner(denoiser)
        t = self.sample_sigma(x.shape[0], x.device, generator)  # (B, 1)
        gap = ect_gap(t, self.stage, self.q, self.k, self.b)
        r = t - gap
        n = torch.randn(x.shape, device=x.device, generator=generator) * inner.noise_scale
        if y is not None and self.cond_drop > 0:
            keep = torch.rand([x.shape[0], 1], device=x.device, generator=generator) >= self.cond_drop
            y = y * keep.to(y.dtype)
        target = self.target(denoiser, x, n, t, r, y, augment_labels)
        D = denoiser(x + t * n, t.flatten(), y, augment_labels=augment_labels)
        err = (D - target) ** 2
        norm = (err.detach().sum(dim=1, keepdim=True).float() + self.c ** 2).sqrt().clamp(min=1e-20)
        return err / (norm * gap * inner.noise_scale)

    def target(self, denoiser: nn.Module, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
               y: torch.Tensor | None, augment_labels: torch.Tensor | None) -> torch.Tensor:
        """sg(f(x_r, r)) where r > 0, the data where r = 0; dropout draws as the online pass will."""
        positive = r.flatten() > 0
        if not bool(positive.any()):
            return x
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            level = torch.where(positive[:, None], r, torch.ones_like(r))  # r = 0: not used
            x_r = x + r * n if self.teacher is None else heun_step(self.teacher, x + t * n, t, level, y, augment_labels)
            f_r = denoiser(x_r, level.flatten(), y, augment_labels=augment_labels)
        return torch.where(positive[:, None], f_r.to(x.dtype), x)


def heun_step(teacher: nn.Module, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, y: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
    """One Heun step of the teacher's ODE dx/dt = (x - D(x; t)) / t from t to r > 0 (B, 1). Per element the
    level is t times its noise scale, which cancels from the step."""
    d = (x_t - teacher(x_t, t.flatten(), y, augment_labels=augment_labels).to(x_t.dtype)) / t
    x_euler = x_t + (r - t) * d
    d_r = (x_euler - teacher(x_euler, r.flatten(), y, augment_labels=augment_labels).to(x_t.dtype)) / r
    return x_t + (r - t) * (d + d_r) / 2
