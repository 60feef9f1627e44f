"""Turn a data batch into the named tensors a model sees, then into (x, y, augment_labels).

image uint8 → float [-1, 1] → augmentation (AugmentPipe) → embedding = embedder(augmented image),
as the original release does, so the conditioning matches what the network sees → label (one-hot)
→ Structure.flatten → x (latents), y (observed). Without augmentation, embeddings may come from a
precomputed per-index table (`cached`) instead of running the embedder.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from vcdm import distributed as dist
from vcdm.data.dataset import to_float
from vcdm.data.structure import Structure
from vcdm.embedders.base import cached_fit, image_batches
from vcdm.train.outputs import TrainingError, write_failure


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor | None
    augment_labels: torch.Tensor | None
    tensors: dict[str, torch.Tensor]


class BatchMaker:
    def __init__(self, structure: Structure, device: torch.device, *, embedder=None, augment_pipe=None,
                 cached: torch.Tensor | None = None):
        if cached is not None and augment_pipe is not None:
            raise ValueError("cached embeddings are only valid without augmentation")
        self.structure, self.device = structure, device
        self.embedder, self.augment_pipe, self.cached = embedder, augment_pipe, cached
        self.used = {n for n, e in zip(structure.names, structure.exist) if e}

    def tensors(self, indices: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Named tensors (only those the model uses) and the augment labels."""
        image = to_float(images.to(self.device, non_blocking=True))
        augment_labels = None
        if self.augment_pipe is not None:
            image, augment_labels = self.augment_pipe(image, generator=generator)
        out = {}
        if "image" in self.used:
            out["image"] = image
        if "embedding" in self.used:
            if self.cached is not None:
                out["embedding"] = self.cached[indices.to(self.cached.device)].to(self.device)
            else:
                out["embedding"] = self.embedder.embed(image).to(self.device)
        if "label" in self.used:
            out["label"] = labels.to(self.device, torch.float32)
        return out, augment_labels

    def __call__(self, indices: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> Batch:
        tensors, augment_labels = self.tensors(indices, images, labels, generator)
        return Batch(self.structure.flatten_latent(tensors), self.structure.flatten_observed(tensors),
                     augment_labels, tensors)


def embedding_table(setup, device: torch.device, xflip: bool) -> torch.Tensor:
    """Embeddings of every dataset image (no augmentation), computed once and cached beside the dataset
    (process 0 computes, the others then read its cache). A cache that cannot be written stops the run."""
    emb, key = setup.embedder, {"embedder": setup.embedder.identity(), "data_key": setup.data_key, "xflip": xflip}

    def compute() -> dict[str, torch.Tensor]:
        # Once per dataset and embedder, and long on a large one (CLIP: hours on ImageNet): show progress.
        where = f"the cache in {cache_dir}" if cache_dir is not None else "this run (no writable cache folder)"
        out = []
        with torch.no_grad(), tqdm(total=len(setup.dataset), unit="img", desc=f"Embedding the dataset for {where}",
                                   file=sys.stderr) as bar:
            for b in image_batches(setup.dataset, batch_size=64):
                out.append(emb.embed(b.to(device)).cpu())
                bar.update(len(b))
        return {"embeddings": torch.cat(out)}

    if dist.rank() != 0:
        dist.barrier()
    cache_dir = setup.cache_dir if _writable_dir(setup.cache_dir) else None
    try:
        table = cached_fit(cache_dir, f"embeddings-{emb.name}", key, compute)["embeddings"]
    except OSError as e:
        raise TrainingError(f"cannot write the embedding cache in {cache_dir} ({write_failure(e, setup.cache_dir)}); "
                            f"free space there or train with --embed-cache=0") from None
    if dist.rank() == 0:
        dist.barrier()
    return table.to(device)


def _writable_dir(path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        return True
    except OSError:
        return False
