"""`pixel-pca`: an embedder that needs no downloaded weights, fitted on the training set.

Images are downsampled to ``size``×``size`` (antialiased bilinear) and projected on the top ``dim``
principal components of the training images' downsampled pixels. By default each component is
whitened to standard deviation 0.5 (= EDM's sigma_data), so the embedding is on the scale the
diffusion preconditioning expects; `whiten=False` keeps raw projection coefficients.

It exists so that CPU-only and offline users (and the demo) can run the two-stage pipeline end to end.
It captures layout and colour, not semantics: the paper's results all use CLIP ViT-B/32.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F

from vcdm.embedders.base import Embedder, EmbedderError, cached_fit, image_batches


def fit_pca(batches: Iterable[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact PCA of rows streamed in (b, D) batches, in float64 on the CPU (deterministic).

    Returns (mean (D,), components (k, D) with unit rows, variances (k,) descending). Each
    component's sign is fixed so that its largest-magnitude entry is positive.
    """
    n, total, gram = 0, None, None
    for x in batches:
        x = x.detach().to("cpu", torch.float64).reshape(len(x), -1)
        total = x.sum(0) if total is None else total + x.sum(0)
        gram = x.T @ x if gram is None else gram + x.T @ x
        n += len(x)
    if n < 2:
        raise EmbedderError(f"PCA needs at least 2 samples, got {n}")
    d = total.numel()
    if not 0 < k <= min(d, n - 1):
        raise EmbedderError(f"PCA: cannot keep {k} components of {d}-dim data with {n} samples "
                            f"(at most {min(d, n - 1)})")
    mean = total / n
    cov = (gram - n * torch.outer(mean, mean)) / (n - 1)
    var, vec = torch.linalg.eigh(cov)
    var, comps = var.flip(0)[:k].clamp_min(0), vec.flip(1)[:, :k].T.contiguous()
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    return mean, comps * signs, var


class PixelPCA(Embedder):
    name = "pixel-pca"

    def __init__(self, dim: int = 64, size: int = 16, channels: int = 3, whiten: bool = True):
        super().__init__(trainable=False)
        if dim < 1 or size < 1 or dim > channels * size * size:
            raise EmbedderError(f"pixel-pca: need 1 <= dim <= channels*size*size = {channels * size * size}, "
                                f"got dim={dim}")
        self.dim, self.size, self.channels, self.whiten = int(dim), int(size), int(channels), bool(whiten)
        self.normalisation = "whitened (std 0.5 per component)" if whiten else "none"
        d = channels * size * size
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("components", torch.zeros(dim, d))
        self.register_buffer("scale", torch.ones(dim))

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Downsampled, flattened pixels: (B, C, H, W) → (B, C*size*size)."""
        if images.shape[1] != self.channels:
            raise EmbedderError(f"pixel-pca: fitted on {self.channels}-channel images, got {images.shape[1]} channels")
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return x.reshape(len(x), -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return ((self.pixels(images) - self.mean) @ self.components.T) * self.scale

    def reconstruct(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Back-projection of embeddings to (B, C, size, size) images in [-1, 1] (approximately)."""
        x = (embeddings.to(self.mean) / self.scale) @ self.components + self.mean
        return x.reshape(len(x), self.channels, self.size, self.size)

    def config(self) -> dict[str, Any]:
        return {"size": self.size, "channels": self.channels, "whiten": self.whiten}

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "components": self.components, "scale": self.scale}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> "PixelPCA":
        for key, buf in self.export_state().items():
            if key not in tensors or tuple(tensors[key].shape) != tuple(buf.shape):
                got = tuple(tensors[key].shape) if key in tensors else "missing"
                raise EmbedderError(f"pixel-pca state: tensor '{key}' should be {tuple(buf.shape)}, got {got}")
            buf.copy_(tensors[key])
        return self

    @classmethod
    def fit(cls, source: Any, *, dim: int = 64, size: int = 16, whiten: bool = True, seed: int = 0,
            max_images: int | None = None, batch_size: int = 256, cache_dir: str | os.PathLike | None = None,
            data_key: str | None = None) -> "PixelPCA":
        """Fit on a dataset or an image tensor (see `image_batches`); deterministic for a seed.
        With `cache_dir`, the fit is stored there and reused by later runs on the same data, so a
        prior and an image model trained separately share the same (bit-identical) embedder."""
        first = next(image_batches(source, batch_size=1))
        model = cls(dim, size, first.shape[1], whiten)
        key = {"embedder": cls.name, "dim": dim, "size": size, "whiten": whiten, "seed": seed,
               "max_images": max_images, "num_images": len(source), "image_shape": list(first.shape[1:]),
               "data_key": data_key}

        def fit() -> dict[str, torch.Tensor]:
            batches = image_batches(source, batch_size=batch_size, max_images=max_images, seed=seed)
            mean, comps, var = fit_pca((model.pixels(b) for b in batches), dim)
            scale = 0.5 / var.clamp_min(var[0] * 1e-6 + 1e-12).sqrt() if whiten else torch.ones(dim)
            return {"mean": mean.float(), "components": comps.float(), "scale": scale.float()}

        return model.load_state(cached_fit(cache_dir, f"pixel-pca-d{dim}-s{size}", key, fit))
