"""The original release's optional post-processing of embeddings, as a wrapper embedder.

Options (the release's dataset flags ``--n_clusters`` / ``--n_comp``, plus normalisation):
- ``n_clusters > 0``: k-means on the raw embeddings (scikit-learn's MiniBatchKMeans, as the release),
  each embedding replaced by the one-hot vector of its nearest centre.
- ``n_comp > 0``: PCA (not whitened, as the release's scikit-learn PCA) to ``n_comp`` components.
- ``normalise``: per-dimension ``(x - mean) / (2 std + 1e-8)`` clamped to [-3, 3], the release's formula
  (std 0.5 = EDM's sigma_data). The release computes these statistics on the raw network output; here
  they are computed on what is normalised (after PCA), which is what makes the formula mean anything.
  The release's CLIPDataset never turns it on: CLIP embeddings are used raw by default, here too.

As in the release, clustering excludes normalisation; it also excludes PCA (a combination the release
accepts but cannot run). Everything is fitted once on the dataset's (un-augmented) embeddings,
deterministically for a seed, and cached beside the dataset in a safetensors file. scikit-learn is
imported where k-means is fitted: it is slow to import, and only clustering needs it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from tqdm import tqdm

from vcdm.embedders.base import Embedder, EmbedderError, cached_fit, image_batches, state_fingerprint
from vcdm.embedders.pca import fit_pca

NORMALISED = "(x-mean)/(2*std+1e-8), clamped to [-3,3]"


@dataclass(frozen=True)
class PostProcessOptions:
    """The original release's post-processing: k-means to ``n_clusters`` one-hot codes, PCA to ``n_comp`` components,
    ``normalise`` (see the module docstring); 0 / False: off."""
    n_comp: int = 0
    n_clusters: int = 0
    normalise: bool = False

    @property
    def active(self) -> bool:
        return bool(self.n_comp or self.n_clusters or self.normalise)


@dataclass(frozen=True)
class FitOptions:
    """How an embedder's data-fitted parts are fitted: on ``max_images`` of the data (None: all) chosen
    with ``seed``, embedded ``batch_size`` images at a time, and cached in ``cache_dir`` (None: not
    cached; e.g. ``default_cache_dir(dataset_path)``), where ``data_key`` can name the data version."""
    seed: int = 0
    max_images: int | None = None
    batch_size: int = 100
    cache_dir: str | os.PathLike | None = None
    data_key: str | None = None
    progress: bool = True


class PostProcess(torch.nn.Module):
    """Fitted k-means / PCA / normalisation applied to (B, in_dim) embeddings."""

    def __init__(self, in_dim: int, n_comp: int = 0, n_clusters: int = 0, normalise: bool = False):
        super().__init__()
        if n_comp < 0 or n_clusters < 0:
            raise EmbedderError(f"--n_comp/--n_clusters must be >= 0, got {n_comp}/{n_clusters}")
        if n_clusters and (n_comp or normalise):
            raise EmbedderError("--n_clusters gives one-hot embeddings: "
                                "it cannot be combined with --n_comp or normalisation")
        if n_comp > in_dim:
            raise EmbedderError(f"--n_comp {n_comp} exceeds the embedding dimension {in_dim}")
        self.in_dim, self.n_comp, self.n_clusters, self.normalise = in_dim, n_comp, n_clusters, bool(normalise)
        self.out_dim = n_clusters or n_comp or in_dim
        if n_clusters:
            self.register_buffer("centers", torch.zeros(n_clusters, in_dim))
        if n_comp:
            self.register_buffer("pca_mean", torch.zeros(in_dim))
            self.register_buffer("pca_components", torch.zeros(n_comp, in_dim))
        if normalise:
            self.register_buffer("norm_mean", torch.zeros(self.out_dim))
            self.register_buffer("norm_std", torch.ones(self.out_dim))

    @property
    def active(self) -> bool:
        return bool(self.n_comp or self.n_clusters or self.normalise)

    def options(self) -> dict[str, Any]:
        return {"n_comp": self.n_comp, "n_clusters": self.n_clusters, "normalise": self.normalise}

    def forward(self, x: torch.Tensor, *, normalise: bool = True) -> torch.Tensor:
        if self.n_clusters:
            nearest = torch.cdist(x.float(), self.centers).argmin(1)
            x = torch.nn.functional.one_hot(nearest, self.n_clusters).float()
        if self.n_comp:
            x = (x - self.pca_mean) @ self.pca_components.T
        if self.normalise and normalise:
            x = ((x - self.norm_mean) / (2 * self.norm_std + 1e-8)).clamp(-3, 3)
        return x

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> "PostProcess":
        for key, buf in self.state_dict().items():
            if key not in tensors or tuple(tensors[key].shape) != tuple(buf.shape):
                got = tuple(tensors[key].shape) if key in tensors else "missing"
                raise EmbedderError(f"embedding post-processing state: '{key}' should be {tuple(buf.shape)}, got {got}")
            getattr(self, key).copy_(tensors[key])
        return self

    def fit(self, embeddings: torch.Tensor, seed: int = 0) -> "PostProcess":
        """Fit on (N, in_dim) embeddings, deterministically for `seed`."""
        x = embeddings.detach().to("cpu", torch.float32)
        if self.n_clusters:
            from sklearn.cluster import MiniBatchKMeans
            if len(x) < self.n_clusters:
                raise EmbedderError(f"--n_clusters {self.n_clusters} exceeds the {len(x)} embeddings to cluster")
            km = MiniBatchKMeans(n_clusters=self.n_clusters, random_state=seed, n_init=3).fit(x.numpy())
            self.centers.copy_(torch.from_numpy(km.cluster_centers_))
        if self.n_comp:
            mean, comps, _ = fit_pca([x], self.n_comp)
            self.pca_mean.copy_(mean)
            self.pca_components.copy_(comps)
        if self.normalise:
            y = self(x, normalise=False).double()
            self.norm_mean.copy_(y.mean(0))
            self.norm_std.copy_(y.std(0, unbiased=False))
        return self


class PostProcessed(Embedder):
    """A base embedder followed by PostProcess; its identity covers both."""

    def __init__(self, base: Embedder, post: PostProcess):
        super().__init__(trainable=base.trainable)
        if post.in_dim != base.dim:
            raise EmbedderError(f"post-processing fitted on {post.in_dim}-d embeddings, {base.name} gives {base.dim}-d")
        self.base, self.post = base, post
        self.name, self.dim = base.name, post.out_dim
        self.normalisation = "one-hot" if post.n_clusters else NORMALISED if post.normalise else base.normalisation

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.post(self.base(images))

    def export_state(self) -> dict[str, torch.Tensor]:
        return {**{f"base.{k}": v for k, v in self.base.export_state().items()},
                **{f"post.{k}": v for k, v in self.post.state_dict().items()}}

    def fingerprint(self) -> str:
        return state_fingerprint(self.post.state_dict(), {"base": self.base.fingerprint(), **self.post.options()})

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "post": self.post.options(), "base": self.base.identity()}


def fit_postprocess(base: Embedder, source: Any, options: PostProcessOptions = PostProcessOptions(),
                    fit: FitOptions = FitOptions()) -> Embedder:
    """Wrap `base` with post-processing fitted on the embeddings of `source`'s images (all of them,
    as the release, unless `fit.max_images`). Returns `base` itself when no option is set."""
    post = PostProcess(base.dim, options.n_comp, options.n_clusters, options.normalise)
    if not post.active:
        return base
    base_fp = base.fingerprint()
    key = {"base": base.name, "base_fingerprint": base_fp, **post.options(), "seed": fit.seed,
           "max_images": fit.max_images, "num_images": len(source), "data_key": fit.data_key}

    def run_fit() -> dict[str, torch.Tensor]:
        batches = image_batches(source, batch_size=fit.batch_size, max_images=fit.max_images, seed=fit.seed)
        total = -(-min(len(source), fit.max_images or len(source)) // fit.batch_size)
        with torch.no_grad():
            emb = torch.cat([base.embed(b).cpu() for b in tqdm(batches, total=total, disable=not fit.progress,
                                                               desc=f"embedding for {base.name} post-processing")])
        return post.fit(emb, fit.seed).state_dict()

    stem = f"embed-post-{base.name}-{base_fp[:8]}-c{post.n_comp}-k{post.n_clusters}-n{int(post.normalise)}"
    post.load_state(cached_fit(fit.cache_dir, stem, key, run_fit))
    return PostProcessed(base, post.to(base.device))
