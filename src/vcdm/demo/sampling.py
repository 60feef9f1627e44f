"""Sampling the demo's models through vcdm.generate and reading the images back."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vcdm.data.dataset import to_float
from vcdm.generate import generate, load_model, sample_two_stage, seed_path
from vcdm.generate.core import model_embedder
from vcdm.generate.files import read_png, write_tensors
from vcdm.generate.options import Conditioning, RunOptions, SamplerOptions


def read_images(outdir: Path, seeds: Sequence[int]) -> torch.Tensor:
    """uint8 (N, C, H, W) of the PNGs that vcdm.generate wrote for `seeds`."""
    return torch.from_numpy(np.stack([read_png(seed_path(outdir, s, "png")) for s in seeds])).permute(0, 3, 1, 2)


def sampler(steps: int) -> SamplerOptions:
    """EDM's deterministic Heun sampler with `steps` steps (both stages of the demo)."""
    return SamplerOptions(num_steps=steps)


def two_stage_images(prior: Path, image_model: Path, seeds: Sequence[int], outdir: Path, *, steps: int,
                     device: str, progress: bool = True) -> torch.Tensor:
    """The images of a two-stage run into ``outdir`` (vcdm.generate.sample_two_stage), read back as uint8."""
    res = sample_two_stage(prior, image_model, seeds, prior_opts=sampler(steps), image_opts=sampler(steps),
                           run=RunOptions(outdir=outdir, progress=progress), device=device)
    return read_images(res.images.outdir, seeds)


def sample_model(model: Path, seeds: Sequence[int], outdir: Path, *, steps: int, device: str,
                 load_obs_from: Path | None = None, progress: bool = True) -> torch.Tensor:
    res = generate(model, seeds, opts=sampler(steps), cond=Conditioning(load_obs_from=load_obs_from),
                   run=RunOptions(outdir=outdir, progress=progress), device=device)
    return read_images(res.outdir, seeds)


def write_true_embeddings(image_model: Path, images: torch.Tensor, outdir: Path, device: str) -> list[int]:
    """Embed real uint8 images with the image model's own embedder and write them as per-seed
    observation files (seed i ↔ image i), the format `--load_obs_from` reads; returns the seeds."""
    model = load_model(image_model, device)
    embedder = model_embedder(model, None, torch.device(device))
    with torch.no_grad():
        emb = torch.cat([embedder.embed(to_float(b)).cpu() for b in images.split(500)])
    for i, e in enumerate(emb):
        write_tensors(seed_path(outdir, i, "pt"), {"embedding": e})
    return list(range(len(images)))
