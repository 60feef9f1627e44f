"""Dataset tool throughput: convert N generated 256x256 JPEGs to 64x64, serial vs parallel.

    python benchmarks/dataset_tool.py [--count 2000] [--workers N] [--quick] [--json out.json]

Both runs write a zip in a temp dir; the table also checks the two zips are byte-identical.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

from common import add_common_args, machine, measure, report, timing_row
from vcdm.data.dataset_tool import convert_dataset


def make_jpegs(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """Smooth random images (upsampled noise plus a gradient), so JPEG decoding costs what photos cost."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 96, size, dtype=np.float32)
    for i in range(count):
        coarse = PIL.Image.fromarray(rng.integers(0, 160, (size // 16, size // 16, 3), dtype=np.uint8))
        img = np.asarray(coarse.resize((size, size), PIL.Image.Resampling.BICUBIC), dtype=np.float32)
        img = img + ramp[None, :, None] + rng.normal(0, 8, img.shape)
        PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--count", type=int, default=None, help="number of JPEGs to generate (default 2000; --quick: 200)")
    p.add_argument("--size", type=int, default=256, help="generated image size (default 256)")
    p.add_argument("--resolution", type=int, default=64, help="output resolution (default 64)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel workers (default: CPU count)")
    p.add_argument("--reps", type=int, default=None, help="timed conversions per mode, interleaved (default 3; --quick: 2)")
    args = p.parse_args()
    args.count = args.count or (200 if args.quick else 2000)
    args.reps = args.reps or (2 if args.quick else 3)
    info, start = machine("cpu"), time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        t0 = time.perf_counter()
        make_jpegs(tmp / "src", args.count, args.size)
        print(f"generated {args.count} {args.size}x{args.size} JPEGs in {time.perf_counter() - t0:.1f} s")

        def convert(mode: str, workers: int):
            return lambda: convert_dataset(tmp / "src", tmp / f"{mode}.zip", resolution=(args.resolution, args.resolution),
                                           workers=workers, overwrite=True, progress=False)

        serial, parallel = "dataset tool, 1 worker", f"dataset tool, {args.workers} workers"
        times = measure({serial: convert("serial", 1), parallel: convert("parallel", args.workers)},
                        reps=args.reps, warmup=0)
        identical = (tmp / "serial.zip").read_bytes() == (tmp / "parallel.zip").read_bytes()

    note = (f"{args.count} JPEGs {args.size}->{args.resolution}, outputs "
            f"{'byte-identical' if identical else 'DIFFER'}")
    rows = [timing_row(serial, times[serial], count=args.count, unit="images/s", note=note),
            timing_row(parallel, times[parallel], count=args.count, unit="images/s", reference=serial,
                       ratio=times[serial].median / times[parallel].median, note=note)]
    report(args, "dataset_tool", rows, info, time.perf_counter() - start)


if __name__ == "__main__":
    main()
