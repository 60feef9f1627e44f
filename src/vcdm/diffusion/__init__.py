"""Diffusion machinery: losses, samplers, per-seed RNG, augmentation. Knows nothing about files."""
from vcdm.diffusion.augment import AugmentPipe, edm_augment_pipe
from vcdm.diffusion.loss import EDMLoss, VELoss, VPLoss
from vcdm.diffusion.rng import StackedRandomGenerator
from vcdm.diffusion.samplers import (SAMPLERS, guided, karras_sigmas, sample, sample_ablation, sample_dpmpp_2m,
                                     sample_euler, sample_heun)

__all__ = ["AugmentPipe", "edm_augment_pipe", "EDMLoss", "VPLoss", "VELoss", "StackedRandomGenerator", "SAMPLERS",
           "guided", "karras_sigmas", "sample", "sample_ablation", "sample_dpmpp_2m", "sample_euler", "sample_heun"]
