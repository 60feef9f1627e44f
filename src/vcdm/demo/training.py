"""Training the demo's models with the real training loop (vcdm.train), for a planned wall-clock time."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from vcdm.demo.budget import SMOKE, Sizes, fmt_time, plan_kimg, say
from vcdm.train import train
from vcdm.train.options import TrainOptions

NEVER = 10**9  # --snap/--dump/--sample interval that leaves only the first and the last tick
MIN_LEG_SEC = 1.0  # a run whose budget is already spent (a slow, busy machine) still trains a step and saves


def train_options(kind: str, data_path: str | os.PathLike, outdir: str | os.PathLike, sizes: Sizes, *,
                  seed: int, device: str) -> TrainOptions:
    """Options of one demo training run: kind 'prior' (embeddings), 'image' (images given embeddings)
    or 'uncond' (images, no conditioning). Written into `outdir` itself; only the first and the last
    tick save a snapshot, a training state and a sample grid. `train_for` sets the length."""
    common = dict(path=str(data_path), outdir=str(outdir), nosubdir=True, batch=sizes.batch, augment=0.0,
                  dropout=0.0, seed=seed, device=device, workers=0, snap=NEVER, dump=NEVER, sample=NEVER)
    if kind == "prior":
        return TrainOptions(data_class="CLIPDataset", exist=[0, 1], observed=[0, 0], embedder="pixel-pca",
                            pca_dim=sizes.pca_dim, arch="dalle2", pred_x0=[1], prior_dim=sizes.prior_dim,
                            prior_depth=sizes.prior_depth, lr=sizes.prior_lr, **common)
    unet = dict(arch="ddpmpp", cbase=sizes.cbase, cres=list(sizes.cres), lr=sizes.image_lr)
    if kind == "image":
        return TrainOptions(data_class="CLIPDataset", exist=[1, 1], observed=[0, 1], embedder="pixel-pca",
                            pca_dim=sizes.pca_dim, **unet, **common)
    if kind == "uncond":
        return TrainOptions(data_class="ImageFolderDataset", exist=[1, 0], observed=[0, 0], **unet, **common)
    raise ValueError(f"unknown demo model kind '{kind}'")


def read_stats(run_dir: Path) -> list[dict[str, Any]]:
    """The tick records of a training run (its stats.jsonl)."""
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines() if line.strip()]


def train_run(opts: TrainOptions, max_seconds: float = math.inf) -> tuple[Path, float, bool]:
    """Train with vcdm.train, for at most `max_seconds` (the loop's --time-limit: it stops after the
    step and saves). Returns (final snapshot, kimg trained, whether the time ran out)."""
    run_dir = train(dataclasses.replace(opts, time_limit=max_seconds if math.isfinite(max_seconds) else 0.0))
    records = read_stats(run_dir)
    nimg = records[-1]["nimg"] if records else 0
    stopped = nimg < round(opts.duration * 1e6)
    if stopped:
        say(f"      time budget of this stage reached: trained {nimg / 1000:g} of {opts.duration * 1000:g} kimg")
    return max(run_dir.glob("network-snapshot-*.safetensors")), nimg / 1000, stopped


def observed_rate(run_dir: Path) -> float:
    """Training images/s over the last (up to) three ticks of a run."""
    recent = [r["sec_per_kimg"] for r in read_stats(run_dir)[1:][-3:] if r.get("sec_per_kimg")]
    return 1000 / (sum(recent) / len(recent)) if recent else 0.0


def final_loss(run_dir: Path) -> float | None:
    records = read_stats(run_dir)
    return records[-1].get("loss") if records else None

def train_for(opts: TrainOptions, rate: float, seconds: float, sizes: Sizes, *, tail_sec: float = 0.0,
              max_legs: int = 3) -> tuple[Path, float]:
    """Train for about `seconds` of wall-clock; returns (final snapshot, kimg trained).

    The length is planned from the measured `rate`, so the learning-rate ramp-up and the trainer's ETA
    are right. If the machine gets slower, a deadline stops the run in time; if it gets faster, the run
    is resumed (bit-exactly as if it had been planned longer) for the time left at the speed it had.
    `tail_sec` is what a run spends after its last step (its final sample grid)."""
    end = time.perf_counter() + seconds
    kimg = plan_kimg(rate, seconds, sizes)
    opts = dataclasses.replace(opts, duration=kimg / 1000, lr_rampup=0.05 * kimg,
                               tick=max(kimg / 10, sizes.batch / 1000))
    if sizes == SMOKE:
        return train_run(opts)[:2]
    for leg in range(max_legs):
        snapshot, kimg, stopped = train_run(opts, max(end - time.perf_counter(), MIN_LEG_SEC))
        left = end - time.perf_counter() - tail_sec
        if stopped or leg == max_legs - 1 or left < max(0.1 * seconds, 10):
            break
        extra = math.floor(observed_rate(snapshot.parent) * left / sizes.batch) * sizes.batch / 1000
        if extra <= 0:
            break
        say(f"      ahead of plan: resuming the run for {extra:g} kimg more (~{fmt_time(left)} left)")
        opts = dataclasses.replace(opts, duration=(kimg + extra) / 1000, resume=str(snapshot.parent),
                                   tick=max(extra / 5, sizes.batch / 1000))
    return snapshot, kimg
