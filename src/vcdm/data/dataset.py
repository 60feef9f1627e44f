"""ImageDataset: images (and optional class labels) from an EDM-format zip or folder.

Semantics follow EDM's ImageFolderDataset: sorted image names, labels from `dataset.json`,
`max_size` picks a seeded random subset (before xflip), `xflip` doubles the dataset with mirrored
copies at indices >= n. Files are read lazily; each DataLoader worker opens its own zip handle.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from vcdm.data.archive import Archive, DatasetError


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8, rounding as EDM's generate.py does; inverts `to_float` exactly."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


class ImageDataset(torch.utils.data.Dataset):
    """`dataset[i]` -> (image uint8 (C, H, W), label float32 one-hot (label_dim,) or shape (0,)).

    Grayscale ('L') files give C = 1, RGB files C = 3; other modes are converted to RGB as the
    dataset tool does. With `use_labels` but no labels in `dataset.json`, label_dim is 0 (as in EDM).
    """

    to_float = staticmethod(to_float)
    to_uint8 = staticmethod(to_uint8)

    def __init__(self, path: str | os.PathLike, *, use_labels: bool = False, max_size: int | None = None,
                 xflip: bool = False, random_seed: int = 0, cache: bool = False):
        self.path = str(path)
        self.archive = Archive(path)
        self.fnames = self.archive.image_names
        if not self.fnames:
            raise DatasetError(f"dataset {path}: no images found")
        self.name = os.path.splitext(os.path.basename(os.path.normpath(self.path)))[0]
        self.image_shape = self._load(0).shape
        self.resolution = self.image_shape[1]
        if self.image_shape[1] != self.image_shape[2]:
            raise DatasetError(f"dataset {path}: images are {self.image_shape[2]}x{self.image_shape[1]}, "
                               "expected square; rebuild it with square images (the dataset tool can resize them)")
        self.num_channels = self.image_shape[0]
        meta = self.archive.read_metadata() if use_labels else {}
        self._labels = self._read_labels(meta) if use_labels else None
        self.class_names: list[str] | None = None  # names of class indices, when dataset.json records them
        if self._labels is None:
            self.label_dim = 0
        elif self._labels.ndim == 1:
            self.label_dim = int(self._labels.max()) + 1
            self.class_names = self.archive.read_class_names(self.label_dim, meta)
        else:
            self.label_dim = self._labels.shape[1]

        idx = np.arange(len(self.fnames), dtype=np.int64)
        if max_size is not None and len(idx) > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(idx)  # EDM's subset for the same seed
            idx = np.sort(idx[:max_size])
        self._raw_idx = np.tile(idx, 2) if xflip else idx
        self._xflip = np.repeat([False, True] if xflip else [False], len(idx))
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    @property
    def has_labels(self) -> bool:
        return self.label_dim > 0

    def _read_labels(self, meta: dict) -> np.ndarray | None:
        """Class indices (int64) or label vectors (float32), one per image; values checked by the archive."""
        labels = self.archive.read_labels(meta)
        if labels is None:
            return None
        missing = [n for n in self.fnames if n not in labels]
        if missing:
            raise DatasetError(f"{self.archive.describe('dataset.json')} has no label for {missing[0]}")
        values = [labels[n] for n in self.fnames]
        return np.array(values, dtype=np.float32 if isinstance(values[0], list) else np.int64)

    def _load(self, raw_idx: int) -> np.ndarray:
        image = np.asarray(self.archive.read_image(self.fnames[raw_idx], keep_gray=True))
        image = image[:, :, None] if image.ndim == 2 else image
        return image.transpose(2, 0, 1)  # HWC -> CHW

    def __len__(self) -> int:
        return len(self._raw_idx)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        raw_idx = int(self._raw_idx[idx])
        image = None if self._cache is None else self._cache.get(raw_idx)
        if image is None:
            image = self._load(raw_idx)
            if image.shape != self.image_shape:
                raise DatasetError(f"{self.archive.describe(self.fnames[raw_idx])} has shape {image.shape} (CHW) but "
                                   f"the first image has {self.image_shape}; rebuild the dataset with images "
                                   "of one size (the dataset tool can resize them)")
            if self._cache is not None:
                self._cache[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return torch.from_numpy(image.copy()), self.get_label(idx)

    def get_label(self, idx: int) -> torch.Tensor:
        """The label of item `idx` as float32: one-hot for integer labels, the vector itself otherwise."""
        if self._labels is None:
            return torch.zeros(0, dtype=torch.float32)
        label = self._labels[self._raw_idx[idx]]
        if self._labels.ndim == 1:
            return torch.nn.functional.one_hot(torch.tensor(int(label)), self.label_dim).to(torch.float32)
        return torch.from_numpy(label.copy())

    def close(self) -> None:
        self.archive.close()

    def __repr__(self) -> str:
        return (f"ImageDataset({self.path!r}: {len(self)} items, {self.num_channels}x{self.resolution}x{self.resolution}, "
                f"label_dim={self.label_dim})")
