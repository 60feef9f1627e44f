"""Feature statistics of an image set: extraction (batched, torchrun-aware) and EDM-compatible .npz files.

Statistics live in feature spaces: ``inception`` (FID, KID, precision/recall) and ``dinov2``
(FD-DINOv2). A reference file holds Inception's `mu` (D,) and `sigma` (D, D) as float64, exactly like
EDM's published fid-refs, so each loads where the other is expected; DINOv2's are `dinov2_mu` and
`dinov2_sigma` in the same file. KID and precision/recall compare feature sets, not Gaussians, so a
reference made for them also stores `features` (N, D) float32; EDM ignores both additions. EDM2's
published ``dataset-refs/*.pkl`` (a pickle of ``{"fid": {mu, sigma}, "fd_dinov2": {mu, sigma}}``) are
read through vcdm's restricted unpickler.

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
from typing import Collection, Mapping, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vcdm import distributed
from vcdm.fileio import atomic_write, download
from vcdm.legacy.limits import ZIPINFO_BYTES, file_budget, zip_entry_count
from vcdm.legacy.records import LegacyError, Record
from vcdm.legacy.unpickle import read_pickle

REFERENCE_ARRAYS = ("mu", "sigma", "features")
SPACES = {"inception": "", "dinov2": "dinov2_"}  # feature space → prefix of its arrays in a reference .npz
EDM2_KEYS = {"fid": "inception", "fd_dinov2": "dinov2"}  # EDM2's reference pickles name spaces by metric


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
        """Write as Inception statistics, in EDM's fid-refs format."""
        save_references({"inception": self}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read the Inception statistics of a reference (EDM's fid-refs or ours), plus `features` if present."""
        references = load_references(path)
        if "inception" not in references:
            raise StatsError(f"{path}: holds no Inception statistics ('mu', 'sigma'), only {', '.join(references)}")
        return references["inception"]

    def check_finite(self, where: str) -> "FeatureStats":
        for name, value in (("mu", self.mu), ("sigma", self.sigma), ("features", self.features)):
            if value is not None and not np.isfinite(value).all():
                raise StatsError(f"{where}: '{name}' holds non-finite values (NaN or inf); the file is damaged")
        return self


def save_references(references: Mapping[str, FeatureStats], path: str | os.PathLike) -> None:
    """Write the statistics of several feature spaces as one .npz (Inception's under EDM's names)."""
    arrays = {}
    for space, stats in references.items():
        prefix = SPACES[space]
        arrays[prefix + "mu"], arrays[prefix + "sigma"] = stats.mu.astype(np.float64), stats.sigma.astype(np.float64)
        if stats.features is not None:
            arrays[prefix + "features"] = stats.features.astype(np.float32)
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load_references(path: str | os.PathLike) -> dict[str, FeatureStats]:
    """The statistics of every feature space a reference file holds: an .npz (EDM's fid-refs or vcdm's) or
    EDM2's dataset-refs .pkl. Checked before allocation (see the module docstring) and for finite values."""
    path = Path(path)
    if path.suffix == ".pkl":
        return _read_edm2_pickle(path)
    try:
        groups = _read_npz(path)
    except StatsError as e:
        raise StatsError(f"{path}: {e}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as e:
        raise StatsError(f"{path}: cannot read reference statistics ({str(e).splitlines()[0][:200]})") from None
    references = {}
    for space, arrays in groups.items():
        features = arrays.get("features")
        stats = FeatureStats(arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64),
                             None if features is None else len(features), features)
        references[space] = stats.check_finite(str(path))
    return references


def _read_edm2_pickle(path: Path) -> dict[str, FeatureStats]:
    """EDM2's reference pickle, unpickled without running anything from it and checked like an .npz."""
    try:
        data = read_pickle(path)
    except LegacyError as e:
        raise StatsError(f"cannot read reference statistics: {e}") from None
    if not isinstance(data, Mapping) or not any(k in data for k in EDM2_KEYS):
        raise StatsError(f"{path}: expected EDM2's reference statistics (a dict with 'fid' and/or 'fd_dinov2')")
    references = {}
    for key, space in EDM2_KEYS.items():
        entry = data.get(key)
        if entry is None:
            continue
        mu, sigma = (_array(entry.get(k)) if isinstance(entry, Mapping) else None for k in ("mu", "sigma"))
        if not isinstance(mu, np.ndarray) or not isinstance(sigma, np.ndarray) or mu.ndim != 1 \
                or sigma.shape != (mu.size, mu.size) or mu.dtype.kind != "f" or sigma.dtype.kind != "f":
            raise StatsError(f"{path}: '{key}' should hold float arrays mu (D,) and sigma (D, D)")
        num = data.get("num_images")
        stats = FeatureStats(mu.astype(np.float64), sigma.astype(np.float64), num if type(num) is int else None)
        references[space] = stats.check_finite(str(path))
    return references


def _array(value: object) -> np.ndarray | None:
    """The array the restricted unpickler rebuilt for a pickled numpy array (None for anything else)."""
    return value.array if isinstance(value, Record) and value.class_name == "numpy.ndarray" else None


def _read_npz(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """The reference arrays of an .npz per feature space, each member's header checked (float dtype, shape,
    size) and the total charged to the file's budget before any array is read. Raises ValueError/OSError."""
    with open(path, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        budget = file_budget(info.st_size)
        budget.take(ZIPINFO_BYTES * zip_entry_count(f, info.st_size), "the archive's directory")
        with zipfile.ZipFile(f) as zf:
            npys = [n for n in zf.namelist() if n.endswith(".npy")]
            headers = {n.removesuffix(".npy"): _npy_header(zf, n) for n in npys}
            spaces = {space: prefix for space, prefix in SPACES.items()
                      if prefix + "mu" in headers and prefix + "sigma" in headers}
            if not spaces:
                found = ", ".join(f"{k}{list(h[0])}" for k, h in headers.items()) or "nothing"
                raise StatsError(f"expected an .npz with 'mu' (D,) and 'sigma' (D, D) like EDM's fid-refs; "
                                 f"found {found}"[:300])
            members = {}
            for space, prefix in spaces.items():
                group = {name: headers[prefix + name] for name in REFERENCE_ARRAYS if prefix + name in headers}
                for name, (_, dtype, _) in group.items():
                    if dtype.kind != "f" or dtype.hasobject:
                        raise ValueError(f"'{prefix}{name}' holds {dtype} values; expected floating point numbers")
                dim = group["mu"][0][0] if len(group["mu"][0]) == 1 else None
                expected = {"mu": (dim,), "sigma": (dim, dim), "features": (None, dim)}
                for name, (shape, dtype, _) in group.items():
                    if dim is None or len(shape) != len(expected[name]) or \
                            any(e is not None and n != e for n, e in zip(shape, expected[name])):
                        want = {"mu": "(D,)", "sigma": "(D, D)", "features": "(N, D)"}[name]
                        raise ValueError(f"'{prefix}{name}' has shape {list(shape)}, expected {want} with D from "
                                         f"'{prefix}mu' ({'unknown' if dim is None else dim})")
                    budget.take(math.prod(shape) * dtype.itemsize, f"array '{prefix}{name}'")
                members[space] = {name: member for name, (_, _, member) in group.items()}
            groups = {}
            for space, group in members.items():
                groups[space] = {}
                for name, member in group.items():
                    with zf.open(member) as data:
                        groups[space][name] = np.lib.format.read_array(data, allow_pickle=False)
            return groups


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
    """Features of every image in `dataset` → mean, covariance (and the features themselves)."""
    return compute_references(dataset, {"features": extractor}, batch=batch, device=device,
                              keep_features=("features",) if keep_features else (), num_workers=num_workers,
                              progress=progress)["features"]


def compute_references(dataset: Dataset, extractors: Mapping[str, FeatureExtractor], *, batch: int = 64,
                       device: torch.device | str = "cpu", keep_features: Collection[str] = (), num_workers: int = 0,
                       progress: bool = True) -> dict[str, FeatureStats]:
    """Statistics of every image in `dataset` in each extractor's feature space, in one pass over the images
    (each is decoded once); the features themselves are kept for the spaces named in `keep_features`.

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

    sums = {space: (torch.zeros([e.dim], dtype=torch.float64, device=device),
                    torch.zeros([e.dim, e.dim], dtype=torch.float64, device=device)) for space, e in extractors.items()}
    kept: dict[str, list[torch.Tensor]] = {space: [] for space in extractors}
    with tqdm(total=sum(len(b) for b in mine), unit="img", desc="Features", disable=not progress or rank != 0,
              file=sys.stderr) as bar:
        for images in loader:
            images = images.to(device, non_blocking=True)
            for space, extractor in extractors.items():
                f = extractor(images).to(device, torch.float64)
                sums[space][0].add_(f.sum(0))
                sums[space][1].add_(f.T @ f)
                if space in keep_features:
                    kept[space].append(f.float())
            bar.update(len(images))

    results = {}
    for space, (mu, sigma) in sums.items():
        features = torch.cat(kept[space]) if kept[space] else torch.zeros([0, mu.numel()], device=device)
        if world > 1:
            dist.all_reduce(mu)
            dist.all_reduce(sigma)
            if space in keep_features:
                features = _gather_rows(features, shards, n)
        mu /= n
        sigma -= mu.outer(mu) * n
        sigma /= n - 1
        results[space] = FeatureStats(mu.cpu().numpy(), sigma.cpu().numpy(), n,
                                      features.cpu().numpy() if space in keep_features else None)
    return results


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


def load_reference(ref: str, *, progress: bool = True) -> dict[str, FeatureStats]:
    """Load the reference statistics of every feature space a file holds, from a path or an http(s) URL
    (cached under torch.hub's directory)."""
    if ref.startswith(("http://", "https://")):
        cached = Path(torch.hub.get_dir()) / "vcdm-fid-refs" / Path(ref.split("?")[0]).name
        if not cached.is_file():
            try:
                download(ref, cached, progress=progress)
            except (OSError, http.client.HTTPException) as e:
                raise StatsError(f"--ref: cannot download {ref} ({e}); download it yourself and pass the local path") from None
        ref = str(cached)
    if not Path(ref).is_file():
        raise StatsError(f"--ref: no such file '{ref}' (expected an .npz with 'mu' and 'sigma', e.g. from `vcdm fid ref`, "
                         "or EDM2's dataset-refs .pkl)")
    return load_references(ref)
