"""Feature statistics of an image set: extraction (batched, torchrun-aware) and EDM-compatible .npz files.

A reference file holds `mu` (D,) and `sigma` (D, D) as float64, exactly like EDM's published
fid-refs, so each loads where the other is expected. KID and precision/recall compare feature sets,
not Gaussians, so a reference made for them also stores `features` (N, D) float32; EDM ignores it.
"""
from __future__ import annotations

import http.client
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from vcdm import distributed
from vcdm.fileio import atomic_write


class StatsError(ValueError):
    """A statistics file that is missing, unreadable or not in EDM's mu/sigma format."""


class FeatureExtractor(Protocol):
    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) → (B, dim) float."""


@dataclass
class FeatureStats:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64, unbiased (N - 1) covariance as EDM computes it
    num: int | None = None  # number of images; unknown for EDM's files
    features: np.ndarray | None = None  # (N, D) float32 in dataset order, for KID / precision-recall

    def save(self, path: str | os.PathLike) -> None:
        arrays = dict(mu=self.mu.astype(np.float64), sigma=self.sigma.astype(np.float64))
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        with atomic_write(path) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read a .npz with `mu` and `sigma` (EDM's fid-refs or ours), plus `features` if present."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError) as e:
            raise StatsError(f"{path}: cannot read reference statistics ({e})") from None
        mu, sigma, features = arrays.get("mu"), arrays.get("sigma"), arrays.get("features")
        if mu is None or sigma is None or mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            found = ", ".join(f"{k}{list(v.shape)}" for k, v in arrays.items()) or "nothing"
            raise StatsError(f"{path}: expected an .npz with 'mu' (D,) and 'sigma' (D, D) like EDM's fid-refs; found {found}")
        if features is not None and (features.ndim != 2 or features.shape[1] != mu.size):
            raise StatsError(f"{path}: 'features' should be (N, {mu.size}), got {list(features.shape)}")
        num = None if features is None else len(features)
        return cls(mu.astype(np.float64), sigma.astype(np.float64), num, features)


def rank_and_world() -> tuple[int, int]:
    return distributed.rank(), distributed.world_size()


def _stack_images(items: list) -> torch.Tensor:
    """Collate dataset items (an image, or an (image, label, …) tuple) into a uint8 batch."""
    return torch.stack([torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item) for item in items])


def compute_stats(dataset: Dataset, extractor: FeatureExtractor, *, batch: int = 64, device: torch.device | str = "cpu",
                  keep_features: bool = False, num_workers: int = 0, progress: bool = True) -> FeatureStats:
    """Features of every image in `dataset` → mean, covariance (and the features themselves).

    Under torch.distributed each rank extracts every world_size-th batch; the float64 sums are
    all-reduced and kept features all-gathered, so every rank returns the same statistics, and they
    do not depend on the number of processes beyond float rounding.
    """
    rank, world = rank_and_world()
    device = torch.device(device)
    n = len(dataset)
    if n < 2:
        raise ValueError(f"found {n} images, need at least 2 to compute statistics")
    num_batches = -(-n // (batch * world)) * world
    shards = [[b for b in torch.arange(n).tensor_split(num_batches)[r::world] if len(b)] for r in range(world)]
    mine = shards[rank]
    loader = DataLoader(dataset, batch_sampler=[b.tolist() for b in mine], collate_fn=_stack_images,
                        num_workers=num_workers, prefetch_factor=2 if num_workers else None,
                        pin_memory=device.type == "cuda")

    dim = extractor.dim
    mu = torch.zeros([dim], dtype=torch.float64, device=device)
    sigma = torch.zeros([dim, dim], dtype=torch.float64, device=device)
    kept = []
    from tqdm import tqdm

    with tqdm(total=sum(len(b) for b in mine), unit="img", desc="Features", disable=not progress or rank != 0,
              file=sys.stderr) as bar:
        for images in loader:
            f = extractor(images.to(device, non_blocking=True)).to(device, torch.float64)
            mu += f.sum(0)
            sigma += f.T @ f
            if keep_features:
                kept.append(f.float())
            bar.update(len(images))

    features = torch.cat(kept) if kept else torch.zeros([0, dim], device=device)
    if world > 1:
        dist.all_reduce(mu)
        dist.all_reduce(sigma)
        if keep_features:
            features = _gather_rows(features, shards, n)
    mu /= n
    sigma -= mu.outer(mu) * n
    sigma /= n - 1
    return FeatureStats(mu.cpu().numpy(), sigma.cpu().numpy(), n, features.cpu().numpy() if keep_features else None)


def _gather_rows(local: torch.Tensor, shards: list[list[torch.Tensor]], n: int) -> torch.Tensor:
    """All-gather each rank's rows (for the dataset indices in its shard) back into dataset order."""
    counts = [sum(len(b) for b in s) for s in shards]
    padded = local.new_zeros([max(counts), local.shape[1]])  # all_gather needs equal sizes
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in shards]
    dist.all_gather(gathered, padded)
    order = torch.cat([torch.cat(s) for s in shards if s]).to(local.device)
    rows = local.new_empty([n, local.shape[1]])
    rows[order] = torch.cat([g[:c] for g, c in zip(gathered, counts)])
    return rows


def load_reference(ref: str, *, progress: bool = True) -> FeatureStats:
    """Load reference statistics from a path or an http(s) URL (cached under torch.hub's directory)."""
    if ref.startswith(("http://", "https://")):
        from vcdm.metrics.inception import download

        cached = Path(torch.hub.get_dir()) / "vcdm-fid-refs" / Path(ref.split("?")[0]).name
        if not cached.is_file():
            try:
                download(ref, cached, progress=progress)
            except (OSError, http.client.HTTPException) as e:
                raise StatsError(f"--ref: cannot download {ref} ({e}); download it yourself and pass the local path") from None
        ref = str(cached)
    if not Path(ref).is_file():
        raise StatsError(f"--ref: no such file '{ref}' (expected an .npz with 'mu' and 'sigma', e.g. from `vcdm fid ref`)")
    return FeatureStats.load(ref)
