"""Denoising score-matching losses of EDM (Karras et al. 2022): EDM, VP and VE; and EDM2's (Karras et
al. 2024), EDM's loss scaled by a learned per-noise-level uncertainty.

Each returns the per-element weighted squared error (B, latent_dim); the caller sums or averages it.
With ``cond_drop`` P (vcdm's --cond-drop; the release has none), each sample's conditioning y is replaced
by zeros with probability P, so the model also learns the unconditional prediction that classifier-free
guidance contrasts with (the samplers' unconditional branch passes zeros too).
As in the original release, tensor k is noised at sigma * noise_mult[k], the weight uses that
per-element sigma, and elements whose network predicts x0 directly (pred_x0) get weight 1. Both come
from the denoiser, so loss and preconditioning cannot disagree.
"""
from __future__ import annotations

import torch
from torch import nn


def _inner(denoiser: nn.Module) -> nn.Module:
    """The Denoiser behind DistributedDataParallel / torch.compile wrappers."""
    inner = denoiser
    while inner is not None and not hasattr(inner, "noise_scale"):
        inner = next((getattr(inner, a) for a in ("module", "_orig_mod") if hasattr(inner, a)), None)
    if inner is None:
        raise TypeError(f"the loss needs a vcdm Denoiser (possibly wrapped by DDP or torch.compile), "
                        f"got {type(denoiser).__name__}")
    return inner


def equally_weighted(loss: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The release's --equally_weight_tensors: the sum over generated tensors of each tensor's mean loss
    over this accumulation round's batch (so, as in the release, each round adds a full mean).

    `loss` is (B, latent_dim) as the losses return it; `sizes` are the tensors' flat sizes in order.
    """
    return sum(part.mean() for part in loss.split(sizes, dim=1))


def guidance_warning(training: dict | None, guidance: float, flag: str = "--guidance") -> str | None:
    """A warning for classifier-free guidance (``guidance`` != 1) on a model whose training config records
    no conditioning dropout (--cond-drop): its unconditional branch (zero conditioning) was never trained.
    ``flag``: the option the user set (``--image-guidance`` in `vcdm sample`)."""
    drop = float((training or {}).get("cond_drop") or 0.0)
    if guidance == 1 or drop > 0:
        return None
    how = "was trained without --cond-drop" if training else "records no training settings (imported)"
    return (f"warning: {flag} {guidance:g}: this model {how}, so its unconditional prediction (zero "
            f"conditioning) was never learned and guidance extrapolates towards an untrained output; train "
            f"with --cond-drop 0.1 (for example) to use guidance")


class _Loss:
    cond_drop = 0.0  # probability of replacing a sample's conditioning by the zero null (for guidance)

    def sample_sigma(self, batch: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, denoiser: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                 augment_labels: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        inner = _inner(denoiser)
        sigma = self.sample_sigma(x.shape[0], x.device, generator)  # (B, 1)
        s = sigma * inner.noise_scale
        n = torch.randn(x.shape, device=x.device, generator=generator) * s
        if y is not None and self.cond_drop > 0:  # drawn last: the other draws match a run without it
            keep = torch.rand([x.shape[0], 1], device=x.device, generator=generator) >= self.cond_drop
            y = y * keep.to(y.dtype)
        weight = self.weight(s).masked_fill(inner.x0_mask, 1.0)
        return self.weighted_error(denoiser, x, x + n, sigma.flatten(), y, augment_labels, weight)

    def weighted_error(self, denoiser: nn.Module, x: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor,
                       y: torch.Tensor | None, augment_labels: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        D = denoiser(noisy, sigma, y, augment_labels=augment_labels)
        return weight * (D - x) ** 2


class EDMLoss(_Loss):
    """ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, cond_drop: float = 0.0):
        self.P_mean, self.P_std, self.sigma_data, self.cond_drop = P_mean, P_std, sigma_data, cond_drop

    def sample_sigma(self, batch, device, generator):
        return (torch.randn([batch, 1], device=device, generator=generator) * self.P_std + self.P_mean).exp()

    def weight(self, s):
        return (s ** 2 + self.sigma_data ** 2) / (s * self.sigma_data) ** 2


class EDM2Loss(EDMLoss):
    """EDM2's: EDM's loss divided by exp(u(sigma)) plus u(sigma), with u the denoiser's learned log-variance
    (Eq. 21 of Karras et al. 2024). The network learns u as the expected weighted error at each noise level,
    which evens out the loss over noise levels. Defaults are EDM2's (its latent presets; pixels use -0.8, 1.6).
    """

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5, cond_drop: float = 0.0):
        super().__init__(P_mean, P_std, sigma_data, cond_drop)

    def weighted_error(self, denoiser, x, noisy, sigma, y, augment_labels, weight):
        if not getattr(_inner(denoiser), "logvar_channels", 0):
            raise TypeError("EDM2's loss needs a denoiser with the learned uncertainty (logvar_channels > 0)")
        D, logvar = denoiser(noisy, sigma, y, augment_labels=augment_labels, return_logvar=True)
        return (weight / logvar.exp()) * (D - x) ** 2 + logvar


class VPLoss(_Loss):
    """sigma = sigma_vp(t), t ~ U(epsilon_t, 1); weight 1 / sigma^2."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5, cond_drop: float = 0.0):
        self.beta_d, self.beta_min, self.epsilon_t, self.cond_drop = beta_d, beta_min, epsilon_t, cond_drop

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sample_sigma(self, batch, device, generator):
        return self.sigma(1 + torch.rand([batch, 1], device=device, generator=generator) * (self.epsilon_t - 1))

    def weight(self, s):
        return 1 / s ** 2


class VELoss(_Loss):
    """sigma log-uniform on [sigma_min, sigma_max]; weight 1 / sigma^2."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0, cond_drop: float = 0.0):
        self.sigma_min, self.sigma_max, self.cond_drop = sigma_min, sigma_max, cond_drop

    def sample_sigma(self, batch, device, generator):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** torch.rand([batch, 1], device=device, generator=generator)

    def weight(self, s):
        return 1 / s ** 2
