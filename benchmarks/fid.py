"""Inception-v3 feature extraction speed, in images/s, on the available device.

Two numbers from one run: the bare network on an in-memory uint8 batch (the reference), and
vcdm's whole `fid calc` path on the same number of images — PNG decoding through ImageDataset and a
DataLoader, the network, and the float64 mean/covariance sums. The real weights are used when
found (--inception-weights, $VCDM_INCEPTION_WEIGHTS, torch.hub's cache; never downloaded here),
otherwise random weights of the same architecture, which cost exactly the same; the output says which.

    python benchmarks/fid.py                      # CUDA if available, else CPU (small default sizes)
    python benchmarks/fid.py --num 2048 --batch 128 --device cuda
    python benchmarks/fid.py --quick --json out.json  # fewer images on CUDA; the table as JSON
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from common import add_common_args, machine, result, row, synchronize, write_json
from vcdm.data.dataset import ImageDataset
from vcdm.metrics import InceptionFeatures, InceptionWeightsError, compute_stats, resolve_weights
from vcdm.metrics.inception import WEIGHTS_FILE, save_random_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_common_args(parser)
    parser.add_argument("--num", type=int, default=None, help="images [default: 1024 on CUDA (--quick: 256), 16 on CPU]")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=64, help="image size before Inception's resize to 299")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--inception-weights", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    num = args.num or ((256 if args.quick else 1024) if device.type == "cuda" else 16)
    info, start = machine(device), time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        try:
            weights, kind = resolve_weights(args.inception_weights, allow_download=False), "real weights"
        except InceptionWeightsError:
            weights, kind = save_random_weights(Path(tmp) / WEIGHTS_FILE), "RANDOM weights (real file absent; same cost)"
        net = InceptionFeatures(weights).to(device)

        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (num, args.resolution, args.resolution, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            PIL.Image.fromarray(image).save(Path(tmp) / f"{i:06d}.png")
        batches = torch.from_numpy(images).permute(0, 3, 1, 2).split(args.batch)

        net(batches[0][:2].to(device))  # warm-up: cuDNN autotuning, lazy CUDA init
        synchronize(device)
        start = time.perf_counter()
        for batch in batches:
            net(batch.to(device))
        synchronize(device)
        bare = num / (time.perf_counter() - start)

        dataset = ImageDataset(tmp)
        start = time.perf_counter()
        compute_stats(dataset, net, batch=args.batch, device=device, num_workers=args.workers, progress=False)
        synchronize(device)
        full = num / (time.perf_counter() - start)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {kind}; {num} images {args.resolution}x{args.resolution}, batch {args.batch}")
    print(f"bare Inception forward (reference): {bare:8.1f} images/s")
    print(f"vcdm fid pipeline (PNG -> stats):   {full:8.1f} images/s  ({full / bare:.0%} of bare)")
    if args.json:
        note = f"{num} images {args.resolution}x{args.resolution}, batch {args.batch}, {kind.split(' (')[0]}"
        write_json(args.json, result("fid", [
            row("FID features, bare Inception forward", bare, "images/s", note=note),
            row("FID features, vcdm fid pipeline (PNG -> stats)", full, "images/s",
                reference="FID features, bare Inception forward", ratio=full / bare, note=note)],
            info, time.perf_counter() - start))


if __name__ == "__main__":
    main()
