"""`vcdm demo`: the whole two-stage pipeline on real images, offline, on a CPU, in minutes.

1. data: scikit-learn's UCI handwritten digits as EDM-format zips, with a fixed held-out split
   (vcdm.data.digits);
2. an independent judge: a small CNN trained on the real training digits (vcdm.metrics.classifier);
3. calibration: training and sampling throughput of the two networks on this device (and, on a CPU,
   whether one thread beats several on a busy machine); the time budget is split by it;
4. the auxiliary model (prior): a small DALL-E-2-style transformer over pixel-PCA embeddings of the
   digits, trained with the real training loop (vcdm.train);
5. the image model: a small DDPM++ U-Net conditioned on those embeddings, same loop;
6. two-stage sampling (vcdm.generate): prior → embeddings → image model → images;
7. metrics (classifier Fréchet distance vs held-out digits, predicted-class statistics), figures and
   a summary, all in one run folder.

The benchmark `benchmarks/quality.py` reuses these pieces to compare against an unconditional model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from vcdm.data import digits
from vcdm.data.dataset import ImageDataset
from vcdm.fileio import atomic_path, atomic_write
from vcdm.generate.options import SamplerOptions
from vcdm.train.options import TrainOptions

NEVER = 10**9  # --snap/--dump/--sample interval that leaves only the first and the last tick
EVAL_RESERVE_SEC = 10.0  # figures, classifier features, summary
SAFETY = 1.3  # sampling estimates x this: the machine may get busier after the speed was measured
FLOOR_PER_CLASS = 30  # real training digits kept from the classifier to score the floor (see Judge)


class DemoError(ValueError):
    """A demo that cannot run as asked; the message names the option."""


@dataclass(frozen=True)
class Sizes:
    """Network and run sizes. The defaults are what trains to recognisable digits in ~10 CPU-minutes."""
    resolution: int = 16
    pca_dim: int = 16  # pixel-pca embedding: coarse enough that the image model has work left to do
    batch: int = 64
    cbase: int = 32
    cres: str = "1,2"
    image_lr: float = 2e-3
    prior_dim: int = 128
    prior_depth: int = 2
    prior_lr: float = 1e-3
    prior_share: float = 0.08  # of the training time: the prior (~30x cheaper per sample) converges first
    num_samples: int = 256
    steps: int = 18  # Heun steps (35 network evaluations), both stages
    classifier_epochs: int = 15
    min_kimg: float = 1.0


SMOKE = Sizes(pca_dim=8, batch=16, cbase=16, cres="1", prior_dim=32, prior_depth=1, num_samples=16, steps=3,
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


# ------------------------------------------------------------------------------------------ training
def train_options(kind: str, data_path: str | os.PathLike, outdir: str | os.PathLike, sizes: Sizes, *,
                  seed: int, device: str) -> TrainOptions:
    """Options of one demo training run: kind 'prior' (embeddings), 'image' (images given embeddings)
    or 'uncond' (images, no conditioning). Written into `outdir` itself; only the first and the last
    tick save a snapshot, a training state and a sample grid. `train_for` sets the length."""
    common = dict(path=str(data_path), outdir=str(outdir), nosubdir=True, batch=sizes.batch, augment=0.0,
                  dropout=0.0, seed=seed, device=device, workers=0, snap=NEVER, dump=NEVER, sample=NEVER)
    if kind == "prior":
        return TrainOptions(data_class="CLIPDataset", exist="0,1", observed="0,0", embedder="pixel-pca",
                            pca_dim=sizes.pca_dim, arch="dalle2", pred_x0="1", prior_dim=sizes.prior_dim,
                            prior_depth=sizes.prior_depth, lr=sizes.prior_lr, **common)
    unet = dict(arch="ddpmpp", cbase=sizes.cbase, cres=sizes.cres, lr=sizes.image_lr)
    if kind == "image":
        return TrainOptions(data_class="CLIPDataset", exist="1,1", observed="0,1", embedder="pixel-pca",
                            pca_dim=sizes.pca_dim, **unet, **common)
    if kind == "uncond":
        return TrainOptions(data_class="ImageFolderDataset", exist="1,0", observed="0,0", **unet, **common)
    raise ValueError(f"unknown demo model kind '{kind}'")


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
    from vcdm.train.build import build

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


def read_stats(run_dir: Path) -> list[dict[str, Any]]:
    """The tick records of a training run (its stats.jsonl)."""
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines() if line.strip()]


def train_run(opts: TrainOptions, max_seconds: float = math.inf) -> tuple[Path, float, bool]:
    """Train with vcdm.train, for at most `max_seconds` (the loop's --time-limit: it stops after the
    step and saves). Returns (final snapshot, kimg trained, whether the time ran out)."""
    from vcdm.train import train

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


# ------------------------------------------------------------------------------------------ sampling
def read_images(outdir: Path, seeds: Sequence[int]) -> torch.Tensor:
    """uint8 (N, C, H, W) of the PNGs that vcdm.generate wrote for `seeds`."""
    from vcdm.generate import seed_path
    from vcdm.generate.files import read_png

    return torch.from_numpy(np.stack([read_png(seed_path(outdir, s, "png")) for s in seeds])).permute(0, 3, 1, 2)


def sampler(steps: int) -> SamplerOptions:
    """EDM's deterministic Heun sampler with `steps` steps (both stages of the demo)."""

    return SamplerOptions(num_steps=steps)


