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

from common import add_common_args, machine, result, row, write_json
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
    args = p.parse_args()
    args.count = args.count or (200 if args.quick else 2000)
    info, start = machine("cpu"), time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        t0 = time.perf_counter()
        make_jpegs(tmp / "src", args.count, args.size)
        print(f"generated {args.count} {args.size}x{args.size} JPEGs in {time.perf_counter() - t0:.1f} s")
        rows = []
        for mode, workers in (("serial", 1), ("parallel", args.workers)):
            t0 = time.perf_counter()
            convert_dataset(tmp / "src", tmp / f"{mode}.zip", resolution=(args.resolution, args.resolution),
                            workers=workers, progress=False)
            rows.append((mode, workers, time.perf_counter() - t0))
        identical = (tmp / "serial.zip").read_bytes() == (tmp / "parallel.zip").read_bytes()

    res = f"{args.size}->{args.resolution}"
    print(f"\n{'mode':<10}{'workers':>8}{'images':>8}{'resize':>12}{'seconds':>10}{'images/s':>10}")
    for mode, workers, sec in rows:
        print(f"{mode:<10}{workers:>8}{args.count:>8}{res:>12}{sec:>10.2f}{args.count / sec:>10.1f}")
    print(f"\nspeed-up {rows[0][2] / rows[1][2]:.2f}x on {os.cpu_count()} CPUs; "
          f"outputs byte-identical: {'yes' if identical else 'NO'}")
    if args.json:
        (_, _, serial), (_, workers, parallel) = rows
        note = f"{args.count} JPEGs {res}, outputs {'byte-identical' if identical else 'DIFFER'}"
        write_json(args.json, result("dataset_tool", [
            row("dataset tool, 1 worker", args.count / serial, "images/s", note=note),
            row(f"dataset tool, {workers} workers", args.count / parallel, "images/s",
                reference="dataset tool, 1 worker", ratio=serial / parallel, note=note)],
            info, time.perf_counter() - start))


if __name__ == "__main__":
    main()
