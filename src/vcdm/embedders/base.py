"""The Embedder protocol, fingerprints, compatibility checks and the fit-once cache.

An embedder maps images in [-1, 1] to a float32 vector per image. Its `identity()` is a small JSON
dict recorded in every checkpoint that uses it, so that a prior and an image model trained on
different embedders (other weights, other fit, other post-processing) are never chained by mistake.
Fitted state (PCA bases, cluster centres, …) travels in the checkpoint's ``embedder`` tensor group
via `export_state()`; `vcdm.embedders.load_embedder` rebuilds the embedder from both.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from vcdm.fileio import atomic_write

IDENTITY_FIELDS = ("name", "dim", "normalisation", "post", "fingerprint")


class EmbedderError(ValueError):
    """An embedder that cannot be built, fitted or loaded as asked."""


class EmbedderMismatch(EmbedderError):
    """Two embedder identities (or weights and a recorded identity) that do not agree."""


class Embedder(torch.nn.Module):
    """Base class. Subclasses set `name`, `dim`, `normalisation` and implement `forward` on float32
    images already on the embedder's device; `embed` adds the checks, device moves and no_grad."""

    name: str = ""
    dim: int = 0
    normalisation: str = "none"

    def __init__(self, trainable: bool = False):
        super().__init__()
        self.trainable = trainable

    @property
    def device(self) -> torch.device:
        t = next(itertools.chain(self.parameters(), self.buffers()), None)
        return t.device if t is not None else torch.device("cpu")

    def train(self, mode: bool = True) -> "Embedder":
        return super().train(mode and self.trainable)  # frozen embedders stay in eval mode

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images: float (B, C, H, W) in [-1, 1] → (B, dim) float32 on the embedder's device."""
        if images.ndim != 4:
            raise EmbedderError(f"{self.name}: expected images shaped (B, C, H, W), got {tuple(images.shape)}")
        images = images.to(self.device, torch.float32)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self(images).float()

    def config(self) -> dict[str, Any]:
        """JSON-able constructor options needed to rebuild this embedder (besides its state)."""
        return {}

    def export_state(self) -> dict[str, torch.Tensor]:
        """Tensors for the checkpoint's ``embedder`` group: fitted state only (never frozen
        pretrained weights, which are loaded from their own file and checked by fingerprint)."""
        return {}

    def fingerprint(self) -> str:
        return state_fingerprint(self.export_state(), {"name": self.name, "dim": int(self.dim), **self.config()})

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "dim": int(self.dim), "normalisation": self.normalisation, "post": None,
                "fingerprint": self.fingerprint(), "config": self.config()}


def state_fingerprint(tensors: Mapping[str, torch.Tensor], extra: Any = None) -> str:
    """Short hash of tensors (names, dtypes, shapes, bytes) and of a JSON-able `extra`."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def compatible(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> None:
    """Raise EmbedderMismatch naming every field in which two identities differ."""
    if a is None or b is None:
        if a is None and b is None:
            return
        raise EmbedderMismatch(f"embedders differ: one model uses {(a or b).get('name')!r}, the other none")
    diffs = [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in IDENTITY_FIELDS if a.get(k) != b.get(k)]
    if diffs:
        raise EmbedderMismatch("embedders differ: " + "; ".join(diffs))


def image_batches(source: Any, *, batch_size: int = 100, max_images: int | None = None,
                  seed: int = 0) -> Iterator[torch.Tensor]:
    """Float (b, C, H, W) batches in [-1, 1] from a tensor (N, C, H, W) (uint8, or float in [-1, 1])
    or a map-style dataset whose items are an image or a tuple starting with one (e.g. ImageDataset).

    With `max_images` smaller than the data, a seeded random subset is used (in index order).
    """
    n = len(source)
    if n == 0:
        raise EmbedderError("cannot fit an embedder on an empty dataset")
    if max_images is not None and max_images < n:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values.tolist()
    else:
        idx = list(range(n))
    for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size]
        if isinstance(source, torch.Tensor):
            batch = source[chunk]
        else:
            items = [source[i] for i in chunk]
            batch = torch.stack([torch.as_tensor(it[0] if isinstance(it, (tuple, list)) else it) for it in items])
        yield batch.float() / 127.5 - 1 if batch.dtype == torch.uint8 else batch.float()


def cached_fit(cache_dir: str | os.PathLike | None, stem: str, key: Mapping[str, Any],
               fit: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Return fitted tensors from ``<cache_dir>/<stem>-<hash(key)>.safetensors`` if it holds a fit
    for exactly `key`; otherwise run `fit()` and write its result there atomically. A damaged or
    stale cache file is refitted and replaced. `cache_dir=None` disables caching."""
    if cache_dir is None:
        return fit()
    key_json = json.dumps(dict(key), sort_keys=True)
    path = Path(cache_dir) / f"{stem}-{hashlib.sha256(key_json.encode()).hexdigest()[:12]}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                ok = (f.metadata() or {}).get("vcdm-fit") == key_json
            if ok:
                return load_file(str(path))
        except (SafetensorError, OSError, ValueError):
            pass
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in fit().items()}
    data = save(tensors, metadata={"vcdm-fit": key_json})
    with atomic_write(path, "wb") as f:
        f.write(data)
    return tensors


def default_cache_dir(dataset_path: str | os.PathLike) -> Path:
    """Where fitted embedder state is cached for a dataset: ``<dir>/cache/<dataset name>/`` beside it,
    like the original release's ``datasets/cache/…``."""
    p = Path(dataset_path)
    return p.parent / "cache" / p.stem
