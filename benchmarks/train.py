"""Training throughput (images/s) of the full `vcdm train` loop, with the bare network step as reference.

Models: DDPM++ at 64x64 (EDM's/the release's 64x64 config: cbase 128, cres 1,2,2,2) conditioned on a
pixel-pca embedding, and the dalle2 prior (dim 512, depth 6) over that embedding. The loop number
comes from the run's stats.jsonl (sec/kimg of ticks after the first, one step per tick, maintenance
excluded); the reference times forward + backward + Adam + EMA on random tensors of the same shapes.

    python benchmarks/train.py                      # CPU, and CUDA if available
    python benchmarks/train.py --device cpu --steps 3 --batch 4
    python benchmarks/train.py --quick --json out.json    # 2 timed steps; the table as JSON (run_all.py)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from common import add_common_args, machine, result, row, write_json
from vcdm.data.archive import ArchiveWriter, archive_name, encode_png
from vcdm.train import TrainOptions, train
from vcdm.train.build import build

PCA_DIM = 64


def make_dataset(dest: Path, n: int, res: int) -> Path:
    rng = np.random.default_rng(0)
    with ArchiveWriter(dest) as w:
        for i in range(n):
            img = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
            w.write(archive_name(i), encode_png(PIL.Image.fromarray(img)))
        w.write_labels(None)
    return dest


def options(kind: str, data: Path, out: Path, device: str, batch: int, steps: int) -> TrainOptions:
    common = dict(path=str(data), data_class="CLIPDataset", embedder="pixel-pca", pca_dim=PCA_DIM, device=device,
                  outdir=str(out), seed=0, batch=batch, duration=batch * (steps + 1) / 1e6, tick=batch / 1000,
                  snap=0, dump=0, sample=0, workers=2, lr_rampup=0, augment=0.12)
    if kind == "ddpmpp-64":
        return TrainOptions(**common, exist=[1, 1], observed=[0, 1], arch="ddpmpp", cres=[1, 2, 2, 2])
    return TrainOptions(**common, exist=[0, 1], observed=[0, 0], arch="dalle2", pred_x0=[1])


def loop_rate(opts: TrainOptions) -> float:
    run_dir = train(opts)
    ticks = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()][1:]
    return 1000 / statistics.median(t["sec_per_kimg"] for t in ticks)


def bare_rate(opts: TrainOptions, steps: int) -> float:
    """forward + backward + Adam + EMA of the same denoiser on random data (no data loading, no embedding)."""
    device = torch.device(opts.device)
    torch.manual_seed(0)
    s = build(opts, device)
    net, structure = s.denoiser.net.train(), s.structure
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.randn(opts.batch, structure.latent_dim, device=device)
    y = torch.randn(opts.batch, structure.observed_dim, device=device) if structure.observed_dim else None
    aug = torch.zeros(opts.batch, 9, device=device)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        s.loss_fn(s.denoiser, x, y, aug).sum().backward()
        opt.step()
        with torch.no_grad():
            for k, v in net.state_dict().items():
                ema[k].lerp_(v, 0.001)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return opts.batch / statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement, after one warm-up (default 3; "
                    "--quick: 2)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--models", default="ddpmpp-64,prior", help="comma-separated: ddpmpp-64, prior")
    a = ap.parse_args()
    a.steps = a.steps or (2 if a.quick else 3)
    info, start, rows = machine("cpu"), time.perf_counter(), []
    devices = ["cpu", "cuda"] if a.device == "all" else [a.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "bench-64.zip", n=max(2 * PCA_DIM, a.batch), res=64)
        print(f"{'model':<12s} {'device':<6s} {'batch':>5s} {'loop img/s':>11s} {'bare img/s':>11s} {'loop/bare':>9s}")
        for device in devices:
            for kind in a.models.split(","):
                opts = options(kind, data, Path(tmp) / f"runs-{kind}-{device}", device, a.batch, a.steps)
                sys.stdout, saved = open("/dev/null", "w"), sys.stdout  # the run's own log is not the point here
                try:
                    loop = loop_rate(opts)
                finally:
                    sys.stdout.close()
                    sys.stdout = saved
                bare = bare_rate(opts, a.steps)
                print(f"{kind:<12s} {device:<6s} {a.batch:>5d} {loop:>11.2f} {bare:>11.2f} {loop / bare:>9.2f}", flush=True)
                ref = f"bare training step, {kind} ({device})"
                rows += [row(ref, bare, "images/s", note=f"batch {a.batch}"),
                         row(f"training loop, {kind} ({device})", loop, "images/s", reference=ref, ratio=loop / bare,
                             note=f"batch {a.batch}, {a.steps} timed steps")]
    if a.json:
        write_json(a.json, result("train", rows, info, time.perf_counter() - start))


if __name__ == "__main__":
    main()
