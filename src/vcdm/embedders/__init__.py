"""Embedders: images in [-1, 1] → (B, D) float32 vectors that the prior models and the image model
is conditioned on.

- ``clip-vit-b32``: the paper's embedder (CLIP ViT-B/32 image tower, local weights; see clip.py).
- ``dinov2-vitb14``: DINOv2 ViT-B/14's class token (768-d, local weights; see dinov2.py), the representation
  recent representation-conditioned diffusion work uses.
- ``pixel-pca``: needs no download; fitted on the training set and stored with the run (see pca.py).
  For CPU/offline use and the demo; it is not what the paper's results use.
Either may be followed by the original release's post-processing (``n_comp``, ``n_clusters``, ``normalise``).

A checkpoint records ``embedder.identity()`` in its config and ``embedder.export_state()`` in its
``embedder`` tensor group; `load_embedder` rebuilds the embedder from the two (the config checked
against the tensors' shapes on the meta device first, so that a config asking for more than the file
holds allocates nothing) and `compatible` refuses to chain models whose identities differ.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import torch

from vcdm.embedders.base import (Embedder, EmbedderError, EmbedderMismatch, compatible, default_cache_dir,
                                 image_batches)
from vcdm.embedders.clip import CLIPEmbedder, ClipWeightsError
from vcdm.embedders.dinov2 import DINOv2Embedder, DINOv2WeightsError
from vcdm.embedders.pca import PixelPCA
from vcdm.embedders.postprocess import FitOptions, PostProcess, PostProcessed, PostProcessOptions, fit_postprocess

EMBEDDERS = ("clip-vit-b32", "pixel-pca", "dinov2-vitb14")
PRETRAINED = {"clip-vit-b32": 512, "dinov2-vitb14": 768}  # frozen pretrained embedders and their sizes
WEIGHTS_NAME = {"clip-vit-b32": "CLIP", "dinov2-vitb14": "DINOv2"}
Fitted = TypeVar("Fitted", PixelPCA, PostProcess)

__all__ = ["EMBEDDERS", "PRETRAINED", "CLIPEmbedder", "ClipWeightsError", "DINOv2Embedder", "DINOv2WeightsError", "Embedder", "EmbedderError", "EmbedderMismatch",
           "FitOptions", "PCAOptions", "PixelPCA", "PostProcess", "PostProcessOptions", "PostProcessed",
           "build_embedder", "compatible", "default_cache_dir", "fit_postprocess", "image_batches", "load_embedder"]


@dataclass(frozen=True)
class PCAOptions:
    """pixel-pca's options: ``dim`` components of the images resized to ``size`` x ``size``, ``whiten``ed
    (see pca.py)."""
    dim: int = 64
    size: int = 16
    whiten: bool = True


def build_embedder(name: str, *, data: Any = None, clip_weights: str | os.PathLike | None = None,
                   trainable: bool = False, pca: PCAOptions = PCAOptions(),
                   post: PostProcessOptions = PostProcessOptions(), fit: FitOptions = FitOptions(),
                   device: str | torch.device = "cpu") -> Embedder:
    """Build (and, where needed, fit on `data`) an embedder for training.

    `clip_weights` is the pretrained embedder's weights file (--clip-weights, alias --embedder-weights): CLIP
    ViT-B/32's (else $VCDM_CLIP_WEIGHTS, see clip.py) or DINOv2 ViT-B/14's (else $VCDM_DINOV2_VITB14_WEIGHTS,
    see dinov2.py); `trainable` is the original release's --train_embedder (CLIP only). pixel-pca uses `pca`. `post` adds the release's post-processing. Fitting uses `data`
    (a dataset or image tensor; see `image_batches`) as `fit` says (subset, seed, cache).
    """
    if name not in EMBEDDERS:
        raise EmbedderError(f"unknown embedder '{name}'; choose one of {', '.join(EMBEDDERS)}")
    if data is None and (post.active or name == "pixel-pca"):
        raise EmbedderError(f"embedder '{name}'{' with post-processing' if post.active else ''} is fitted on the "
                            f"training data, but no data was given")
    if name == "clip-vit-b32":
        base: Embedder = CLIPEmbedder.from_file(clip_weights, trainable=trainable, device=device)
    elif name == "dinov2-vitb14":
        if trainable:
            raise EmbedderError("--train_embedder: dinov2-vitb14 is frozen (only clip-vit-b32 can be trained)")
        base = DINOv2Embedder.from_file(clip_weights, device=device)
    else:
        base = PixelPCA.fit(data, dim=pca.dim, size=pca.size, whiten=pca.whiten, seed=fit.seed,
                            max_images=fit.max_images, cache_dir=fit.cache_dir, data_key=fit.data_key).to(device)
    if not post.active:
        return base
    return fit_postprocess(base, data, post, fit)


def load_embedder(identity: Mapping[str, Any] | None, tensors: Mapping[str, torch.Tensor] | None, *,
                  clip_weights: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu") -> Embedder | None:
    """Rebuild the embedder a checkpoint recorded (`identity` from its config, `tensors` from its
    ``embedder`` group). Raises EmbedderMismatch if the result's fingerprint differs from the
    recorded one (e.g. other CLIP weights than those the model was trained with)."""
    if identity is None:
        return None
    if not isinstance(identity, Mapping) or not isinstance(identity.get("config") or {}, Mapping):
        raise EmbedderError(f"the recorded embedder identity is malformed: {str(identity)[:200]}")
    tensors = dict(tensors or {})
    name, config = identity.get("name"), dict(identity.get("config") or {})
    if identity.get("post"):
        base = load_embedder(identity["base"], _sub(tensors, "base."), clip_weights=clip_weights, device=device)
        options = identity["post"]
        if not isinstance(options, Mapping):
            raise EmbedderError(f"embedder identity: 'post' is {type(options).__name__}, expected a mapping")
        post = _fitted(lambda: PostProcess(base.dim, **options), _sub(tensors, "post."), "post-processing")
        embedder: Embedder = PostProcessed(base, post.to(base.device))
    elif name == "clip-vit-b32":
        trained = _sub(tensors, "visual.")
        if trained:
            embedder = CLIPEmbedder(trained, trainable=bool(config.get("trainable"))).to(device)
        else:
            embedder = CLIPEmbedder.from_file(clip_weights, trainable=bool(config.get("trainable")), device=device)
    elif name == "dinov2-vitb14":
        embedder = DINOv2Embedder.from_file(clip_weights, device=device)
    elif name == "pixel-pca":
        try:
            options = int(identity["dim"]), int(config["size"]), int(config["channels"]), bool(config["whiten"])
        except (KeyError, TypeError, ValueError) as e:
            raise EmbedderError(f"pixel-pca identity lacks its options ({e}): {str(dict(identity))[:200]}") from None
        embedder = _fitted(lambda: PixelPCA(*options), tensors, "pixel-pca").to(device)
    else:
        raise EmbedderError(f"checkpoint records unknown embedder {name!r}; this vcdm knows {', '.join(EMBEDDERS)}")
    if identity.get("fingerprint") and embedder.fingerprint() != identity["fingerprint"]:
        what = f"the {WEIGHTS_NAME[name]} weights found" if name in PRETRAINED and not tensors else "the stored embedder state"
        raise EmbedderMismatch(f"{what} (fingerprint {embedder.fingerprint()}) differ from those the model was "
                               f"trained with ({identity['fingerprint']})")
    return embedder


def _fitted(build: Callable[[], Fitted], tensors: Mapping[str, torch.Tensor], what: str) -> Fitted:
    """``build()`` loaded with ``tensors``, its recorded options first checked against the tensors' shapes
    on the meta device (a 180 KB file whose config says ``size`` 12000 asked for 16 GB)."""
    try:
        with torch.device("meta"):
            build().load_state(tensors)
    except EmbedderError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise EmbedderError(f"{what}: the recorded options do not build it ({str(e)[:200]})") from None
    return build().load_state(tensors)


def _sub(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
