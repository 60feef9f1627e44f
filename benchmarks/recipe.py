"""EDM's and EDM2's training recipes on the demo digits, for the 64x64 two-stage defaults.

For each configuration (network, recipe, learning rate) the script trains the demo's model on the UCI
digits (16x16, pixel-PCA embeddings, as `vcdm demo`) for the same number of images, then scores it by
one yardstick for every recipe: EDM's weighted denoising error on the 300 held-out digits, with EDM's
noise levels and the same noise draws for every model (lower is better; the image model is given each
held-out digit's true embedding). Each run is scored twice: the trained network itself (from its last
training state), which compares loss, optimiser and schedule alone, and the recipe's EMA snapshot
(EDM's half-life EMA; for edm2 the 0.100 power-function profile). It measures how fast each recipe
learns at this scale, not sample quality: `benchmarks/quality.py` measures FD, at far greater cost.

    python benchmarks/recipe.py                                  # 1 kimg each, seeds 0,1 (results/recipe-digits.md)
    python benchmarks/recipe.py --kimg 16 --only prior           # the priors, longer
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import add_common_args, machine, report, row
from vcdm.checkpoints import load_checkpoint
from vcdm.data import digits
from vcdm.demo.budget import Sizes
from vcdm.demo.training import train_options
from vcdm.diffusion.loss import EDMLoss
from vcdm.embedders import load_embedder
from vcdm.train import train
from vcdm.train.state import STATE_RE, load_state

SIZES = Sizes()
# (name, demo model kind, overrides of the demo's options: its U-Net sizes cbase 32, cres 1,2 stay)
CONFIGS = [
    ("ddpmpp, edm recipe, lr 2e-3 (demo)", "image", {}),
    ("ddpmpp, edm2 recipe, lr 2e-3", "image", {"recipe": "edm2"}),
    ("edm2-img64-xs (cbase 32), edm2 recipe, lr 1.2e-2 (preset)", "image",
     {"arch": "edm2-img64-xs", "recipe": "edm2", "lr": None}),
    ("edm2-img64-xs (cbase 32), edm2 recipe, lr 3e-3", "image", {"arch": "edm2-img64-xs", "recipe": "edm2", "lr": 3e-3}),
    ("prior (dalle2), edm recipe, lr 1e-3 (demo)", "prior", {}),
    ("prior (dalle2), edm2 recipe, lr 1e-3", "prior", {"recipe": "edm2"}),
]


def heldout_error(snapshot: Path, kind: str, images: torch.Tensor, net_state: dict | None = None,
                  draws: int = 16) -> float:
    """EDM's weighted denoising error of a snapshot (or of `net_state` in its network) on held-out digits,
    with the same noise for every model."""
    denoiser, config, tensors = load_checkpoint(snapshot)
    if net_state is not None:
        denoiser.net.load_state_dict(net_state)
    denoiser.eval()
    embedder = load_embedder(config.embedder, tensors.get("embedder"))
    x = images.float() / 127.5 - 1
    with torch.no_grad():
        emb = embedder.embed(x)
        data, cond = (emb, None) if kind == "prior" else (x.flatten(1), emb)
        gen = torch.Generator().manual_seed(0)
        return statistics.mean(EDMLoss()(denoiser, data, cond, generator=gen).mean().item() for _ in range(draws))


def run_one(name: str, kind: str, overrides: dict, seed: int, kimg: float, data: Path, outdir: Path,
            images: torch.Tensor) -> tuple[float, float, float]:
    """(held-out error of the network, of its EMA, training seconds) of one configuration and seed."""
    opts = train_options(kind, data, outdir, SIZES, seed=seed, device="cpu")
    opts.duration, opts.lr_rampup, opts.tick = kimg / 1000, 0.05 * kimg, kimg
    for key, value in overrides.items():
        setattr(opts, key, value)
    start = time.perf_counter()
    run_dir = train(opts)
    seconds = time.perf_counter() - start
    snapshot = max(run_dir.glob("network-snapshot-*.safetensors"))  # for edm2's profiles, the 0.100 one
    state = load_state(max(p for p in run_dir.glob("training-state-*.pt") if STATE_RE.fullmatch(p.name)))
    return heldout_error(snapshot, kind, images, state["net"]), heldout_error(snapshot, kind, images), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kimg", type=float, default=1.0, help="training images per run, in thousands [1]")
    p.add_argument("--seeds", default="0,1", help="training seeds [0,1]")
    p.add_argument("--only", default="", help="run only the configurations whose name contains this")
    add_common_args(p)
    args = p.parse_args()
    torch.set_num_threads(1)
    info, start = machine(), time.perf_counter()
    rows, demo = [], {}  # demo: the first configuration of each kind, per seed (the reference)
    with tempfile.TemporaryDirectory() as tmp:
        paths = digits.write_digits(tmp, SIZES.resolution)
        images, _ = digits.load_split_tensors("test", SIZES.resolution)
        for name, kind, overrides in CONFIGS:
            if args.only not in name:
                continue
            for seed in [int(s) for s in args.seeds.split(",")]:
                *errors, seconds = run_one(name, kind, overrides, seed, args.kimg, paths["train"],
                                           Path(tmp) / f"run{len(rows)}", images)
                for which, error in zip(("network", "EMA"), errors):
                    metric = f"{name}, {which}, seed {seed}"
                    ref = demo.setdefault((kind, which, seed), (metric, error))
                    rows.append(row(metric, error, "held-out EDM loss", reference=ref[0], ratio=error / ref[1],
                                    note=f"{args.kimg:g} kimg in {seconds:.0f} s"))
                    print(f"{metric:<85} {error:.4f}  x{error / ref[1]:.3f}  ({rows[-1]['note']})", flush=True)
    report(args, "recipe", rows, info, time.perf_counter() - start, kimg=args.kimg)


if __name__ == "__main__":
    sys.exit(main())
