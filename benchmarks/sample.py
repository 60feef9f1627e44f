"""Two-stage sampling speed: the default prior (dalle2) + a DDPM++ 64x64 image model, random weights.

    python benchmarks/sample.py [--images 8] [--steps 2] [--device cpu]

Runs both stages exactly as `vcdm sample` does (per-seed noise, files written) with few Heun steps,
then extrapolates linearly in network evaluations to the original release's 40 steps (79 evaluations
per stage). Reference row: one image-model evaluation at the same batch size, timed on its own.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from vcdm.checkpoints import save_checkpoint
from vcdm.data.structure import Structure
from vcdm.generate import SamplerOptions, generate, load_model
from vcdm.nets import build_network
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import preset

EMBED_DIM = 512  # CLIP ViT-B/32


def write_model(path: Path, arch: str, exist: str, observed: str) -> Path:
    structure = Structure.from_flags({"image": (3, 64, 64), "embedding": (EMBED_DIM,)}, exist, observed)
    cls, kwargs = preset(arch, resolution=64, channels=3, embed_dim=EMBED_DIM, label_dim=structure.observed_dim,
                         augment_dim=0)
    net = build_network(cls, kwargs)
    denoiser = Denoiser(net, structure)
    config = {"network": {"class": cls, "kwargs": kwargs}, "denoiser": denoiser.config(),
              "structure": structure.to_dict(), "embedder": None, "data": {}, "training": {}}
    save_checkpoint(path, {"net": net.state_dict()}, config)
    return path


def evals(steps: int) -> int:
    return 2 * steps - 1  # Heun: two evaluations per step, Euler on the last


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8, help="images to sample (default 8, one batch)")
    p.add_argument("--steps", type=int, default=2, help="Heun steps per stage (default 2; the seed uses 40)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = p.parse_args()
    device = torch.device(args.device)
    opts = SamplerOptions(num_steps=args.steps, S_churn=50, S_noise=1.007)
    seeds = list(range(args.images))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        prior = load_model(write_model(tmp / "prior.safetensors", "dalle2", "0,1", "0,0"), device)
        image = load_model(write_model(tmp / "image.safetensors", "ddpmpp", "1,1", "0,1"), device)
        run = dict(opts=opts, max_batch_size=args.images, device=device, progress=False)
        generate(prior, seeds[:1], outdir=tmp / "warm-emb", **run)  # first-call overheads out of the timings
        generate(image, seeds[:1], outdir=tmp / "warm-img", load_obs_from=tmp / "warm-emb", **run)

        t0 = time.perf_counter()
        emb = generate(prior, seeds, outdir=tmp / "emb", **run)
        t1 = time.perf_counter()
        generate(image, seeds, outdir=tmp / "img", load_obs_from=emb.outdir, **run)
        t2 = time.perf_counter()
        x = torch.randn(args.images, image.structure.latent_dim, device=device)
        y = torch.randn(args.images, EMBED_DIM, device=device)
        with torch.no_grad():
            t3 = time.perf_counter()
            image.denoiser(x, torch.tensor(1.0, device=device), y)
            one_eval = time.perf_counter() - t3

    prior_s, image_s = t1 - t0, t2 - t1
    scale = evals(40) / evals(args.steps)
    params = {m: sum(p.numel() for p in model.denoiser.parameters()) / 1e6 for m, model in (("prior", prior), ("image", image))}
    print(f"device {device}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {args.images} images, "
          f"batch {args.images}; prior {params['prior']:.1f} M params, DDPM++ 64x64 {params['image']:.1f} M params")
    print(f"\n{'stage':<26}{'steps':>6}{'evals':>7}{'seconds':>10}{'images/s':>10}{'share':>8}")
    for name, sec in (("prior (embeddings)", prior_s), ("image model", image_s), ("two-stage", prior_s + image_s)):
        print(f"{name:<26}{args.steps:>6}{evals(args.steps):>7}{sec:>10.2f}{args.images / sec:>10.3f}"
              f"{sec / (prior_s + image_s):>8.1%}")
    total40 = (prior_s + image_s) * scale
    print(f"{'two-stage, 40 steps (extr.)':<26}{40:>6}{evals(40):>7}{total40:>10.1f}{args.images / total40:>10.4f}"
          f"{'':>8}")
    print(f"\nreference: one image-model evaluation at batch {args.images}: {one_eval:.2f} s "
          f"(x {evals(args.steps)} evaluations = {one_eval * evals(args.steps):.2f} s of the image stage's {image_s:.2f} s)")
    print(f"time in the prior: {prior_s / (prior_s + image_s):.1%} (measured; the share is the same at 40 steps, "
          "as both stages scale with their evaluation count)")


if __name__ == "__main__":
    main()