def sample_two_stage(prior: Path, image_model: Path, seeds: Sequence[int], outdir: Path, *, steps: int,
                     device: str, progress: bool = True) -> torch.Tensor:
    from vcdm.generate import sample_two_stage as two_stage

    res = two_stage(prior, image_model, seeds, outdir=outdir, prior_opts=sampler(steps), image_opts=sampler(steps),
                    device=device, progress=progress)
    return read_images(res.images.outdir, seeds)


def sample_model(model: Path, seeds: Sequence[int], outdir: Path, *, steps: int, device: str,
                 load_obs_from: Path | None = None, progress: bool = True) -> torch.Tensor:
    from vcdm.generate import generate

    res = generate(model, seeds, outdir=outdir, opts=sampler(steps), load_obs_from=load_obs_from, device=device,
                   progress=progress)
    return read_images(res.outdir, seeds)


def write_true_embeddings(image_model: Path, images: torch.Tensor, outdir: Path, device: str) -> list[int]:
    """Embed real uint8 images with the image model's own embedder and write them as per-seed
    observation files (seed i ↔ image i), the format `--load_obs_from` reads; returns the seeds."""
    from vcdm.data.dataset import to_float
    from vcdm.generate import load_model, seed_path
    from vcdm.generate.core import load_embedder
    from vcdm.generate.files import write_tensors

    model = load_model(image_model, device)
    embedder = load_embedder(model, None, torch.device(device))
    with torch.no_grad():
        emb = torch.cat([embedder.embed(to_float(b)).cpu() for b in images.split(500)])
    for i, e in enumerate(emb):
        write_tensors(seed_path(outdir, i, "pt"), {"embedding": e})
    return list(range(len(images)))


# ------------------------------------------------------------------------------------------ figures
def tile(images: torch.Tensor, cols: int, scale: int = 4, pad: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) → an (H', W', 3) grid, each image enlarged `scale`x (nearest) with a grey border."""
    from vcdm.generate.files import make_grid

    arr = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()
    if arr.shape[3] == 1:
        arr = arr.repeat(3, axis=3)
    arr = np.pad(arr, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=160)
    return make_grid(list(arr), cols)


def save_png(array: np.ndarray, path: Path) -> None:
    import PIL.Image

    with atomic_write(path, "wb") as f:
        PIL.Image.fromarray(array).save(f, format="PNG")


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _figure().close(fig)


def save_panels(panels: Sequence[tuple[str, torch.Tensor]], path: Path, cols: int = 8) -> None:
    """Side-by-side grids with titles (e.g. real vs generated)."""
    plt = _figure()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.0), dpi=100, squeeze=False)
    for ax, (title, images) in zip(axes[0], panels):
        ax.imshow(tile(images[:cols * cols], cols, scale=2, pad=1), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    _save_figure(fig, path)


def save_loss_curves(runs: Sequence[tuple[str, Path]], path: Path) -> None:
    """Training loss per tick of each run (from its stats.jsonl)."""
    plt = _figure()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.4), dpi=100, squeeze=False)
    for ax, (title, run_dir) in zip(axes[0], runs):
        pts = [(r["kimg"], r["loss"]) for r in read_stats(run_dir) if r.get("loss") is not None]
        if pts:
            ax.plot(*zip(*pts), marker=".")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("thousands of training images (kimg)")
        ax.set_ylabel("EDM loss per element")
        if pts and min(p[1] for p in pts) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


# ------------------------------------------------------------------------------------------ the demo
def new_run_dir(outdir: str | os.PathLike, desc: str) -> Path:
    """``<outdir>/<next 5-digit number>-<desc>``, as EDM numbers its runs."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in outdir.iterdir() if (m := re.match(r"(\d+)-", p.name))]
    run = outdir / f"{max(numbers, default=-1) + 1:05d}-{desc}"
    run.mkdir()
    return run


