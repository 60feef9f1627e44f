"""Diffusion machinery: losses, samplers, sampler settings, per-seed RNG, augmentation. Knows nothing about files."""
from vcdm.diffusion.augment import AugmentPipe, edm_augment_pipe
from vcdm.diffusion.guidance import Guidance
from vcdm.diffusion.loss import EDMLoss, VELoss, VPLoss
from vcdm.diffusion.rng import StackedRandomGenerator
from vcdm.diffusion.samplers import (Churn, sample_ablation, sample_consistency, sample_dpmpp_2m, sample_dpmpp_2m_sde,
                                     sample_dpmpp_3m_sde, sample_euler, sample_euler_ancestral, sample_heun, sample_unipc)
from vcdm.diffusion.sampling import GuidedModel, guided, sample
from vcdm.diffusion.schedules import karras_sigmas
from vcdm.diffusion.settings import PRESETS, SAMPLERS, SamplerOptionError, SamplerOptions

__all__ = ["AugmentPipe", "edm_augment_pipe", "EDMLoss", "VPLoss", "VELoss", "StackedRandomGenerator", "SAMPLERS",
           "PRESETS", "SamplerOptions", "SamplerOptionError", "Churn", "Guidance", "GuidedModel", "guided",
           "karras_sigmas", "sample", "sample_ablation", "sample_consistency", "sample_dpmpp_2m", "sample_euler",
           "sample_heun", "sample_euler_ancestral", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_unipc"]
