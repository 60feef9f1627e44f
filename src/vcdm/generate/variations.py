"""unCLIP-style variations: embed real images with the image model's own embedder, then sample images
conditioned on each embedding. One grid PNG per input: the input (as the model sees it, framed in orange)
first, then its variations, tiles a few pixels apart."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import PIL.Image
import torch

from vcdm import perf
from vcdm.data.archive import MAX_IMAGE_PIXELS
from vcdm.distributed import parse_device
from vcdm.generate.core import check_class, check_seeds, denoise, draw, load_guide, load_model, model_embedder
from vcdm.generate.files import make_grid, to_uint8_hwc, write_png
from vcdm.generate.options import (Conditioning, FlagError, GenerateError, InferenceChoices, SamplerOptions,
                                  inference_settings)
from vcdm.paths import check_writable

MAX_TILES = 1024  # variations per input: one grid PNG holds them all


def load_image(path: str | os.PathLike, resolution: int, channels: int) -> np.ndarray:
    """Centre-crop to a square and resize (Lanczos) to the model's resolution → (H, W, C) uint8."""
    try:
        with PIL.Image.open(path) as img:  # reads the header only: the size is known before decoding
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise GenerateError(f"--images: {path} is {img.width}x{img.height} pixels, more than the "
                                    f"{MAX_IMAGE_PIXELS:,} an input image may have")
            img = img.convert("L" if channels == 1 else "RGB")
    except (OSError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError) as e:
        raise GenerateError(f"--images: cannot read {path}: {e}") from None
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), PIL.Image.LANCZOS)
    arr = np.asarray(img)
    return arr[:, :, None] if arr.ndim == 2 else arr


def variations(image_model: str | os.PathLike, images: str | os.PathLike | Sequence[str | os.PathLike],
               seeds: str | Sequence[int], *,
               outdir: str | os.PathLike = "variations", opts: SamplerOptions = SamplerOptions(),
               cond: Conditioning = Conditioning(), max_batch_size: int = 64, device: str | torch.device = "cpu",
               inference: InferenceChoices | perf.InferenceSettings = InferenceChoices()) -> list[Path]:
    """Write ``<outdir>/<input stem>.png`` per input: the input, then one variation per seed. ``cond``: the
    class (``class_idx``) and the embedder's ``clip_weights``; the embedding comes from each input.
    ``inference``: as in ``generate``."""
    if cond.load_obs_from is not None or cond.data_path is not None:
        raise GenerateError("variations condition on the inputs' embeddings, not on samples or a dataset")
    class_idx = cond.class_idx
    check_writable(outdir, "--outdir")
    if isinstance(images, (str, os.PathLike)):  # one input, not a sequence of its characters
        images = [images]
    stems = [Path(p).stem for p in images]
    if len(set(stems)) != len(stems):
        raise GenerateError("--images: two inputs share a file name; their grids would overwrite each other")
    seeds = check_seeds(seeds, max_batch_size, "--n/--seeds")
    if len(seeds) > MAX_TILES:
        raise FlagError(f"--n/--seeds: {len(seeds)} variations per input; at most {MAX_TILES} fit one grid")
    device = parse_device(device)
    model = load_model(image_model, device)
    settings = inference_settings(inference, device, model.denoiser)
    perf.prepare(model.denoiser, settings)
    s = model.structure
    if not model.makes_images or "embedding" not in s.observed_names:
        raise GenerateError(f"--image-model {image_model}: variations need a model of images conditioned on "
                            f"an embedding (it generates {list(s.latent_names)} given {list(s.observed_names)})")
    if set(s.observed_names) - {"embedding", "label"}:
        raise GenerateError(f"--image-model {image_model}: conditioned on {list(s.observed_names)}; "
                            "only an embedding (and a class label) can be supplied")
    check_class(s, class_idx)
    guide = load_guide(model, opts, settings)
    embedder = model_embedder(model, cond.clip_weights, device)
    channels, resolution = s.shape("image")[0], s.shape("image")[-1]
    written = []
    for path, stem in zip(images, stems):
        shown = load_image(path, resolution, channels)
        pixels = torch.from_numpy(shown.copy()).to(device).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            emb = embedder.embed(pixels).float()
        if tuple(emb.shape[1:]) != s.shape("embedding"):
            raise GenerateError(f"{image_model}: its embedder gives shape {tuple(emb.shape[1:])}, "
                                f"the model expects {s.shape('embedding')}")
        tiles = [shown]
        for start in range(0, len(seeds), max_batch_size):
            batch = list(seeds[start:start + max_batch_size])
            latents, obs, rnd = draw(model, batch, device, class_idx=class_idx,
                                     observed={"embedding": emb.expand(len(batch), -1)})
            x = denoise(model, latents, obs, rnd, opts, settings, guide)
            tiles += list(to_uint8_hwc(s.unflatten_latent(x)["image"]))
        out = Path(outdir) / f"{stem}.png"
        write_png(out, make_grid(tiles, pad=max(1, resolution // 32), mark=0))
        written.append(out)
    return written