@dataclass
class Judge:
    """The classifier and the real digits that everything is measured against.

    The classifier learns from the training split minus `floor_images` (FLOOR_PER_CLASS per digit).
    Those are real training digits it has never seen, so their scores are what a perfect generator
    (one that samples the training distribution) would get with as many images: the floor. Digits the
    classifier was trained on would not do: their features are more extreme than any new image's.
    """
    classifier: Any
    test_accuracy: float
    ref: Any  # FeatureStats of the held-out test digits
    floor_images: torch.Tensor
    floor_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        from vcdm.metrics.classifier import evaluate
        return evaluate(self.classifier, images, self.ref, labels=labels)

    def real_floor(self, n: int) -> dict[str, Any]:
        if n > len(self.floor_images):
            raise DemoError(f"the real-digit floor has {len(self.floor_images)} images, {n} were asked for")
        return self.evaluate(self.floor_images[:n], self.floor_labels[:n])


def make_judge(resolution: int, *, epochs: int, device: str, progress: bool = True) -> Judge:
    from vcdm.metrics.classifier import accuracy, feature_stats, train_classifier

    images, labels = digits.load_tensors("train", resolution)
    test_images, test_labels = digits.load_tensors("test", resolution)
    floor = torch.from_numpy(digits.stratified_pick(labels.numpy(), FLOOR_PER_CLASS, seed=1))
    floor = floor[torch.randperm(len(floor), generator=torch.Generator().manual_seed(1))]  # any prefix is balanced
    rest = torch.ones(len(images), dtype=torch.bool)
    rest[floor] = False
    clf = train_classifier(images[rest], labels[rest], epochs=epochs, device=device, progress=progress)
    return Judge(clf, accuracy(clf, test_images, test_labels), feature_stats(clf, test_images),
                 images[floor], labels[floor], test_images, test_labels)


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
        snapshot, kimg, stopped = train_run(opts, end - time.perf_counter())
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


