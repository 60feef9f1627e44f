"""Per-seed sample files: PNG images, ``.pt`` tensor lists, and image grids. All writes atomic.

A ``.pt`` holds one sample as the original release's generate.py saves it (and its ``--load_obs_from``
reads it): a list over the data class's tensors (e.g. image, embedding, label), None for those the
sample lacks. vcdm before this format wrote ``{name: tensor}`` dicts; both are read.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import PIL.Image
import torch

from vcdm.data import dataset
from vcdm.data.structure import DATA_CLASS_TENSORS, Structure
from vcdm.fileio import atomic_write, open_regular
from vcdm.generate.options import GenerateError, seed_path
from vcdm.safeload import load_torch_zip


OBS_LIMIT = 1e4  # observed tensors read back: beyond this a network's output is meaningless (and may overflow)


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [-1, 1] → (B, H, W, C) uint8, rounding as EDM's generate.py does."""
    return dataset.to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Every write's error policy: an OSError (full disk, permission, name too long) names ``path``; the
    atomic write has left the earlier file (or none) in place."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


def write_png(path: str | os.PathLike, image: np.ndarray, durable: bool = True) -> None:
    """Write one (H, W, C) uint8 image; C = 1 gives a grayscale PNG. ``durable``: as ``atomic_write``'s."""
    pil = PIL.Image.fromarray(image[:, :, 0], "L") if image.shape[2] == 1 else PIL.Image.fromarray(image, "RGB")
    with naming(path), atomic_write(path, "wb", durable) as f:
        pil.save(f, format="PNG")


def read_png(path: str | os.PathLike) -> np.ndarray:
    """One sample PNG of a results folder: a regular file of its own (a planted link is refused)."""
    fd = open_regular(path)
    if fd is None:
        raise GenerateError(f"{path}: not a regular file (a link or special file in the results folder)")
    with os.fdopen(fd, "rb") as f, PIL.Image.open(f) as img:
        arr = np.asarray(img)
    return arr[:, :, None] if arr.ndim == 2 else arr


def tensor_order(names: Sequence[str]) -> tuple[str, ...]:
    """The tensor list of the smallest data class that has all of `names` (the release's list order)."""
    fits = [t for t in DATA_CLASS_TENSORS.values() if set(names) <= set(t)]
    if not fits:
        raise ValueError(f"no data class has the tensors {sorted(names)}")
    return min(fits, key=len)


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                  names: Sequence[str] | None = None, durable: bool = True) -> None:
    """Write one sample's ``{name: tensor}`` as the release's list over `names` (default: `tensor_order`),
    float32 with its own storage, loadable with ``weights_only``. ``durable``: as ``atomic_write``'s."""
    names = tensor_order(list(tensors)) if names is None else tuple(names)
    if not set(tensors) <= set(names):
        raise ValueError(f"tensors {sorted(set(tensors) - set(names))} are not among {list(names)}")
    data = [tensors[n].detach().to("cpu", torch.float32).clone() if n in tensors else None for n in names]
    with naming(path), atomic_write(path, "wb", durable) as f:
        try:
            torch.save(data, f)
        except RuntimeError as e:  # torch.save reports a failed write (a full disk) without errno
            raise OSError(errno.EIO, f"write failed ({str(e).splitlines()[0]})") from None


def read_tensors(path: str | os.PathLike, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of a ``.pt`` sample: a dict, or a release-style list whose entries are named by
    `names` (default: the smallest data class with an embedding that is long enough). As in the
    release, entries past `names` are ignored: a labelled prior's samples serve an unlabelled model."""
    data = load_torch_zip(path)
    if isinstance(data, (list, tuple)):
        if names is None:
            names = min((t for t in DATA_CLASS_TENSORS.values() if "embedding" in t and len(t) >= len(data)),
                        key=len, default=DATA_CLASS_TENSORS["LabelledCLIPDataset"])
        data = {n: t for n, t in zip(names, data) if t is not None}
    if not isinstance(data, dict):
        raise ValueError(f"holds a {type(data).__name__}, expected a list or dict of tensors")
    return data


def obs_path(load_obs_from: str | os.PathLike, seed: int) -> Path:
    """The observation file of a seed: ``<dir>/<seed:06d>.pt``, or under ``--subdirs`` thousands."""
    flat = seed_path(load_obs_from, seed, "pt")
    nested = seed_path(load_obs_from, seed, "pt", subdirs=True)
    return nested if not flat.is_file() and nested.is_file() else flat


def check_obs_files(load_obs_from: str | os.PathLike, seeds: Sequence[int]) -> None:
    """Every seed has its observation file, a regular file (a FIFO would block the reader forever)."""
    if not Path(load_obs_from).is_dir():
        raise GenerateError(f"--load_obs_from: {load_obs_from} is not a directory")
    for seed in seeds:
        path = obs_path(load_obs_from, seed)
        if not path.is_file():
            if os.path.exists(path):
                raise GenerateError(f"--load_obs_from: {path} is not a regular file")
            missing = sum(not obs_path(load_obs_from, s).is_file() for s in seeds)
            more = f" and {missing - 1} more" if missing > 1 else ""
            raise GenerateError(f"--load_obs_from: no observation for seed {seed}: {path} is missing{more}")


def read_observed(load_obs_from: str | os.PathLike, seed: int, structure: Structure,
                  optional: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Read the tensors ``structure`` observes from a seed's ``.pt`` (see the module docstring). Names in
    ``optional`` may be absent."""
    path = obs_path(load_obs_from, seed)
    try:
        data = read_tensors(path, structure.names)
    except Exception as e:  # pickle/zip errors have no common base class
        raise GenerateError(f"--load_obs_from: cannot read {path}: {e}") from None
    out = {}
    for name in structure.observed_names:
        if name not in data:
            if name in optional:
                continue
            raise GenerateError(f"--load_obs_from: {path} has no tensor '{name}' (has {sorted(data)}), "
                                f"which the model is conditioned on")
        t = data[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != structure.shape(name):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise GenerateError(f"--load_obs_from: {path}: '{name}' has shape {shape}, "
                                f"the model expects {structure.shape(name)}")
        t = t.to(torch.float32)
        if not torch.isfinite(t).all() or t.abs().max() > OBS_LIMIT:
            worst = t[~torch.isfinite(t)][0] if not torch.isfinite(t).all() else t.abs().max()
            raise GenerateError(f"--load_obs_from: {path}: '{name}' holds {float(worst):g}; expected finite values "
                                f"within +-{OBS_LIMIT:g} (a prior's samples lie within a few units)")
        out[name] = t
    return out


MARK_COLOUR = (255, 64, 0)


def make_grid(images: Sequence[np.ndarray], cols: int | None = None, *, pad: int = 0,
              mark: int | None = None) -> np.ndarray:
    """Tile (H, W, C) uint8 images row by row; ``cols`` defaults to a near-square layout. ``pad`` pixels
    of black separate the tiles; image ``mark`` gets an orange frame in that gap (variations: the input)."""
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w, c = images[0].shape
    step_h, step_w = h + 2 * pad, w + 2 * pad
    grid = np.zeros((rows * step_h, cols * step_w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        top, left = r * step_h, q * step_w
        if i == mark and pad:
            colour = np.asarray(MARK_COLOUR if c == 3 else [255], dtype=np.uint8)
            grid[top:top + step_h, left:left + step_w] = colour
        grid[top + pad:top + pad + h, left + pad:left + pad + w] = img
    return grid
