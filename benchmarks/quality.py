"""Mini-reproduction of the paper's claim on the demo digits: two-stage vs unconditional at equal compute.

The paper reports 25-50% lower FID for a two-stage model (a prior over CLIP embeddings, then an image
model given the embedding) than for an unconditional image model trained with the same compute. Here,
on the UCI digits that `vcdm demo` uses, for each seed:

  (a) an unconditional DDPM++ image model, trained for T seconds;
  (b) the two-stage model: the prior (pixel-PCA embeddings) for prior_share*T seconds, then the image
      model given embeddings for the rest of T — the same total training wall-clock as (a);
  (c) (b)'s image model given the TRUE embeddings of the held-out digits (a perfect prior: an upper
      bound for what a better prior could give).

Equal compute means equal training wall-clock: every run's length is planned from throughput measured
once at the start on this machine (the table shows the kimg this gave and the seconds each run took),
and a deadline stops a run that the machine slowed down. Both image models have the same U-Net; the
conditional one only adds a small embedding input.

Scores: a Fréchet distance between Gaussians fitted to the penultimate-layer features of a small CNN
trained on the real training digits (vcdm.metrics.classifier; neither diffusion model uses it),
against the 300 held-out digits, with as many samples as held-out digits; the same for 300 real
training digits gives the floor a perfect model would reach. Also the classifier's mean confidence on
the samples, the entropy of its predicted classes (ln 10 = 2.303: all digits equally often), and for
(c) its accuracy against the labels of the held-out digits whose embeddings were used. The embedder
is pixel-PCA, not CLIP: it captures layout rather than semantics, so this is an analogue of the
paper's setting, not a reproduction of its numbers.

    python benchmarks/quality.py                         # one seed, ~12 minutes on 2 CPU cores
    python benchmarks/quality.py --seeds 0,1 --minutes 24
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from vcdm.data import digits
from vcdm.demo.budget import (EVAL_RESERVE_SEC, SAFETY, SMOKE, Clock, Sizes, after_training_sec, choose_threads,
                              fmt_time, measure_rates, preview_sec, say)
from vcdm.demo.figures import save_panels
from vcdm.demo.run import new_run_dir
from vcdm.demo.sampling import sample_model, sample_two_stage, write_true_embeddings
from vcdm.demo.training import train_for, train_options
from vcdm.fileio import atomic_write, parse_int_list
from vcdm.metrics.judge import make_judge

MODELS = ("real", "uncond", "two_stage", "oracle")
LABELS = {"real": "real digits (floor)", "uncond": "(a) unconditional", "two_stage": "(b) two-stage",
          "oracle": "(c) two-stage, true embeddings"}


def run_seed(seed: int, run: Path, paths: dict, judge, sizes: Sizes, rates: dict, train_sec: float,
             prior_share: float, num: int, device: str, progress: bool) -> dict:
    """Train (a) and (b) for `train_sec` each, sample (a), (b), (c), and score them."""
    out = run / f"seed-{seed}"
    opts = {kind: train_options(kind, paths["train"], out / name, sizes, seed=seed * 3 + i, device=device)
            for i, (kind, name) in enumerate([("prior", "prior"), ("image", "image-model"), ("uncond", "uncond")])}
    seeds = list(range(num))
    rows: dict[str, dict] = {}

    say(f"seed {seed}: (a) unconditional image model, ~{fmt_time(train_sec)}")
    t = time.perf_counter()
    tail = preview_sec(sizes, rates["image"])
    uncond, uncond_kimg = train_for(opts["uncond"], rates["uncond"]["train"], train_sec, sizes, tail_sec=tail)
    uncond_sec = time.perf_counter() - t

    say(f"seed {seed}: (b) prior ~{fmt_time(prior_share * train_sec)}, then image model given embeddings")
    t = time.perf_counter()
    prior, prior_kimg = train_for(opts["prior"], rates["prior"]["train"], prior_share * train_sec, sizes)
    prior_sec = time.perf_counter() - t
    image_budget = max(train_sec - prior_sec, 1.0)  # what the prior left of the same total
    t = time.perf_counter()
    image, image_kimg = train_for(opts["image"], rates["image"]["train"], image_budget, sizes, tail_sec=tail)
    image_sec = time.perf_counter() - t

    say(f"seed {seed}: sampling {num} images from (a), (b) and (c)")
    images = {"uncond": sample_model(uncond, seeds, out / "samples-uncond", steps=sizes.steps, device=device,
                                     progress=progress),
              "two_stage": sample_two_stage(prior, image, seeds, out / "samples-two-stage", steps=sizes.steps,
                                            device=device, progress=progress)}
    held_out = judge.test_images[:num]
    obs = out / "true-embeddings"
    write_true_embeddings(image, held_out, obs, device)
    images["oracle"] = sample_model(image, seeds, out / "samples-oracle", steps=sizes.steps, device=device,
                                    load_obs_from=obs, progress=progress)

    rows["real"] = judge.real_floor(num)
    rows["uncond"] = dict(judge.evaluate(images["uncond"]), kimg=uncond_kimg, train_sec=uncond_sec)
    rows["two_stage"] = dict(judge.evaluate(images["two_stage"]), kimg=prior_kimg + image_kimg,
                             prior_kimg=prior_kimg, image_kimg=image_kimg, train_sec=prior_sec + image_sec,
                             prior_sec=prior_sec)
    rows["oracle"] = judge.evaluate(images["oracle"], labels=judge.test_labels[:num])
    save_panels([("real (held out)", held_out), ("(a) unconditional", images["uncond"]),
                 ("(b) two-stage", images["two_stage"]), ("(c) true embeddings", images["oracle"])],
                run / f"samples-seed-{seed}.png")
    return rows


def fmt(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(results: dict[int, dict], judge, num: int, train_sec: float | None, minutes_taken: float) -> str:
    seeds = sorted(results)
    col = lambda model, key: [results[s][model][key] for s in seeds if results[s][model].get(key) is not None]
    lines = [(f"Two-stage vs unconditional on the UCI digits (16x16), seeds {','.join(map(str, seeds))}, "
              f"{fmt_time(minutes_taken * 60)} wall in all"),
             (f"Judge: CNN classifier, held-out accuracy {judge.test_accuracy:.1%}; Fréchet distance (FD) in its "
              f"{judge.classifier.dim}-d feature space vs {len(judge.test_images)} held-out digits, {num} images per row"
              + ("; mean ± std over seeds" if len(seeds) > 1 else "")),
             f"Equal compute: {fmt_time(train_sec)} of training wall-clock per seed for (a) and for (b) (prior + image model)"
             if train_sec is not None else "Smoke run: a few training steps per model",
             f"Floor: {num} real training digits that the classifier never saw (what a perfect generator would score)",
             "",
             "| model | training kimg | training s | FD ↓ | confidence | class entropy | accuracy |",
             "|---|---|---|---|---|---|---|"]
    for model in MODELS:
        kimg = (fmt(col(model, "kimg"), 1) if model != "two_stage" else
                f"{fmt(col(model, 'prior_kimg'), 1)} + {fmt(col(model, 'image_kimg'), 1)}") if model in ("uncond", "two_stage") else \
            "(b)'s" if model == "oracle" else "-"
        secs = fmt(col(model, "train_sec"), 0) if model in ("uncond", "two_stage") else "-"
        acc = fmt(col(model, "accuracy"), 3) if col(model, "accuracy") and model == "oracle" else "-"
        lines.append(f"| {LABELS[model]} | {kimg} | {secs} | {fmt(col(model, 'fd'))} | "
                     f"{fmt(col(model, 'mean_confidence'), 3)} | {fmt(col(model, 'class_entropy'), 3)} | {acc} |")
    change = [100 * (results[s]["two_stage"]["fd"] / results[s]["uncond"]["fd"] - 1) for s in seeds]
    lines += ["", (f"FD of (b) relative to (a): {fmt(change, 1)}% (negative: two-stage better; the paper reports "
                   f"-25% to -50% FID with CLIP embeddings)"),
              ("(c) is conditioned on the held-out digits themselves, so it can score below the floor of independent "
               "real digits; its accuracy is the share of its images classified as the digit whose embedding they got")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=12.0, help="wall-clock budget for everything [12]")
    parser.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1 [0]")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--outdir", default="demo-runs", help="where to make the run folder [demo-runs]")
    parser.add_argument("--num", type=int, default=digits.TEST_PER_CLASS * 10,
                        help="samples per model, at most the 300 held-out digits [300]")
    parser.add_argument("--prior-share", type=float, default=Sizes.prior_share,
                        help=f"fraction of (b)'s training time given to the prior [{Sizes.prior_share}]")
    parser.add_argument("--smoke", action="store_true", help="tiny networks, a few steps: checks the script")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args()
    try:
        seeds = parse_int_list(args.seeds, "--seeds")
    except ValueError as e:
        parser.error(str(e))
    if not 2 <= args.num <= digits.TEST_PER_CLASS * 10:
        parser.error(f"--num: expected 2..{digits.TEST_PER_CLASS * 10}, got {args.num}")
    if not (args.minutes > 0 and 0 < args.prior_share < 1):
        parser.error("--minutes must be positive and --prior-share in (0, 1)")

    sizes = SMOKE if args.smoke else Sizes()
    clock = Clock(args.minutes * 60)
    run = new_run_dir(args.outdir, "quality-smoke" if args.smoke else "quality")
    say(f"Run folder {run}; budget {fmt_time(clock.budget)} on {args.device}; seeds {seeds}")
    paths = digits.write_digits(run / "data", sizes.resolution)
    probe = {kind: train_options(kind, paths["train"], run / "probe", sizes, seed=0, device=args.device)
             for kind in ("prior", "image", "uncond")}
    if args.smoke:
        torch.set_num_threads(threads := 1)
        rates = {kind: {"train": math.inf, "sample": math.inf} for kind in probe}
    else:
        threads, image_rates = choose_threads(probe["image"])
        rates = {"image": image_rates, "prior": measure_rates(probe["prior"]), "uncond": measure_rates(probe["uncond"])}
    say("Throughput (img/s): " + ", ".join(f"{k} {v['train']:.0f} training / {v['sample']:.0f} sampling"
                                           for k, v in rates.items()) + f"; {threads} thread(s)")
    judge = make_judge(sizes.resolution, epochs=sizes.classifier_epochs, device=args.device, progress=args.progress)
    say(f"Classifier held-out accuracy {judge.test_accuracy:.1%}")

    # Per seed after training: (a), (b) and (c) sampling (the uncond U-Net costs what the image model does).
    per_seed = SAFETY * after_training_sec(sizes, rates["image"], rates["prior"], images=3, two_stage=1,
                                           num=args.num) + EVAL_RESERVE_SEC
    train_sec = max((clock.left - len(seeds) * per_seed) / (2 * len(seeds)), 5.0)
    results = {}
    for seed in seeds:
        results[seed] = run_seed(seed, run, paths, judge, sizes, rates, train_sec, args.prior_share, args.num,
                                 args.device, args.progress)
    text = table(results, judge, args.num, None if args.smoke else train_sec, clock.elapsed / 60)
    record = {"seeds": seeds, "results": results, "classifier_test_accuracy": judge.test_accuracy,
              "train_seconds_per_family": train_sec, "rates": rates, "threads": threads, "device": args.device,
              "wall_seconds": clock.elapsed, "sizes": dataclasses.asdict(sizes), "prior_share": args.prior_share}
    with atomic_write(run / "results.json", "w") as f:
        json.dump(record, f, indent=2)
    with atomic_write(run / "table.md", "w") as f:
        f.write(text + "\n")
    print("\n" + text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