def run_demo(outdir: str | os.PathLike = "demo-runs", *, minutes: float = 10.0, device: str | None = None,
             seed: int = 0, smoke: bool = False, progress: bool = True) -> Path:
    """Run the demo; return its run folder."""
    if not minutes > 0:
        raise DemoError(f"--minutes: expected a positive number, got {minutes}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise DemoError(f"--device: expected cpu, cuda or cuda:N, got '{device}'") from None
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    sizes = SMOKE if smoke else Sizes() if minutes >= 5 else dataclasses.replace(Sizes(), num_samples=128)
    clock = Clock(minutes * 60)
    run = new_run_dir(outdir, f"digits{sizes.resolution}-{'smoke' if smoke else f'{minutes:g}min'}")
    threads_before = torch.get_num_threads()
    say(f"vcdm demo: run folder {run} (budget {fmt_time(clock.budget)}, device {device})")
    try:
        return _run(run, sizes, clock, device, seed, smoke, minutes, progress)
    finally:
        torch.set_num_threads(threads_before)


def _run(run: Path, sizes: Sizes, clock: Clock, device: str, seed: int, smoke: bool, minutes: float,
         progress: bool) -> Path:
    total = 7
    say(f"[1/{total}] Writing the UCI digits (scikit-learn) as {sizes.resolution}x{sizes.resolution} EDM zips")
    with clock.stage("data"):
        paths = digits.write_digits(run / "data", sizes.resolution)

    say(f"[2/{total}] Measuring training and sampling speed on {device}")
    opts = {k: train_options(k, paths["train"], run / name, sizes, seed=seed + i, device=device)
            for i, (k, name) in enumerate([("prior", "prior"), ("image", "image-model")])}
    with clock.stage("calibration"):
        if smoke:  # fixed lengths: nothing to plan; tiny networks run fastest on one thread
            torch.set_num_threads(threads := 1)
            image_rates = prior_rates = {"train": math.inf, "sample": math.inf}
        else:
            threads, image_rates = choose_threads(opts["image"])
            prior_rates = measure_rates(opts["prior"])
            say(f"      {threads} thread(s); image model {image_rates['train']:.0f} img/s training, "
                f"{image_rates['sample']:.0f} img/s per network evaluation; "
                f"prior {prior_rates['train']:.0f} img/s training")

    say(f"[3/{total}] Training the judge: a small CNN classifier on the real training digits")
    with clock.stage("classifier"):
        judge = make_judge(sizes.resolution, epochs=sizes.classifier_epochs, device=device, progress=progress)
    say(f"      held-out accuracy {judge.test_accuracy:.1%}")

    after_training = SAFETY * after_training_sec(sizes, image_rates, prior_rates, images=1, two_stage=1) + EVAL_RESERVE_SEC
    train_sec = clock.left - after_training
    if train_sec < 10 and not smoke:
        say(f"      warning: --minutes {minutes:g} leaves {fmt_time(max(train_sec, 0))} for training; "
            f"expect noise, not digits")
    prior_sec = sizes.prior_share * train_sec
    length = (lambda sec: "a few steps (smoke)") if smoke else (lambda sec: f"~{fmt_time(sec)}")
    say(f"[4/{total}] Training the prior (embeddings) for {length(prior_sec)}")
    with clock.stage("prior_training"):
        prior, prior_kimg = train_for(opts["prior"], prior_rates["train"], prior_sec, sizes)

    image_sec = clock.left - after_training
    say(f"[5/{total}] Training the image model (images given embeddings) for {length(image_sec)}")
    with clock.stage("image_training"):
        image_model, image_kimg = train_for(opts["image"], image_rates["train"], image_sec, sizes,
                                            tail_sec=preview_sec(sizes, image_rates))

    seeds = list(range(sizes.num_samples))
    say(f"[6/{total}] Two-stage sampling of {len(seeds)} digits: prior → embeddings → image model → images")
    with clock.stage("sampling"):
        generated = sample_two_stage(prior, image_model, seeds, run / "samples", steps=sizes.steps, device=device,
                                     progress=progress)

    say(f"[7/{total}] Measuring and drawing")
    with clock.stage("evaluation"):
        gen_metrics = judge.evaluate(generated)
        floor = judge.real_floor(len(generated))
        save_png(tile(generated[:100], 10), run / "samples.png")
        save_panels([("real digits (held out)", judge.test_images), ("generated (two-stage)", generated)],
                    run / "real-vs-generated.png")
        save_loss_curves([("prior (pixel-PCA embeddings)", prior.parent),
                          ("image model (given embeddings)", image_model.parent)], run / "loss-curves.png")
    metrics = {
        "data": {"name": "UCI handwritten digits (scikit-learn load_digits)", "resolution": sizes.resolution,
                 "train_images": len(ImageDataset(paths["train"])), "test_images": len(judge.test_images),
                 "embedder": f"pixel-pca, {sizes.pca_dim} dims, fitted on the training split"},
        "classifier": {"test_accuracy": judge.test_accuracy, "feature_dim": judge.classifier.dim,
                       "epochs": sizes.classifier_epochs},
        "generated": gen_metrics,
        "real_digits_floor": floor,
        "training": {
            "prior": {"kimg": prior_kimg, "final_loss": final_loss(prior.parent),
                      "measured_img_per_sec": round(prior_rates["train"], 1), "snapshot": str(prior.relative_to(run))},
            "image_model": {"kimg": image_kimg, "final_loss": final_loss(image_model.parent),
                            "measured_img_per_sec": round(image_rates["train"], 1),
                            "snapshot": str(image_model.relative_to(run))}},
        "sampling": {"num_images": len(seeds), "heun_steps": sizes.steps},
        "wall_seconds": clock.record(),
        "run": {"seed": seed, "minutes": minutes, "smoke": smoke, "device": device, "threads": threads,
                "sizes": dataclasses.asdict(sizes)},
    }
    with atomic_write(run / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    summary = summary_text(run, metrics)
    with atomic_write(run / "summary.txt", "w") as f:
        f.write(summary)
    say("\n" + summary)
    return run


def summary_text(run: Path, m: dict[str, Any]) -> str:
    g, floor, t = m["generated"], m["real_digits_floor"], m["wall_seconds"]
    prior, image = m["training"]["prior"], m["training"]["image_model"]
    table = [("", "generated", "real digits*", ""),
             ("Fréchet distance to held-out digits", f"{g['fd']:.2f}", f"{floor['fd']:.2f}",
              "lower is better (the CNN's penultimate features)"),
             ("mean classifier confidence", f"{g['mean_confidence']:.3f}", f"{floor['mean_confidence']:.3f}",
              "recognisable digits score near 1"),
             (f"predicted-class entropy (max {g['max_class_entropy']:.3f})", f"{g['class_entropy']:.3f}",
              f"{floor['class_entropy']:.3f}", "all ten digits equally often = max")]
    rows = "\n".join(f"  {a:<38s}{b:>10s}{c:>14s}   {d}".rstrip() for a, b, c, d in table)
    return f"""vcdm demo — {run}

What happened ({fmt_time(t['total'])} wall; budget {m['run']['minutes']:g} min on {m['run']['device']}):
  A "visual chain-of-thought" diffusion model was trained on {m['data']['train_images']} real handwritten digits
  ({m['data']['name']}, {m['data']['resolution']}x{m['data']['resolution']}). It generates in two stages:
  first a prior samples an embedding of an image ({m['data']['embedder']}),
  then an image model samples the image given that embedding. The paper uses CLIP ViT-B/32 embeddings;
  pixel-PCA is the offline stand-in (it captures layout, not semantics).
  prior: {prior['kimg']:g} kimg of training; image model: {image['kimg']:g} kimg.

Files:
  samples.png              100 generated digits (two-stage samples, enlarged 4x)
  real-vs-generated.png    held-out real digits (left) next to generated ones (right)
  loss-curves.png          training loss of the prior and of the image model
  metrics.json             the numbers below, and wall times per stage
  prior/, image-model/     the two training runs (log.txt, stats.jsonl, snapshots; image-model/samples-*.png
                           are images generated from the embeddings of real training digits)
  samples/                 embeddings/<seed>.pt and images/<seed>.png of every sample
  data/                    the datasets (EDM-format zips; dataset.json holds the labels)

Metrics (judged by a small CNN trained on real training digits; held-out accuracy {m['classifier']['test_accuracy']:.1%}):
{rows}
  how often each digit 0-9 was recognised: {g['predicted_class_counts']}
  * {floor['num_images']} real training digits that the CNN never saw: what a perfect generator would score with as
    many images (a Fréchet distance from a few hundred images is never 0).

Next:
  * Your own images:   vcdm dataset --source=my-images/ --dest=datasets/mine-64x64.zip --resolution=64x64
  * The paper's embedder (CLIP ViT-B/32, local weights, e.g. open_clip's ViT-B-32 'openai' checkpoint):
      vcdm train --path=datasets/mine-64x64.zip --data_class=CLIPDataset --clip-weights=ViT-B-32.pt \\
          --exist=0,1 --observed=0,0 --arch=dalle2 --pred_x0=1 --batch=256 --lr=1e-4 --outdir=runs/prior
      vcdm train --path=datasets/mine-64x64.zip --data_class=CLIPDataset --clip-weights=ViT-B-32.pt \\
          --exist=1,1 --observed=0,1 --arch=ddpmpp --cres=1,2,2,2 --batch=128 --lr=1e-4 --outdir=runs/image
      vcdm sample --prior=runs/prior/<run>/network-snapshot-<kimg>.safetensors \\
          --image-model=runs/image/<run>/network-snapshot-<kimg>.safetensors --seeds=0-63 --grid=grid.png
  * More time or a GPU:  vcdm demo --minutes 30     vcdm demo --device cuda
  * Two-stage vs unconditional at equal compute:  python benchmarks/quality.py
"""
