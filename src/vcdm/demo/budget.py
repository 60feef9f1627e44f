"""The demo's time budget: wall-clock per stage, measured throughput, the thread count, and how much
training the budget affords."""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from vcdm.train.build import build
from vcdm.train.options import TrainOptions

EVAL_RESERVE_SEC = 10.0  # figures, classifier features, summary
SAFETY = 1.3  # sampling estimates x this: the machine may get busier after the speed was measured


@dataclass(frozen=True)
class Sizes:
    """Network and run sizes. The defaults are what trains to recognisable digits in ~10 CPU-minutes."""
    resolution: int = 16
    pca_dim: int = 16  # pixel-pca embedding: coarse enough that the image model has work left to do
    batch: int = 64
    cbase: int = 32
    cres: tuple[int, ...] = (1, 2)
    image_lr: float = 2e-3
    prior_dim: int = 128
    prior_depth: int = 2
    prior_lr: float = 1e-3
    prior_share: float = 0.08  # of the training time: the prior (~30x cheaper per sample) converges first
    num_samples: int = 256
    steps: int = 18  # Heun steps (35 network evaluations), both stages
    classifier_epochs: int = 15
    min_kimg: float = 1.0


SMOKE = Sizes(pca_dim=8, batch=16, cbase=16, cres=(1,), prior_dim=32, prior_depth=1, num_samples=16, steps=3,
              classifier_epochs=1, min_kimg=0.032)


# ------------------------------------------------------------------------------------------ timing
class Clock:
    """Wall time per stage, and what is left of a budget."""

    def __init__(self, budget_sec: float):
        self.budget, self.start, self.cpu_start = budget_sec, time.perf_counter(), time.process_time()
        self.stages: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def left(self) -> float:
        return self.budget - self.elapsed

    def record(self) -> dict[str, float]:
        return {**{k: round(v, 2) for k, v in self.stages.items()}, "total": round(self.elapsed, 2),
                "cpu_seconds": round(time.process_time() - self.cpu_start, 2)}


def fmt_time(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def say(text: str) -> None:
    print(text, flush=True)


@torch.no_grad()
def _timed(fn, min_seconds: float, min_reps: int = 2) -> float:
    """Seconds per call of `fn` after one warm-up call."""
    fn()
    reps, t = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t < min_seconds:
        fn()
        reps += 1
    return (time.perf_counter() - t) / reps


def measure_rates(opts: TrainOptions, *, seconds: float = 1.5) -> dict[str, float]:
    """Training and sampling images/s of the network `opts` describe, on its device (random inputs of
    the real shapes; a few Adam steps, then no-grad forward passes). The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        s = build(opts, torch.device(opts.device))
        den, n = s.denoiser, opts.batch
        device = torch.device(opts.device)
        x = torch.randn(n, s.structure.latent_dim, device=device)
        y = torch.randn(n, s.structure.observed_dim, device=device) if s.structure.observed_dim else None
        opt = torch.optim.Adam(den.net.parameters(), lr=1e-6)

        def step() -> None:
            with torch.enable_grad():
                loss = s.loss_fn(den, x, y).sum() / n
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            _sync(device)

        def forward() -> None:
            den(x, torch.ones(n, device=device), y)
            _sync(device)

        den.net.train()
        train = n / _timed(step, seconds)
        den.net.eval()
        sample = n / _timed(forward, seconds / 2)
    return {"train": train, "sample": sample}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_threads(opts: TrainOptions) -> tuple[int, dict[str, float]]:
    """On a CPU, one thread or torch's default for the image model; returns (threads, its rates).

    Several threads pay off only on idle cores: when other processes keep the cores busy, threads wait
    on each other and small networks run many times slower. So one thread is kept when the load
    average already fills the cores, or when more threads are not clearly (1.3x) faster.
    """
    default = torch.get_num_threads()
    if torch.device(opts.device).type != "cpu" or default == 1:
        return default, measure_rates(opts)
    torch.set_num_threads(1)
    single = measure_rates(opts)
    if _busy_cores() >= (os.cpu_count() or 1) - 0.5:
        return 1, single
    torch.set_num_threads(default)
    multi = measure_rates(opts)
    if multi["train"] >= 1.3 * single["train"]:
        return default, multi
    torch.set_num_threads(1)
    return 1, single


def _busy_cores() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def after_training_sec(sizes: Sizes, image_rates: dict, prior_rates: dict, *, images: int, two_stage: int,
                       num: int | None = None) -> float:
    """Estimated seconds of the work that follows training: sampling `num` images from `images` image
    models (`two_stage` of them after the prior), plus the two sample grids each image-model run draws
    (its first and last tick, 18-step Heun on up to 64 images)."""
    num = sizes.num_samples if num is None else num
    nfe = 2 * sizes.steps - 1
    return (num * nfe * (images / image_rates["sample"] + two_stage / prior_rates["sample"])
            + images * 2 * preview_sec(sizes, image_rates))


def preview_sec(sizes: Sizes, image_rates: dict) -> float:
    """Estimated seconds of one sample grid drawn by the training loop (18-step Heun on up to 64 images)."""
    return min(sizes.batch, 64) * 35 / image_rates["sample"]


def plan_kimg(rate: float, seconds: float, sizes: Sizes) -> float:
    """Training length (kimg) for `seconds` at `rate` images/s, a whole number of batches, at least
    min_kimg (exactly min_kimg for the smoke sizes)."""
    batches = max(math.ceil(sizes.min_kimg * 1000 / sizes.batch), 1)
    if sizes != SMOKE:
        batches = max(math.floor(rate * seconds / sizes.batch), batches)
    return batches * sizes.batch / 1000
