"""Distribution matching distillation (DMD2, Yin et al. 2024; ``vcdm tune --method dmd``): the few-step
sampler is trained so that its samples' distribution matches the one the trained model's scores define,
not the trained model's ODE.

Why, beside ECT/ECD/KD: those learn the map of the checkpoint's deterministic sampler, so they are at best
as good as that sampler; on the demo digits it is 1.8 FD behind the churned sampler of the original
release (benchmarks/results/fewstep-digits.md). DMD's gradient is the difference of two scores at the
sampler's noised output x_s = G(x) + s n: the teacher's (the data's, as the trained model knows it) and
that of a "fake" denoiser trained online, by the ordinary denoising loss, on the sampler's own outputs.
In x0 terms the sampler's output moves along D_fake(x_s; s) - D_real(x_s; s), normalised per sample by
mean |G(x) - D_real(x_s; s)| (Yin et al.'s weighting). The fixed point is the teacher's distribution
itself, which a churned SDE sampler approaches and the ODE does not quite.

The sampler trained is the consistency sampler of ``steps`` levels (vcdm.diffusion.sampling): its
input is pure noise at the top level or, for a later step, its own (gradient-free) output re-noised to
that step's level (DMD2's backward simulation), so training sees what sampling will. The fake denoiser
starts as the teacher and takes ``fake_updates`` Adam steps per sampler step on the sampler's detached
outputs (DMD2's two time-scale update rule), with DMD2's Adam betas (0, 0.999). It is part of the training
state: the training loop saves and restores it (`state_dict`) and DDP averages its gradients. The noise level of
x_s is Karras's (rho 7) level at a uniform fraction in [0.02, 0.98] of the sampler's range (DMD2's timesteps 20-980
of 1000). The returned per-element value 0.5 ||G(x) - sg(G(x) - grad)||^2 exists for its gradient, ``grad``; its
size says nothing about sample quality. Neither the regression loss of DMD (v1) nor DMD2's GAN term is used.

The sampler starts from a tuned checkpoint (`vcdm tune` of a tuned model: ECT's or KD's sampler), not from the
diffusion model, so the short run refines a working few-step sampler. On the demo the first few thousand images
make it worse before it improves (the fake denoiser has yet to learn the sampler's outputs).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from vcdm.diffusion.distillation import sampler_range
from vcdm.diffusion.loss import _inner
from vcdm.diffusion.schedules import karras_sigmas
from vcdm.diffusion.settings import CONSISTENCY_RHO

DMD_LEVELS = (0.02, 0.98)  # DMD2's range of the teacher's 1000 Karras levels for x_s, as fractions


class DMDLoss:
    """The sampler's DMD loss; (B, latent_dim) like the diffusion losses. ``fake_loss`` is the diffusion loss the fake
    denoiser trains with (the checkpoint's: EDM's, EDM2's with its uncertainty, VP's, VE's). ``teacher`` (the frozen
    diffusion model) is set by the training loop, which then calls ``make_fake`` (a resumed run then loads its
    ``state_dict``)."""

    def __init__(self, fake_loss: Callable, steps: int, fake_updates: int, fake_lr: float, *,
                 fake_betas: tuple[float, float] = (0.0, 0.999), cond_drop: float = 0.0, teacher: nn.Module | None = None):
        self.fake_loss, self.steps, self.fake_updates, self.fake_lr = fake_loss, steps, fake_updates, fake_lr
        self.fake_betas, self.cond_drop = fake_betas, cond_drop
        self.teacher, self.fake, self.fake_train, self.fake_opt = teacher, None, None, None

    def make_fake(self, training_view: Callable[[nn.Module], nn.Module] = lambda fake: fake) -> None:
        """The fake denoiser: a trainable copy of the teacher; ``training_view`` gives the module its steps run
        through (the training loop's: DDP over its network)."""
        self.fake = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.fake_train = training_view(self.fake)
        self.fake_opt = torch.optim.Adam(self.fake.net.parameters(), lr=self.fake_lr, betas=self.fake_betas)

    def state_dict(self) -> dict:
        return {"fake": self.fake.net.state_dict(), "fake_opt": self.fake_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.fake.net.load_state_dict(state["fake"])
        self.fake_opt.load_state_dict(state["fake_opt"])

    def levels(self, inner: nn.Module, device: torch.device) -> torch.Tensor:
        """The consistency sampler's levels for ``steps`` (its Karras levels without sigma_min)."""
        lo, hi = sampler_range(inner)
        return karras_sigmas(self.steps + 1, lo, hi, CONSISTENCY_RHO, device)[:-1].float()

    def sampler_input(self, denoiser: nn.Module, shape: torch.Size, y, augment_labels, generator) -> tuple:
        """(x, level) per sample: pure noise at the top level or the sampler's own output re-noised to a
        later level, each step equally often."""
        inner = _inner(denoiser)
        device = inner.noise_scale.device
        levels = self.levels(inner, device)
        step = torch.randint(self.steps, [shape[0], 1], device=device, generator=generator)
        x = torch.randn(shape, device=device, generator=generator) * inner.noise_scale * levels[0]
        noise = torch.randn((self.steps - 1, *shape), device=device, generator=generator) * inner.noise_scale
        level = levels[step]
        with torch.no_grad():
            for i in range(1, self.steps):
                if not bool((step >= i).any()):
                    break
                out = denoiser(x, levels[i - 1].expand(shape[0]), y, augment_labels=augment_labels).to(x.dtype)
                x = torch.where(step >= i, out + levels[i] * noise[i - 1], x)
        return x, level

    def __call__(self, denoiser: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                 augment_labels: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.fake is None:
            raise RuntimeError("DMDLoss needs its teacher and fake denoiser before the first step")
        inner = _inner(denoiser)
        if y is not None and self.cond_drop > 0:
            keep = torch.rand([x.shape[0], 1], device=x.device, generator=generator) >= self.cond_drop
            y = y * keep.to(y.dtype)
        x_in, level = self.sampler_input(denoiser, x.shape, y, augment_labels, generator)
        sample = denoiser(x_in, level.flatten(), y, augment_labels=augment_labels)
        self.train_fake(sample.detach().float(), y, augment_labels, generator)
        with torch.no_grad():
            u = torch.rand([x.shape[0], 1], device=x.device, generator=generator) * (DMD_LEVELS[1] - DMD_LEVELS[0])
            s = self.dmd_level(u + DMD_LEVELS[0], inner)
            x_s = sample.float() + s * inner.noise_scale * torch.randn(x.shape, device=x.device, generator=generator)
            real = self.teacher(x_s, s.flatten(), y, augment_labels=augment_labels).float()
            fake = self.fake(x_s, s.flatten(), y, augment_labels=augment_labels).float()
            norm = (sample.float() - real).abs().mean(dim=1, keepdim=True).clamp(min=1e-8)
            target = sample.float() - (fake - real) / norm
        return 0.5 * (sample.float() - target) ** 2

    @staticmethod
    def dmd_level(u: torch.Tensor, inner: nn.Module) -> torch.Tensor:
        """Karras's (rho 7) level at fraction ``u`` from the top of the sampler's range."""
        lo, hi = sampler_range(inner)
        return (hi ** (1 / 7) + u * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7

    def train_fake(self, sample: torch.Tensor, y, augment_labels, generator) -> None:
        """``fake_updates`` denoising steps of the fake denoiser on the sampler's outputs (its own noise levels
        and noise each time)."""
        with torch.enable_grad():
            for _ in range(self.fake_updates):
                self.fake_opt.zero_grad(set_to_none=True)
                loss = self.fake_loss(self.fake_train, sample, y, augment_labels, generator=generator)
                (loss.sum() / sample.shape[0]).backward()
                for p in self.fake.net.parameters():
                    if p.grad is not None:
                        torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
                self.fake_opt.step()
