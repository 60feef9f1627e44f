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

from common import add_common_args, machine, measure, report, timing_row
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
    parser.add_argument("--reps", type=int, default=None, help="timed passes per case, interleaved (default 3; --quick: 2)")
    args = parser.parse_args()
    args.reps = args.reps or (2 if args.quick else 3)
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

        dataset = ImageDataset(tmp)
        bare, full = "FID features, bare Inception forward", "FID features, vcdm fid pipeline (PNG -> stats)"

        def forward() -> None:
            with torch.no_grad():
                for batch in batches:
                    net(batch.to(device))

        times = measure({bare: forward, full: lambda: compute_stats(dataset, net, batch=args.batch, device=device,
                                                                     num_workers=args.workers, progress=False)},
                        reps=args.reps, warmup=1, device=device)

    print(f"{kind}; {num} images {args.resolution}x{args.resolution}, batch {args.batch}")
    note = f"{num} images {args.resolution}x{args.resolution}, batch {args.batch}, {kind.split(' (')[0]}"
    rows = [timing_row(bare, times[bare], count=num, unit="images/s", note=note),
            timing_row(full, times[full], count=num, unit="images/s", reference=bare,
                       ratio=times[bare].median / times[full].median, note=note)]
    report(args, "fid", rows, info, time.perf_counter() - start)


if __name__ == "__main__":
    main()
