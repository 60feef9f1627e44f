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

The sampler trained is the consistency sampler of ``steps`` levels (``sampler_levels``, else Karras's;
vcdm.diffusion.sampling): its input is pure noise at the top level or, for a later step,
its own (gradient-free) output re-noised to that step's level (DMD2's backward simulation), so training
sees what sampling will. The fake denoiser starts as the teacher and takes ``fake_updates`` Adam steps per
sampler step on the sampler's detached outputs (DMD2's two time-scale update rule), with DMD2's Adam betas
(0, 0.999). It is part of the training
state: the training loop saves and restores it (`state_dict`) and DDP averages its gradients. The noise level of
x_s is Karras's (rho 7) level at a uniform fraction in [0.02, 0.98] of the sampler's range (DMD2's timesteps 20-980
of 1000). The returned per-element value 0.5 ||G(x) - sg(G(x) - grad)||^2 exists for its gradient, ``grad``; its
size says nothing about sample quality. DMD (v1)'s regression loss is not used.

DMD2's GAN term (``gan_weight`` > 0): a discriminator head reads the fake denoiser's bottleneck features
(vcdm.nets.bottleneck) of real data and of the sampler's outputs, both noised to a DMD level. It trains with the
fake denoiser, weighted GAN_CRITIC_WEIGHT beside its diffusion loss (its gradient reaches the fake's layers up to the
bottleneck, as in DMD2), and the sampler adds ``gan_weight`` x the non-saturating generator loss at its own noised
outputs. Real data is what lets the sampler go past the teacher's distribution, which DMD alone can only match. Both
weights are per sample, beside per-element losses that are summed: DMD2's weights beside its means over elements.

Guidance (``guidance`` != 1): the teacher's denoiser is guided, D_g + w (D - D_g) (vcdm.diffusion.guidance), away from
a weaker model of the same data (``guide``: autoguidance, Karras et al. 2024) or from its own null condition
(classifier-free), and the sampler learns the guided model's distribution, as DMD2 distils guided text-to-image
teachers. What a guided sampler does at every step is then built into the few-step sampler.

