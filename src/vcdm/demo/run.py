"""`vcdm demo`: the run itself (stages, metrics.json, summary.txt)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from vcdm.data import digits
from vcdm.data.dataset import ImageDataset
from vcdm.demo.budget import (EVAL_RESERVE_SEC, SAFETY, SMOKE, Clock, Sizes, after_training_sec, choose_threads,
                              fmt_time, measure_rates, preview_sec, say)
from vcdm.demo.figures import save_loss_curves, save_panels, save_png, tile
from vcdm.demo.sampling import two_stage_images
from vcdm.demo.training import final_loss, train_for, train_options
from vcdm.fileio import atomic_write
from vcdm.metrics.judge import make_judge


class DemoError(ValueError):
    """A demo that cannot run as asked; the message names the option."""


def new_run_dir(outdir: str | os.PathLike, desc: str) -> Path:
    """``<outdir>/<next 5-digit number>-<desc>``, as EDM numbers its runs."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in outdir.iterdir() if (m := re.match(r"(\d+)-", p.name))]
    run = outdir / f"{max(numbers, default=-1) + 1:05d}-{desc}"
    run.mkdir()
    return run


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
        generated = two_stage_images(prior, image_model, seeds, run / "samples", steps=sizes.steps, device=device,
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
                      "measured_img_per_sec": measured(prior_rates["train"]), "snapshot": str(prior.relative_to(run))},
            "image_model": {"kimg": image_kimg, "final_loss": final_loss(image_model.parent),
                            "measured_img_per_sec": measured(image_rates["train"]),
                            "snapshot": str(image_model.relative_to(run))}},
        "sampling": {"num_images": len(seeds), "heun_steps": sizes.steps},
        "wall_seconds": clock.record(),
        "run": {"seed": seed, "minutes": minutes, "smoke": smoke, "device": device, "threads": threads,
                "sizes": dataclasses.asdict(sizes)},
    }
    with atomic_write(run / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2, allow_nan=False)
    summary = summary_text(run, metrics)
    with atomic_write(run / "summary.txt", "w") as f:
        f.write(summary)
    say("\n" + summary)
    return run


def measured(rate: float) -> float | None:
    """A measured rate for metrics.json; None where none was measured (--smoke skips it), since JSON has no inf."""
    return round(rate, 1) if math.isfinite(rate) else None


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
