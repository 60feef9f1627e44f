"""Diffusion machinery: losses, samplers, sampler settings, per-seed RNG, augmentation. Knows nothing about files.

The names below are imported on first use, so that ``vcdm.diffusion.settings`` (and with it the commands'
--help) loads without torch.
"""
from __future__ import annotations

from vcdm.lazy import lazy_exports

_LAZY = {
    "AugmentPipe": "augment", "edm_augment_pipe": "augment", "Guidance": "guidance",
    "EDMLoss": "loss", "VELoss": "loss", "VPLoss": "loss", "StackedRandomGenerator": "rng",
    **{name: "samplers" for name in ("Churn", "sample_ablation", "sample_consistency", "sample_dpmpp_2m",
                                      "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_euler",
                                      "sample_euler_ancestral", "sample_heun", "sample_unipc")},
    "GuidedModel": "sampling", "guided": "sampling", "sample": "sampling", "karras_sigmas": "schedules",
    "PRESETS": "settings", "SAMPLERS": "settings", "SamplerOptionError": "settings", "SamplerOptions": "settings",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, {name: f"vcdm.diffusion.{module}" for name, module in _LAZY.items()})
