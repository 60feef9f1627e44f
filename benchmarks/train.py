"""Training throughput (images/s) of the full `vcdm train` loop, with the bare network step as reference.

Reference: EDM's bare step (augmentation, loss, backward, Adam, EMA) on random tensors, in float32 and
(for the U-Net) with channels_last and/or bf16 autocast, each from the same initialisation and noise, so
their per-step losses can be compared with float32's (the "losses agree" check). With ``--edm-root`` (a
clone of NVlabs/edm) the same step also runs in EDM's own code (benchmarks/edm.py: its EDMPrecond,
EDMLoss and AugmentPipe, Adam, EMA), and the loop and the bare steps are compared with it too.

Models: DDPM++ at 64x64 (EDM's/the release's 64x64 config: cbase 128, cres 1,2,2,2) conditioned on a
pixel-pca embedding, and the dalle2 prior (dim 512, depth 6) over that embedding. The loop number
comes from the run's stats.jsonl (sec/kimg of ticks after the first, one step per tick, maintenance
excluded); the reference times forward + backward + Adam + EMA on random tensors of the same shapes.

    python benchmarks/train.py                      # CPU, and CUDA if available
    python benchmarks/train.py --device cpu --steps 3 --batch 4
    python benchmarks/train.py --quick --json out.json    # 2 timed steps; the table as JSON (run_all.py)
    python benchmarks/train.py --device cpu --models ddpmpp-64 --edm-root EDM   # ... and NVlabs/edm's own step
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
from denoiser import unzero_init
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


PATHS = {"fp32": (False, False), "channels_last": (True, False), "bf16": (False, True),
         "channels_last+bf16": (True, True)}  # bare-step variants: (channels_last, bf16 autocast)


def bare_steps(opts: TrainOptions, steps: int, channels_last: bool, bf16: bool) -> tuple[float, list[float]]:
    """EDM's bare training step: augmentation, loss, backward, Adam, EMA of the same denoiser on random
    images and embeddings (no data loading, no embedder), from the same initialisation and the same noise
    per step whatever the variant. Returns (images/s over the steps after the first, loss per step)."""
    device = torch.device(opts.device)
    torch.manual_seed(0)
    s = build(opts, device)
    net, structure = unzero_init(s.denoiser.net).train(), s.structure  # so the output depends on every layer
    net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    data = torch.Generator().manual_seed(1)
    images = torch.rand(opts.batch, 3, 64, 64, generator=data).to(device) * 2 - 1
    embedding = torch.randn(opts.batch, PCA_DIM, generator=data).to(device)
    times, losses = [], []
    for i in range(steps + 1):
        gen = torch.Generator(device).manual_seed(100 + i)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        image, aug = s.augment_pipe(images, generator=gen) if s.augment_pipe is not None else (images, None)
        tensors = {"image": image, "embedding": embedding}
        x, y = structure.flatten_latent(tensors), structure.flatten_observed(tensors)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = s.loss_fn(s.denoiser, x, y, aug, generator=gen).float()
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            for k, v in net.state_dict().items():
                ema[k].lerp_(v, 0.001)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
        losses.append(loss.mean().item())
    return opts.batch / statistics.median(times[1:]), losses


def edm_step(edm_root: str, batch: int, steps: int) -> tuple[float, list[float]]:
    """NVlabs/edm's own training step (benchmarks/edm.py) on the CPU: (images/s after the first step, losses)."""
    import edm

    step, times, losses = edm.TrainingStep(edm_root, batch), [], []
    for _ in range(steps + 1):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times[1:]), losses


def path_rows(kind: str, device: str, batch: int, results: dict[str, tuple[float, list[float]]]) -> list[dict]:
    """One row per bare-step variant: images/s vs float32, and how far its losses are from float32's."""
    ref_rate, ref_loss = results["fp32"]
    rows = []
    for name, (rate, losses) in results.items():
        dev = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_loss))
        note = f"batch {batch}; losses {', '.join(f'{v:.4f}' for v in losses)}" + (
            "" if name == "fp32" else f"; max relative loss difference vs fp32 {dev:.2%}")
        rows.append(row(f"bare training step {name}, {kind} ({device})", rate, "images/s",
                        reference=None if name == "fp32" else f"bare training step fp32, {kind} ({device})",
                        ratio=None if name == "fp32" else rate / ref_rate, note=note))
    return rows


def edm_rows(edm_root: str, batch: int, steps: int, loop: float, variants: dict[str, tuple[float, list[float]]]) -> list[dict]:
    """NVlabs/edm's own step, and the vcdm loop and bare steps as ratios of it."""
    rate, losses = edm_step(edm_root, batch, steps)
    ref = "EDM's own training step, ddpmpp-64 (cpu)"
    print(f"  EDM's own step {rate:8.2f} img/s; vcdm loop {loop / rate:.2f}x, "
          + ", ".join(f"bare {n} {r / rate:.2f}x" for n, (r, _) in variants.items()), flush=True)
    rows = [row(ref, rate, "images/s", note=f"NVlabs/edm's EDMPrecond, EDMLoss, AugmentPipe, Adam, EMA; batch {batch}; "
                f"losses {', '.join(f'{v:.4f}' for v in losses)}")]
    rows.append(row("training loop vs EDM's own step, ddpmpp-64 (cpu)", loop, "images/s", reference=ref, ratio=loop / rate))
    rows += [row(f"bare training step {n} vs EDM's own step, ddpmpp-64 (cpu)", r, "images/s", reference=ref, ratio=r / rate)
             for n, (r, _) in variants.items()]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement, after one warm-up (default 3; "
                    "--quick: 2)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--models", default="ddpmpp-64,prior", help="comma-separated: ddpmpp-64, prior")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"bare-step variants for the U-Net: {', '.join(PATHS)}")
    ap.add_argument("--edm-root", default=None, metavar="DIR",
                    help="a clone of NVlabs/edm: also time its own training step for the DDPM++ 64x64 (CPU)")
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
                paths = [p for p in a.paths.split(",") if p] if kind == "ddpmpp-64" else ["fp32"]
                variants = {p: bare_steps(opts, a.steps, *PATHS[p]) for p in ["fp32"] + [p for p in paths if p != "fp32"]}
                bare = variants["fp32"][0]
                print(f"{kind:<12s} {device:<6s} {a.batch:>5d} {loop:>11.2f} {bare:>11.2f} {loop / bare:>9.2f}", flush=True)
                for name, (rate, losses) in variants.items():
                    print(f"  bare {name:<20s} {rate:8.2f} img/s ({rate / bare:.2f}x)  losses "
                          + " ".join(f"{v:.4f}" for v in losses), flush=True)
                ref = f"bare training step fp32, {kind} ({device})"
                rows += path_rows(kind, device, a.batch, variants)
                rows.append(row(f"training loop, {kind} ({device})", loop, "images/s", reference=ref, ratio=loop / bare,
                                note=f"batch {a.batch}, {a.steps} timed steps; loop in its defaults (float32)"))
                if a.edm_root and kind == "ddpmpp-64" and device == "cpu":
                    rows += edm_rows(a.edm_root, a.batch, a.steps, loop, variants)
    if a.json:
        write_json(a.json, result("train", rows, info, time.perf_counter() - start))


if __name__ == "__main__":
    main()
