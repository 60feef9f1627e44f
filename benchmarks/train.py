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
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image
import torch

import edm
from common import Timing, add_common_args, machine, measure, measure_one, report, timing_row
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


def loop_timing(opts: TrainOptions) -> Timing:
    """Seconds per step of the whole loop, from its stats.jsonl: one step per tick, the first tick (warm-up)
    left out, maintenance excluded by the loop's own clock."""
    run_dir = train(opts)
    ticks = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()][1:]
    return Timing(tuple(t["sec_per_kimg"] * opts.batch / 1000 for t in ticks))


PATHS = {"fp32": (False, False), "channels_last": (True, False), "bf16": (False, True),
         "channels_last+bf16": (True, True)}  # bare-step variants: (channels_last, bf16 autocast)


def bare_step(opts: TrainOptions, channels_last: bool, bf16: bool) -> tuple[Callable[[], None], list[float]]:
    """EDM's bare training step: augmentation, loss, backward, Adam, EMA of the same denoiser on random
    images and embeddings (no data loading, no embedder), from the same initialisation and the same noise
    per step whatever the variant. Returns the step (each call one step) and the list its losses go to."""
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
    losses: list[float] = []

    def step() -> None:
        gen = torch.Generator(device).manual_seed(100 + len(losses))
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
        losses.append(loss.mean().item())

    return step, losses


def bare_steps(opts: TrainOptions, steps: int, variants: list[str]) -> dict[str, tuple[Timing, list[float]]]:
    """The bare step of each variant (names in PATHS), `steps` timed steps each after one warm-up step,
    interleaved: (Timing, loss per step, the warm-up's first) per variant."""
    cases, losses = {}, {}
    for name in variants:
        cases[name], losses[name] = bare_step(opts, *PATHS[name])
    times = measure(cases, reps=steps, warmup=1, device=opts.device)
    return {name: (times[name], losses[name]) for name in variants}


def edm_step(edm_root: str, batch: int, steps: int) -> tuple[Timing, list[float]]:
    """NVlabs/edm's own training step (benchmarks/edm.py) on the CPU: (Timing after one warm-up step, losses)."""
    step, losses = edm.TrainingStep(edm_root, batch), []
    return measure_one(lambda: losses.append(step()), reps=steps, warmup=1), losses


def path_rows(kind: str, device: str, batch: int, results: dict[str, tuple[Timing, list[float]]]) -> list[dict]:
    """One row per bare-step variant: images/s vs float32, and how far its losses are from float32's."""
    ref_time, ref_loss = results["fp32"]
    rows = []
    for name, (timing, losses) in results.items():
        dev = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_loss))
        note = f"batch {batch}; losses {', '.join(f'{v:.4f}' for v in losses)}" + (
            "" if name == "fp32" else f"; max relative loss difference vs fp32 {dev:.2%}")
        rows.append(timing_row(f"bare training step {name}, {kind} ({device})", timing, count=batch, unit="images/s",
                               reference=None if name == "fp32" else f"bare training step fp32, {kind} ({device})",
                               ratio=None if name == "fp32" else ref_time.median / timing.median, note=note))
    return rows


def edm_rows(edm_root: str, batch: int, steps: int, loop: Timing,
             variants: dict[str, tuple[Timing, list[float]]]) -> list[dict]:
    """NVlabs/edm's own step, and the vcdm loop and bare steps as ratios of it (of medians)."""
    edm_time, losses = edm_step(edm_root, batch, steps)
    ref = "EDM's own training step, ddpmpp-64 (cpu)"
    print(f"  EDM's own step {batch / edm_time.median:8.2f} img/s; vcdm loop {edm_time.median / loop.median:.2f}x, "
          + ", ".join(f"bare {n} {edm_time.median / t.median:.2f}x" for n, (t, _) in variants.items()), flush=True)
    rows = [timing_row(ref, edm_time, count=batch, unit="images/s",
                       note=f"NVlabs/edm's EDMPrecond, EDMLoss, AugmentPipe, Adam, EMA; batch {batch}; "
                       f"losses {', '.join(f'{v:.4f}' for v in losses)}")]
    rows.append(timing_row("training loop vs EDM's own step, ddpmpp-64 (cpu)", loop, count=batch, unit="images/s",
                           reference=ref, ratio=edm_time.median / loop.median))
    rows += [timing_row(f"bare training step {n} vs EDM's own step, ddpmpp-64 (cpu)", t, count=batch, unit="images/s",
                        reference=ref, ratio=edm_time.median / t.median)
             for n, (t, _) in variants.items()]
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
                    loop = loop_timing(opts)
                finally:
                    sys.stdout.close()
                    sys.stdout = saved
                paths = [p for p in a.paths.split(",") if p] if kind == "ddpmpp-64" else ["fp32"]
                variants = bare_steps(opts, a.steps, ["fp32"] + [p for p in paths if p != "fp32"])
                bare = variants["fp32"][0]
                print(f"{kind:<12s} {device:<6s} {a.batch:>5d} {a.batch / loop.median:>11.2f} "
                      f"{a.batch / bare.median:>11.2f} {bare.median / loop.median:>9.2f}", flush=True)
                ref = f"bare training step fp32, {kind} ({device})"
                rows += path_rows(kind, device, a.batch, variants)
                rows.append(timing_row(f"training loop, {kind} ({device})", loop, count=a.batch, unit="images/s",
                                       reference=ref, ratio=bare.median / loop.median,
                                note=f"batch {a.batch}, {a.steps} timed steps; loop in its defaults "
                                "(precision: vcdm.perf.training_precision)"))
                if a.edm_root and kind == "ddpmpp-64" and device == "cpu":
                    rows += edm_rows(a.edm_root, a.batch, a.steps, loop, variants)
    report(a, "train", rows, info, time.perf_counter() - start)


if __name__ == "__main__":
    main()
