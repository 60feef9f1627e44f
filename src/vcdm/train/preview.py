"""Sample grids during training: the EMA network, fixed seeds 0..n-1 and fixed conditioning (the
un-augmented tensors of n fixed training images), so grids of successive ticks are comparable."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from vcdm.data.dataset import to_uint8
from vcdm.diffusion.rng import StackedRandomGenerator
from vcdm.diffusion.sampling import sample
from vcdm.fileio import atomic_path
from vcdm.generate.files import make_grid
from vcdm.train.batches import BatchMaker


def preview_indices(size: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randperm(size, generator=g)[:n] if n <= size else torch.randint(size, [n], generator=g)


def conditioning(dataset, maker: BatchMaker, n: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(y for n fixed images, those images as uint8 (n, C, H, W))."""
    idx = preview_indices(len(dataset), n)
    items = [dataset[int(i)] for i in idx]
    images = torch.stack([it[0] for it in items])
    labels = torch.stack([it[1] for it in items])
    with torch.no_grad():
        tensors, _ = maker.tensors(idx, images, labels)
    return maker.structure.flatten_observed(tensors), images


def save_grid(images: torch.Tensor, path: str | Path) -> None:
    """uint8 (n, C, H, W) images → a near-square PNG grid, written atomically."""
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    grid = make_grid(list(arr))
    img = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


@torch.no_grad()
def sample_images(denoiser, y: torch.Tensor | None, n: int, device: torch.device, num_steps: int = 18) -> torch.Tensor:
    """n images (uint8) from the denoiser for seeds 0..n-1 (EDM's Heun sampler)."""
    structure = denoiser.structure
    rnd = StackedRandomGenerator(device, range(n))
    latents = rnd.randn([n, structure.latent_dim])
    x = sample(denoiser, latents, None if y is None else y.to(device), randn_like=rnd.randn_like, num_steps=num_steps)
    return to_uint8(structure.unflatten_latent(x.to(torch.float32))["image"])