The sampler starts from a tuned checkpoint (`vcdm tune` of a tuned model: ECT's or KD's sampler), not from the
diffusion model, so the short run refines a working few-step sampler. On the demo the first few thousand images
make it worse before it improves (the fake denoiser has yet to learn the sampler's outputs).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vcdm.diffusion.distillation import sampler_range
from vcdm.diffusion.guidance import Guidance, guided_denoise
from vcdm.diffusion.loss import _inner
from vcdm.diffusion.schedules import karras_sigmas
from vcdm.diffusion.settings import CONSISTENCY_RHO, DMD_REFINE_LEVEL
from vcdm.nets import bottleneck

DMD_LEVELS = (0.02, 0.98)  # DMD2's range of the teacher's 1000 Karras levels for x_s, as fractions
GAN_CRITIC_WEIGHT = 1e-2  # DMD2's weight of the discriminator's loss beside the fake denoiser's diffusion loss


class Discriminator(nn.Module):
    """One logit per sample from bottleneck features: (B, C, H, W) of a U-Net (a 3x3 convolution, then the mean
    over positions) or (B, C) of a prior transformer (a linear layer)."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        channels = features.shape[1]
        self.mix = nn.Conv2d(channels, channels, 3, padding=1) if features.ndim == 4 else nn.Linear(channels, channels)
        self.out = nn.Linear(channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.mix(features.float()))
        return self.out(h.mean(dim=(2, 3)) if h.ndim == 4 else h)


class Critic(nn.Module):
    """The fake denoiser and, for the GAN term, the discriminator on its bottleneck: one module, so that each of its
    updates is one forward over all its parameters (DDP wraps it whole)."""

    def __init__(self, fake: nn.Module, gan: bool):
        super().__init__()
        self.fake, self._capture, self._features = fake, False, None
        self.head = None
        if gan:
            bottleneck(fake.net).register_forward_hook(self._keep)
            with torch.no_grad():
                x = torch.zeros(1, fake.structure.latent_dim, device=fake.noise_scale.device)
                self.head = Discriminator(self.features(x, torch.ones(1, device=x.device), None, None))

    def _keep(self, module: nn.Module, inputs, output) -> None:
        if self._capture:
            self._features = output[0] if isinstance(output, tuple) else output

    def features(self, x: torch.Tensor, sigma: torch.Tensor, y, augment_labels) -> torch.Tensor:
        self._capture = True
        try:
            self.fake(x, sigma, y, augment_labels=augment_labels)
        finally:
            self._capture = False
        features, self._features = self._features, None
        return features

    def logits(self, x: torch.Tensor, sigma: torch.Tensor, y, augment_labels) -> torch.Tensor:
        return self.head(self.features(x, sigma, y, augment_labels))

    def forward(self, fake_loss: Callable, sample: torch.Tensor, real: torch.Tensor, sigma: torch.Tensor,
                y, augment_labels, generator) -> torch.Tensor:
        """The fake denoiser's diffusion loss on the sampler's outputs (B, N), plus, with a head, the discriminator's
        loss (B, 1) on real data and those outputs noised to ``sigma`` (B, 1), weighted GAN_CRITIC_WEIGHT."""
        loss = fake_loss(self.fake, sample, y, augment_labels, generator=generator)
        if self.head is None:
            return loss
        both = torch.cat([real, sample])
        twice = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731
        noised = both + twice(sigma) * self.fake.noise_scale * torch.randn(both.shape, device=both.device,
                                                                           generator=generator)
        real_logit, fake_logit = self.logits(noised, twice(sigma).flatten(), twice(y), twice(augment_labels)).chunk(2)
        return loss + GAN_CRITIC_WEIGHT * (F.softplus(-real_logit) + F.softplus(fake_logit))


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters (all trainable: a Critic's) take no gradient inside (the sampler's GAN loss reaches the
    sampler only)."""
    module.requires_grad_(False)
    try:
        yield
    finally:
        module.requires_grad_(True)


def sampler_levels(steps: int, inner: nn.Module, given: Sequence[float] | None = None) -> tuple[float, ...] | None:
    """The levels DMD trains a sampler of ``steps`` at, where they are not Karras's (None): those ``given``
    (--sampler-levels); else, for a network that predicts x0 (the prior), 2 steps at its top level and
    DMD_REFINE_LEVEL x sigma_data, the second step mending in the small what the first gets wrong
    (vcdm.diffusion.settings). Training and the sampler a tuned checkpoint records both ask here."""
    if given:
        return tuple(given)
    if steps != 2 or not bool(inner.x0_mask.any()):
        return None
    return sampler_range(inner)[1], DMD_REFINE_LEVEL * float(inner.sigma_data)


class DMDLoss:
    """The sampler's DMD loss; (B, latent_dim) like the diffusion losses. ``fake_loss`` is the diffusion loss the fake
    denoiser trains with (the checkpoint's: EDM's, EDM2's with its uncertainty, VP's, VE's). ``teacher`` (the frozen
    diffusion model) is set by the training loop, which then calls ``make_fake`` (a resumed run then loads its
    ``state_dict``). ``gan_weight`` > 0 adds DMD2's GAN term (the module's docstring); its discriminator head, new and
    random, learns at ``gan_lr``. ``guidance`` != 1 guides the teacher (vcdm.diffusion.guidance): away from ``guide``
    (autoguidance by a weaker model of the same data, set by the training loop as the teacher is) or, without one, from
    its own null condition (classifier-free); the sampler then matches the guided model's distribution, as DMD2's
    text-to-image runs match a guided teacher's. ``levels``: the sampler's noise levels, one per step (None:
    ``sampler_levels``' default, else Karras's)."""

    def __init__(self, fake_loss: Callable, steps: int, fake_updates: int, fake_lr: float, *, gan_weight: float = 0.0,
                 gan_lr: float = 0.0, fake_betas: tuple[float, float] = (0.0, 0.999), cond_drop: float = 0.0,
                 teacher: nn.Module | None = None, guidance: float = 1.0, guide: Callable | None = None,
                 levels: Sequence[float] | None = None):
        self.fake_loss, self.steps, self.fake_updates, self.fake_lr = fake_loss, steps, fake_updates, fake_lr
        self.given_levels = None if levels is None else tuple(levels)
        if self.given_levels is not None and len(self.given_levels) != steps:
            raise ValueError(f"levels: {len(self.given_levels)} noise levels for {steps} steps")
        if gan_weight > 0 and not gan_lr > 0:
            raise ValueError(f"gan_lr: the GAN term's discriminator needs a positive learning rate, got {gan_lr}")
        self.gan_weight, self.gan_lr, self.fake_betas, self.cond_drop = gan_weight, gan_lr, fake_betas, cond_drop
        self.teacher, self.guidance, self.guide = teacher, guidance, guide
        self.critic, self.critic_train, self.fake_opt = None, None, None

    @property
    def fake(self) -> nn.Module | None:
        return None if self.critic is None else self.critic.fake

    def make_fake(self, training_view: Callable[[nn.Module], nn.Module] = lambda critic: critic) -> None:
        """The fake denoiser, a trainable copy of the teacher, in its Critic (with the discriminator when there is a GAN
        term); ``training_view`` gives the module its updates run through (the training loop's: DDP over it)."""
        self.critic = Critic(copy.deepcopy(self.teacher).train().requires_grad_(True), gan=self.gan_weight > 0)
        self.critic_train = training_view(self.critic)
        groups = [{"params": list(self.fake.parameters())}]
        if self.critic.head is not None:  # a new layer: its own lr
            groups.append({"params": list(self.critic.head.parameters()), "lr": self.gan_lr})
        self.fake_opt = torch.optim.Adam(groups, lr=self.fake_lr, betas=self.fake_betas)

    def state_dict(self) -> dict:
        state = {"fake": self.fake.net.state_dict(), "fake_opt": self.fake_opt.state_dict()}
        return state if self.critic.head is None else dict(state, discriminator=self.critic.head.state_dict())

    def load_state_dict(self, state: dict) -> None:
        if ("discriminator" in state) != (self.critic.head is not None):
            raise ValueError("its fake denoiser was trained " + ("with a GAN term: resume with --gan-weight > 0"
                                                                   if "discriminator" in state else
                                                                   "without a GAN term: resume with --gan-weight 0"))
        self.fake.net.load_state_dict(state["fake"])
        if self.critic.head is not None:
            self.critic.head.load_state_dict(state["discriminator"])
        self.fake_opt.load_state_dict(state["fake_opt"])

    def levels(self, inner: nn.Module, device: torch.device) -> torch.Tensor:
        """The consistency sampler's levels: ``sampler_levels``', else Karras's for ``steps`` without sigma_min."""
        levels = sampler_levels(self.steps, inner, self.given_levels)
        if levels is not None:
            return torch.tensor(levels, dtype=torch.float32, device=device)
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
        self.train_fake(sample.detach().float(), x.float(), y, augment_labels, generator)
        s = self.random_level(x.shape[0], inner, generator)
        noise = s * inner.noise_scale * torch.randn(x.shape, device=x.device, generator=generator)
        with torch.no_grad():
            x_s = sample.float() + noise
            real = self.real(x_s, s.flatten(), y, augment_labels)
            fake = self.fake(x_s, s.flatten(), y, augment_labels=augment_labels).float()
            norm = (sample.float() - real).abs().mean(dim=1, keepdim=True).clamp(min=1e-8)
            target = sample.float() - (fake - real) / norm
        loss = 0.5 * (sample.float() - target) ** 2
        if self.critic.head is None:
            return loss
        with frozen(self.critic):
            logit = self.critic.logits(sample.float() + noise, s.flatten(), y, augment_labels)
        return loss + self.gan_weight * F.softplus(-logit)

    def real(self, x: torch.Tensor, sigma: torch.Tensor, y, augment_labels) -> torch.Tensor:
        """The teacher's denoiser, guided when ``guidance`` != 1 (the guide sees no augmentation labels)."""
        teacher = lambda x, sigma, y: self.teacher(x, sigma, y, augment_labels=augment_labels)  # noqa: E731
        return guided_denoise(teacher, x, sigma, y, Guidance(self.guidance, self.guide)).float()

    def random_level(self, batch: int, inner: nn.Module, generator) -> torch.Tensor:
        """(B, 1) levels for x_s: Karras's at fractions uniform in DMD_LEVELS."""
        u = torch.rand([batch, 1], device=inner.noise_scale.device, generator=generator)
        return self.dmd_level(DMD_LEVELS[0] + u * (DMD_LEVELS[1] - DMD_LEVELS[0]), inner)

    @staticmethod
    def dmd_level(u: torch.Tensor, inner: nn.Module) -> torch.Tensor:
        """Karras's (rho 7) level at fraction ``u`` from the top of the sampler's range."""
        lo, hi = sampler_range(inner)
        return (hi ** (1 / 7) + u * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7

    def train_fake(self, sample: torch.Tensor, real: torch.Tensor, y, augment_labels, generator) -> None:
        """``fake_updates`` steps of the critic on the sampler's outputs (and, with the GAN term, the real data): the
        fake denoiser's own noise levels and noise each time, and the discriminator's DMD levels."""
        inner = _inner(self.fake)
        with torch.enable_grad():
            for _ in range(self.fake_updates):
                self.fake_opt.zero_grad(set_to_none=True)
                sigma = self.random_level(sample.shape[0], inner, generator) if self.critic.head is not None else None
                loss = self.critic_train(self.fake_loss, sample, real, sigma, y, augment_labels, generator)
                (loss.sum() / sample.shape[0]).backward()
                for p in self.critic.parameters():
                    if p.grad is not None:
                        torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
                self.fake_opt.step()
