"""Feature statistics of an image set: extraction (batched, torchrun-aware) and EDM-compatible .npz files.

A reference file holds `mu` (D,) and `sigma` (D, D) as float64, exactly like EDM's published
fid-refs, so each loads where the other is expected. KID and precision/recall compare feature sets,
not Gaussians, so a reference made for them also stores `features` (N, D) float32; EDM ignores it.

Reading a reference checks before it allocates: each member's ``.npy`` header (a float dtype, the
shapes above) against the member's size, and the arrays' total against the file's budget
(:func:`vcdm.legacy.limits.file_budget`: a deflated member cannot inflate past twice the file plus
64 MiB). Non-finite statistics are refused at once (they would make the FID's matrix square root spin).
"""
from __future__ import annotations

import http.client
import math
import os
import stat
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from vcdm import distributed
from vcdm.fileio import atomic_write
from vcdm.legacy.limits import file_budget
from vcdm.safeload import ZIPINFO_BYTES, zip_entry_count

REFERENCE_ARRAYS = ("mu", "sigma", "features")


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
            arrays = _read_npz(Path(path))
        except StatsError as e:
            raise StatsError(f"{path}: {e}") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as e:
            raise StatsError(f"{path}: cannot read reference statistics ({str(e).splitlines()[0][:200]})") from None
        mu, sigma, features = arrays["mu"], arrays["sigma"], arrays.get("features")
        for name, value in (("mu", mu), ("sigma", sigma), ("features", features)):
            if value is not None and not np.isfinite(value).all():
                raise StatsError(f"{path}: '{name}' holds non-finite values (NaN or inf); the file is damaged")
        num = None if features is None else len(features)
        return cls(mu.astype(np.float64), sigma.astype(np.float64), num, features)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The reference arrays of an .npz, each member's header checked (float dtype, shape, size) and the
    total charged to the file's budget before any array is read. Raises ValueError/OSError."""
    with open(path, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        budget = file_budget(info.st_size)
        budget.take(ZIPINFO_BYTES * zip_entry_count(f, info.st_size), "the archive's directory")
        with zipfile.ZipFile(f) as zf:
            npys = [n for n in zf.namelist() if n.endswith(".npy")]
            headers = {n.removesuffix(".npy"): _npy_header(zf, n) for n in npys}
            if "mu" not in headers or "sigma" not in headers:
                found = ", ".join(f"{k}{list(h[0])}" for k, h in headers.items()) or "nothing"
                raise StatsError(f"expected an .npz with 'mu' (D,) and 'sigma' (D, D) like EDM's fid-refs; "
                                 f"found {found}"[:300])
            headers = {k: h for k, h in headers.items() if k in REFERENCE_ARRAYS}
            for name, (_, dtype, _) in headers.items():
                if dtype.kind != "f" or dtype.hasobject:
                    raise ValueError(f"'{name}' holds {dtype} values; expected floating point numbers")
            dim = headers["mu"][0][0] if "mu" in headers and len(headers["mu"][0]) == 1 else None
            expected = {"mu": (dim,), "sigma": (dim, dim), "features": (None, dim)}
            for name, (shape, dtype, _) in headers.items():
                if dim is None or len(shape) != len(expected[name]) or \
                        any(e is not None and n != e for n, e in zip(shape, expected[name])):
                    want = {"mu": "(D,)", "sigma": "(D, D)", "features": "(N, D)"}[name]
                    raise ValueError(f"'{name}' has shape {list(shape)}, expected {want} with D from 'mu' "
                                     f"({'unknown' if dim is None else dim})")
                budget.take(math.prod(shape) * dtype.itemsize, f"array '{name}'")
            arrays = {}
            for name, (_, _, member) in headers.items():
                with zf.open(member) as data:
                    arrays[name] = np.lib.format.read_array(data, allow_pickle=False)
            return arrays


def _npy_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype, zipfile.ZipInfo]:
    """Shape and dtype from an .npy member's header (its data checked to fill the member exactly)."""
    info = zf.getinfo(member)
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"'{member}' has .npy format version {version}")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f, max_header_size=10_000)
        header_size = f.tell()
    if dtype.hasobject:
        raise ValueError(f"'{member}' holds Python objects (a pickle); refused")
    if header_size + math.prod(shape) * dtype.itemsize != info.file_size:
        raise ValueError(f"'{member}' holds {info.file_size:,} bytes, not the {math.prod(shape):,} values of "
                         f"{dtype} its header claims (damaged or hostile)")
    return tuple(shape), dtype, info


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
