"""The demo's data: the UCI handwritten digits that ship with scikit-learn, as EDM-format zips.

Why these images (rather than, e.g., OpenMoji emoji rendered from SVG):
- no download and no new dependency: `sklearn.datasets.load_digits` reads a file inside the
  scikit-learn wheel, which vcdm already needs (embedding post-processing);
- real images (1,797 scans of digits written by 43 people, 8x8, 17 grey levels), not synthetic shapes;
- class labels, so a small classifier trained on the real digits gives an independent feature space
  for a Fréchet distance, an accuracy check, and a way to tell whether samples are recognisable digits;
- tiny, so a CPU trains a prior and an image model to recognisable samples in minutes.

Images are upscaled (bicubic, PIL) to `resolution` (16 by default: the source has 8x8 pixels, so 32x32
would add cost, not information), drawn as dark ink on white and stored as RGB. A fixed, stratified
held-out split (`TEST_PER_CLASS` images of each digit, chosen with a frozen NumPy RandomState) is
never used for training and serves as the real reference in metrics. scikit-learn is imported where
the digits are read: it is slow to import, and the zips, once written, do not need it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from vcdm.data.archive import ArchiveWriter, archive_name, encode_png

SPLITS = ("train", "test")
SPLIT_SEED = 0
TEST_PER_CLASS = 30  # 300 held-out images; 1,497 for training
SOURCE_LEVELS = 16  # load_digits' grey levels run 0..16 (16 = full ink)
DEFAULT_RESOLUTION = 16


def stratified_pick(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `per_class` items of each class, chosen with a frozen NumPy RandomState."""
    rng = np.random.RandomState(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                   for c in range(int(labels.max()) + 1)]))


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Sorted indices of each split: TEST_PER_CLASS images of each digit are test, the rest train."""
    mask = np.zeros(len(labels), bool)
    mask[stratified_pick(labels, TEST_PER_CLASS, SPLIT_SEED)] = True
    return {"train": np.flatnonzero(~mask), "test": np.flatnonzero(mask)}


def load_split(split: str, resolution: int = DEFAULT_RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, resolution, resolution, 3), labels int64 (N,)) of one split."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ValueError(f"digits split: expected one of {', '.join(SPLITS)}, got '{split}'")
    if resolution < 8:
        raise ValueError(f"digits resolution: expected at least 8 (the source is 8x8), got {resolution}")
    digits = load_digits()
    idx = split_indices(digits.target)[split]
    ink = digits.images[idx] / SOURCE_LEVELS  # 0 = paper, 1 = full ink
    gray = np.rint((1 - ink) * 255).astype(np.uint8)
    big = np.stack([np.asarray(PIL.Image.fromarray(g).resize((resolution, resolution), PIL.Image.BICUBIC))
                    for g in gray])
    return np.repeat(big[..., None], 3, axis=3), digits.target[idx].astype(np.int64)


def load_split_tensors(split: str, resolution: int = DEFAULT_RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, R, R), labels int64 (N,)) as torch tensors, the layout ImageDataset yields."""
    images, labels = load_split(split, resolution)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def zip_path(dest_dir: str | os.PathLike, split: str, resolution: int = DEFAULT_RESOLUTION) -> Path:
    return Path(dest_dir) / f"digits-{split}-{resolution}x{resolution}.zip"


def write_digits(dest_dir: str | os.PathLike, resolution: int = DEFAULT_RESOLUTION) -> dict[str, Path]:
    """Write each split as an EDM-format zip with labels in dataset.json; existing zips are kept
    (ArchiveWriter publishes a zip only when complete). Returns {split: path}."""
    paths = {}
    for split in SPLITS:
        path = paths[split] = zip_path(dest_dir, split, resolution)
        if path.is_file():
            continue
        images, labels = load_split(split, resolution)
        with ArchiveWriter(path) as w:
            for i, img in enumerate(images):
                w.write(archive_name(i), encode_png(PIL.Image.fromarray(img, "RGB")))
            w.write_labels([[archive_name(i), int(c)] for i, c in enumerate(labels)])
    return paths
