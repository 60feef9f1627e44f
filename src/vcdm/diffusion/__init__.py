"""Diffusion machinery: losses, samplers, per-seed RNG, augmentation. Knows nothing about files."""
from vcdm.diffusion.augment import AugmentPipe, edm_augment_pipe
from vcdm.diffusion.guidance import Guidance
from vcdm.diffusion.loss import EDMLoss, VELoss, VPLoss
from vcdm.diffusion.rng import StackedRandomGenerator
from vcdm.diffusion.samplers import Churn, sample_ablation, sample_dpmpp_2m, sample_euler, sample_heun
from vcdm.diffusion.sampling import SAMPLERS, Model, guided, sample
from vcdm.diffusion.schedules import karras_sigmas
from vcdm.diffusion.solvers import sample_dpmpp_2m_sde, sample_dpmpp_3m_sde, sample_euler_ancestral, sample_unipc

__all__ = ["AugmentPipe", "edm_augment_pipe", "EDMLoss", "VPLoss", "VELoss", "StackedRandomGenerator", "SAMPLERS",
           "Churn", "Guidance", "Model", "guided", "karras_sigmas", "sample", "sample_ablation", "sample_dpmpp_2m", "sample_euler",
           "sample_heun", "sample_euler_ancestral", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_unipc"]
