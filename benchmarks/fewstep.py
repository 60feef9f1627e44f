"""Few-step two-stage sampling on the demo digits: both stages tuned (`vcdm tune`'s defaults: the prior, which
predicts x0, by distilling its ODE (KD); the image model by ECT), then tuned again (`vcdm tune` of a tuned
checkpoint: distribution matching, DMD, against the base model; or DMD with DMD2's GAN term, --gan-weight
GAN_WEIGHTS; or, "dmd3", the image model's DMD of a 3-step sampler after the GAN prior), sampled in 1+1 .. 4+4
network evaluations,
against the original release's sampler (40 Heun steps with churn, 79+79 evaluations: `vcdm sample`'s
defaults), its deterministic ODE sampler and `--preset fast` (UniPC, 12+12); and the tuned image models after the
untuned prior's UniPC 12 (the prior, an MLP, costs ~1/80 of a U-Net evaluation).

For each training seed the demo's prior and image model (8x8 digits, as benchmarks/guidance.py) are
trained once through LENGTHS (nested, as quality.py); the last snapshot of each stage is tuned with
`vcdm tune`'s defaults (the command's own option parsing, then the same Python call), and the tuned snapshot
tuned again (with --teacher the base snapshot). Every setting draws the same seeds (common random numbers,
--num images per seed: at a few hundred images the judge's FD is too noisy to rank samplers; seed 0's release
and fast settings gave 8.5 and 10.6 at 200 images, 9.1 and 8.2 at 500 others, 3.9 and 7.6 at 2000 others) and
is scored by the demo judge: FD against the
held-out digits, the judge's mean confidence on the two-stage images, and the class accuracy of the image
stage given the held-out digits' own embeddings (quality.py's (c)). The tuning cost is each tuning run's kimg
and seconds as a fraction of the base training's, both stages together.

Speed is timed as whole processes: `vcdm sample` runs of --time-images images per setting on seed 0's
models, one thread each, round-robin (release, fast, 1+1, 2+2, 4+4, ..., release, ...), start to exit; the
median over --time-reps rounds, and the ratio to the release setting taken round by round.

    python benchmarks/fewstep.py --out fewstep-run --seeds 0,1 --jobs 2     # train, tune, score, time
    python benchmarks/fewstep.py --out fewstep-2 --reuse fewstep-run         # same base models, tune again
    python benchmarks/fewstep.py --out fewstep-kd --reuse fewstep-run --image-method kd --time-reps 0
    python benchmarks/fewstep.py --out fewstep-run --report                  # table.md, fewstep.png only
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median, result, row, write_json  # noqa: E402
from quality import run_seed_processes, train_nested  # noqa: E402

from vcdm.checkpoints import CheckpointConfig, read_checkpoint_config  # noqa: E402
from vcdm.data import digits  # noqa: E402
from vcdm.demo.budget import Sizes  # noqa: E402
from vcdm.demo.training import read_stats, train_options  # noqa: E402
from vcdm.fileio import atomic_path, atomic_write, parse_int_list  # noqa: E402
from vcdm.diffusion.settings import DMD_REFINE_LEVEL  # noqa: E402
from vcdm.generate.options import Conditioning, RunOptions, SamplerOptions  # noqa: E402
from vcdm.train.options import TUNE_METHODS  # noqa: E402

SIZES = Sizes(resolution=8, cres=(1, 2))
LENGTHS = {"prior": (32.0, 64.0, 96.0), "image": (8.0, 16.0)}  # kimg; the last is tuned
RELEASE = dict(num_steps=40, S_churn=50.0, S_noise=1.007)
FAST = SamplerOptions(sampler="unipc", num_steps=12)
TUNED, BOTH, GAN, DMD3, DIRECT, DIRECT64, GAN2 = ({"prior": t, "image": t} for t in ("tuned", "refined", "gan", "dmd3",
                                                                                      "direct", "direct64", "gan2"))
GAN_WEIGHTS = {"prior": "0.3", "image": "3e-3"}  # `vcdm tune --gan-weight` of each stage's "gan" tuning (the image
# model's is DMD2's; `vcdm tune`'s default for it is 0)
REFINE = DMD_REFINE_LEVEL * 0.5  # the prior's second level, where `vcdm tune` trains it (sigma_data 0.5)
SHARED = {("dmd3", "prior"): "gan", ("direct", "prior"): "gan", ("direct64", "prior"): "gan",  # the one-step prior
          ("gan2", "image"): "direct64"}  # "gan2": the prior's DMD+GAN at vcdm tune's levels, before "direct64"'s image
BEST = "DMD+GAN 2+2 (prior DMD at 80 and 0.15, image DMD of the diffusion model for 64 kimg)"  # `vcdm tune`'s defaults
# for the prior (KD, then DMD+GAN), the image model's DMD of the diffusion model for 64 kimg
SETTINGS = {  # label: (each stage's tuning, else base; evaluations (prior, image); `vcdm sample` flags; image-stage SamplerOptions)
    "release: Heun 40 + churn": ({}, (79, 79), [], SamplerOptions(**RELEASE)),
    "--preset fast: UniPC 12": ({}, (12, 12), ["--preset", "fast"], FAST),
    "ODE: Heun 18 + 18, no churn": ({}, (35, 35), ["--prior-steps", "18", "--prior-S_churn", "0", "--image-steps", "18",
                                                   "--image-S_churn", "0"], SamplerOptions(num_steps=18, S_churn=0.0)),
    **{f"tuned {p}+{n}": (TUNED, (p, n), ["--prior-steps", str(p), "--image-steps", str(n)],
                          SamplerOptions(sampler="consistency", num_steps=n))
       for p, n in ((1, 1), (1, 2), (2, 2), (1, 3), (4, 4))},
    **{f"prior UniPC 12 + image tuned {n}": ({"image": "tuned"}, (12, n), ["--prior-sampler", "unipc", "--prior-steps",
                                                                          "12", "--image-steps", str(n)],
                                            SamplerOptions(sampler="consistency", num_steps=n)) for n in (1, 2, 4)},
    **{f"DMD {p}+{n}": (BOTH, (p, n), ["--prior-steps", str(p), "--image-steps", str(n)],
                        SamplerOptions(sampler="consistency", num_steps=n))
       for p, n in ((1, 1), (1, 2), (2, 2), (1, 3), (4, 4))},
    "prior UniPC 12 + image DMD 2": ({"image": "refined"}, (12, 2), ["--prior-sampler", "unipc", "--prior-steps", "12",
                                                                     "--image-steps", "2"],
                                     SamplerOptions(sampler="consistency", num_steps=2)),
    **{f"DMD+GAN {p}+{n}": (GAN, (p, n), ["--prior-steps", str(p), "--image-steps", str(n)],
                            SamplerOptions(sampler="consistency", num_steps=n))
       for p, n in ((1, 1), (1, 2), (2, 2), (4, 4))},
    "release prior + image DMD+GAN 2": ({"image": "gan"}, (79, 2), ["--image-steps", "2"],
                                        SamplerOptions(sampler="consistency", num_steps=2)),
    "prior DMD+GAN 1 + release image": ({"prior": "gan"}, (1, 79), ["--prior-steps", "1"], SamplerOptions(**RELEASE)),
    "DMD+GAN 1+3 (image DMD of 3 steps)": (DMD3, (1, 3), ["--prior-steps", "1", "--image-steps", "3"],
                                           SamplerOptions(sampler="consistency", num_steps=3)),
    **{f"{name} 2+{n} (prior step 2 at {REFINE})": (tuning, (2, n), ["--prior-levels", f"80,{REFINE}", "--image-steps",
                                                                      str(n)], SamplerOptions(sampler="consistency",
                                                                                              num_steps=n))
       for name, tuning, n in (("DMD", BOTH, 2), ("DMD+GAN", GAN, 2), ("DMD+GAN", DMD3, 3))},
    "DMD+GAN 1+2 (image DMD of the diffusion model)": (DIRECT, (1, 2), ["--prior-steps", "1", "--image-steps", "2"],
                                                       SamplerOptions(sampler="consistency", num_steps=2)),
    **{f"DMD+GAN 2+2 (prior step 2 at {REFINE}, image DMD of the diffusion model{length})": (
        tuning, (2, 2), ["--prior-levels", f"80,{REFINE}", "--image-steps", "2"],
        SamplerOptions(sampler="consistency", num_steps=2))
       for length, tuning in (("", DIRECT), (", 64 kimg", DIRECT64))},
    BEST: (GAN2, (2, 2), [], SamplerOptions(sampler="consistency", num_steps=2)),
}
REFERENCE = "release: Heun 40 + churn"
assert not any(";" in label for label in SETTINGS), "--time-settings and --more-settings separate labels by ';'"


# ------------------------------------------------------------------------------------------ models
def snapshot(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if not found:
        raise SystemExit(f"Error: no {pattern} in {folder}")
    return found[-1]


def train_base(run: Path, seed: int, device: str) -> dict[str, Path]:
    """The seed's prior and image model, trained through LENGTHS unless already there."""
    data = run / "data" / f"digits-train-{SIZES.resolution}x{SIZES.resolution}.zip"
    nets = {}
    for i, (kind, lengths) in enumerate(LENGTHS.items()):
        folder = run / f"seed-{seed}" / kind
        last = f"budget{len(lengths) - 1}-network-snapshot-*.safetensors"
        if not sorted(folder.glob(last)):
            opts = train_options(kind, data, folder, SIZES, seed=2 * seed + i, device=device)
            train_nested(opts, list(lengths), rampup=0.05 * lengths[0])
        nets[kind] = snapshot(folder, last)
    return nets


def tune(base: Path, outdir: Path, seed: int, device: str, method: str | None, teacher: Path | None = None,
         extra: tuple[str, ...] = ()) -> Path:
    """`vcdm tune BASE` with the command's defaults (parsed by the command itself; `method`: its --method;
    `teacher`: its --teacher; `extra`: more flags), run in this process."""
    from vcdm.cli.tune import command, tune_options
    from vcdm.train import train

    if not sorted(outdir.glob("*/network-snapshot-*.safetensors")):
        args = [str(base), "--outdir", str(outdir), "--seed", str(seed), "--device", device, "--workers", "0",
                "--snap", "0", "--dump", "0", *(["--method", method] if method else []),
                *(["--teacher", str(teacher)] if teacher else []), *extra]
        with command.make_context("tune", args) as ctx:
            train(tune_options(str(base), dict(ctx.params)))
    return snapshot(outdir, "*/network-snapshot-*.safetensors")


# `vcdm tune` of the base model, then of the tuned one (its default there: DMD) without DMD2's GAN term, with it
# (--gan-weight GAN_WEIGHTS), or the image model's 3-step sampler; "direct": the image model's DMD started from the
# diffusion model itself (--method dmd; "direct64": for 64 kimg, 4x its training), after the GAN prior; "gan2": the
# prior's DMD+GAN at `vcdm tune`'s default levels (80, 0.15), before "direct64"'s image model. The prior's DMD runs
# before it trained one step (ONE_STEP, then the default).
TUNINGS = ("tuned", "refined", "gan", "dmd3", "direct", "direct64", "gan2")
FROM_BASE = ("direct", "direct64", "gan2")  # tunings whose image model starts from the base model, not the tuned one
ONE_STEP = {"prior": ("--sampler-steps", "1"), "image": ()}
BEST_PATH = {("prior", "tuned"), ("prior", "gan2"), ("image", "direct64")}  # the tunings behind BEST
PATH_COSTS = tuple(t for t in TUNINGS if t not in FROM_BASE)  # tunings whose cost adds to "tuned"'s


def tuning_folder(run: Path, seed: int, tuning: str, kind: str) -> Path:
    return run / f"seed-{seed}" / f"{SHARED.get((tuning, kind), tuning)}-{kind}"


def cost_label(kind: str, tuning: str) -> str:
    return f"cost-{kind}" if tuning == "tuned" else f"cost-{kind}-{tuning}"


def seconds(run_dir: Path) -> float:
    return sum(r.get("sec_per_tick", 0.0) for r in read_stats(run_dir))


def cost(base: Path, tuned: Path) -> dict:
    """Training and tuning length (kimg) and seconds of one stage, from the runs' own stats.jsonl."""
    trained = [r for r in read_stats(base.parent) if r["nimg"] <= float(base.stem.split("-")[-1]) * 1000 + 0.5]
    tuning = read_stats(tuned.parent)
    return {"train_kimg": trained[-1]["nimg"] / 1000, "train_sec": sum(r.get("sec_per_tick", 0.0) for r in trained),
            "tune_kimg": tuning[-1]["nimg"] / 1000, "tune_sec": seconds(tuned.parent)}


# ------------------------------------------------------------------------------------------ scoring
def two_stage_images(prior: Path, image: Path, flags: list[str], seeds: list[int], device: str) -> torch.Tensor:
    """uint8 (N, C, H, W) images of one setting through the Python API (the same options as the flags)."""
    import vcdm

    options, it = {}, iter(flags)
    for flag in it:
        value = next(it)
        options[flag.lstrip("-").replace("-", "_")] = (int(value) if value.isdigit() else
                                                        tuple(map(float, value.split(","))) if "," in value else value)
    out = vcdm.TwoStagePipeline.from_checkpoints(prior, image, device=device)(seeds, **options)
    return torch.from_numpy(out.images).permute(0, 3, 1, 2)


def oracle_images(image: Path, opts: SamplerOptions, judge, num: int, folder: Path, device: str) -> torch.Tensor:
    """The image stage given the held-out digits' own embeddings (seed i: held-out digit i)."""
    from vcdm.demo.sampling import read_images, write_true_embeddings
    from vcdm.generate import generate

    seeds = write_true_embeddings(image, judge.test_images[:num], folder / "true-embeddings", device)
    res = generate(image, seeds, opts=opts, cond=Conditioning(load_obs_from=folder / "true-embeddings"),
                   run=RunOptions(outdir=folder / "images", progress=False), device=device)
    return read_images(res.outdir, seeds)


def seed_models(run: Path, seed: int, device: str, methods: dict[str, str | None]) -> dict[str, dict[str, Path]]:
    """{tuning: {stage: snapshot}} of one seed: trained and tuned (`methods`: each stage's --method, None for the
    default) unless already there."""
    models = {"base": train_base(run, seed, device)}
    models["tuned"] = {kind: tune(base, run / f"seed-{seed}" / f"tuned-{kind}", seed, device, methods[kind])
                       for kind, base in models["base"].items()}
    models["refined"] = {kind: tune(tuned, run / f"seed-{seed}" / f"refined-{kind}", seed, device, None,
                                    models["base"][kind], ("--gan-weight", "0", *ONE_STEP[kind]))
                         for kind, tuned in models["tuned"].items()}  # a tuned checkpoint's default: DMD
    models["gan"] = {kind: tune(tuned, run / f"seed-{seed}" / f"gan-{kind}", seed, device, None, models["base"][kind],
                                ("--gan-weight", GAN_WEIGHTS[kind], *ONE_STEP[kind]))
                     for kind, tuned in models["tuned"].items()}
    models["dmd3"] = {"prior": models["gan"]["prior"],
                      "image": tune(models["tuned"]["image"], tuning_folder(run, seed, "dmd3", "image"), seed, device, None,
                                    models["base"]["image"], ("--gan-weight", "0", "--sampler-steps", "3"))}
    models["direct"] = {"prior": models["gan"]["prior"],
                        "image": tune(models["base"]["image"], tuning_folder(run, seed, "direct", "image"), seed,
                                      device, "dmd", models["base"]["image"], ("--gan-weight", "0"))}
    models["direct64"] = {"prior": models["gan"]["prior"],
                          "image": tune(models["base"]["image"], tuning_folder(run, seed, "direct64", "image"), seed,
                                        device, "dmd", models["base"]["image"], ("--gan-weight", "0", "--kimg", "64"))}
    models["gan2"] = {"prior": tune(models["tuned"]["prior"], tuning_folder(run, seed, "gan2", "prior"), seed, device,
                                    None, models["base"]["prior"], ("--gan-weight", GAN_WEIGHTS["prior"])),
                      "image": models["direct64"]["image"]}
    return models


def run_seed(run: Path, seed: int, num: int, device: str, methods: dict[str, str | None], more: int = 0,
             more_settings: tuple[str, ...] = ()) -> None:
    """Train, tune and score one seed, appending rows to seed-<s>/results.jsonl (done rows are skipped); then
    `more_settings` on `more` images beside the `num` (score_more)."""
    from vcdm.metrics.judge import make_judge

    models = seed_models(run, seed, device, methods)
    if more:
        score_more(run, seed, models, num, more, more_settings, device)
    log = run / f"seed-{seed}" / "results.jsonl"
    done = {r.get("setting", r["kind"]) for r in read(log) if r["kind"] != "more"}
    for kind, base in models["base"].items():
        for tuning in TUNINGS:
            if cost_label(kind, tuning) not in done:
                append(log, {"kind": "cost", "setting": cost_label(kind, tuning), "stage": kind, "tuning": tuning,
                             **cost(base, models[tuning][kind])})
    if done >= {"real", *SETTINGS}:
        return
    judge = make_judge(SIZES.resolution, epochs=SIZES.classifier_epochs, device=device, progress=False)
    held_out = min(num, len(judge.test_images))  # the floor's and the image stage's given the held-out digits
    if "real" not in done:
        append(log, {"kind": "score", "setting": "real", **scores(judge.real_floor(held_out))})
    seeds = list(range(seed * num, (seed + 1) * num))
    for label, (stages, nfe, flags, image_opts) in SETTINGS.items():
        if label in done:
            continue
        nets = {kind: models[stages.get(kind, "base")][kind] for kind in LENGTHS}
        start = time.perf_counter()
        images = two_stage_images(nets["prior"], nets["image"], flags, seeds, device)
        with tempfile.TemporaryDirectory() as tmp:
            oracle = judge.evaluate(oracle_images(nets["image"], image_opts, judge, held_out, Path(tmp), device),
                                    labels=judge.test_labels[:held_out])
        append(log, {"kind": "score", "setting": label, "nfe": sum(nfe), "num": num, **scores(judge.evaluate(images)),
                     "accuracy": oracle["accuracy"], "oracle_fd": oracle["fd"],
                     "sec": round(time.perf_counter() - start, 1)})
        print(f"seed {seed}: {label}: FD {read(log)[-1]['fd']:.1f}", flush=True)


MORE_START = 30_000  # the first sampling seed of the extra images, the same for every training seed
MORE_SETTINGS = (REFERENCE, BEST)


def score_more(run: Path, seed: int, models: dict, num: int, more: int, labels: tuple[str, ...], device: str) -> None:
    """FD of each of `labels` on one set: the seed's `num` benchmark images and `more` others (sampling seeds from
    MORE_START), for less sampling noise than `num` alone gives (2000 images of one model: FD 6.6-8.4 by the seeds).
    Images are cached per block of `num` in seed-<s>/more/ (npz); rows of kind "more" in results.jsonl."""
    import numpy as np

    from vcdm.metrics.judge import make_judge

    log = run / f"seed-{seed}" / "results.jsonl"
    done = {(r["setting"], r["num"]) for r in read(log) if r["kind"] == "more"}
    labels = [label for label in labels if (label, num + more) not in done]
    if not labels:
        return
    judge = make_judge(SIZES.resolution, epochs=SIZES.classifier_epochs, device=device, progress=False)
    for label in labels:
        stages, _, flags, _ = SETTINGS[label]
        nets = {kind: models[stages.get(kind, "base")][kind] for kind in LENGTHS}
        blocks = []
        for first in [seed * num, *range(MORE_START, MORE_START + more, num)]:
            cache = run / f"seed-{seed}" / "more" / f"{slug(label)}-{first}.npz"
            if not cache.is_file():
                images = two_stage_images(nets["prior"], nets["image"], flags, list(range(first, first + num)), device)
                cache.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(cache, "wb") as f:
                    np.savez(f, images=images.numpy())
            blocks.append(torch.from_numpy(np.load(cache)["images"]))
        append(log, {"kind": "more", "setting": label, "num": num + more, **scores(judge.evaluate(torch.cat(blocks)))})
        print(f"seed {seed}: {label}, {num + more} images: FD {read(log)[-1]['fd']:.2f}", flush=True)


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.,+]+", "-", label).strip("-")


def scores(res: dict) -> dict:
    return {k: res[k] for k in ("fd", "mean_confidence")}


def read(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def append(log: Path, record: dict) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------ timing
def vcdm_command() -> list[str]:
    script = Path(sys.executable).parent / "vcdm"
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from vcdm.cli.main import cli; cli()"]


def time_processes(run: Path, images: int, reps: int, batch: int, only: list[str] | None = None) -> None:
    """Whole-process seconds of `vcdm sample` per setting (seed 0's models; `only`: these settings and the
    release's), round-robin, one thread each, appended to timing.jsonl as they come (a first round of 16 images
    warms the file cache and is not kept)."""
    models = {"base": {k: snapshot(run / "seed-0" / k, "budget*-network-snapshot-*.safetensors") for k in LENGTHS},
              **{t: {k: snapshot(tuning_folder(run, 0, t, k), "*/network-snapshot-*.safetensors") for k in LENGTHS}
                 for t in TUNINGS}}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = max((r["round"] for r in read(run / "timing.jsonl") if r["images"] == images), default=0)
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps + 1):
            for label, (stages, _, flags, _) in SETTINGS.items():
                if only and label not in (*only, REFERENCE):
                    continue
                out = Path(tmp) / "out"
                nets = {kind: models[stages.get(kind, "base")][kind] for kind in LENGTHS}
                cmd = [*vcdm_command(), "sample", "--prior", str(nets["prior"]), "--image-model",
                       str(nets["image"]), "--seeds", f"0-{(images if rep else min(images, 16)) - 1}", "--batch", str(batch),
                       "--outdir", str(out), "--no-progress", "--device", "cpu", *flags]
                start = time.perf_counter()
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                sec = time.perf_counter() - start
                shutil.rmtree(out)
                if rep:
                    append(run / "timing.jsonl", {"kind": "time", "setting": label, "round": done + rep, "sec": sec,
                                                  "images": images})
                    print(f"round {done + rep}: {label}: {sec:.1f} s", flush=True)


# ------------------------------------------------------------------------------------------ report
def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def collect(run: Path) -> tuple[dict, list[dict], list[dict]]:
    """({seed: {setting: score row}}, cost rows, time rows) of a run folder."""
    per_seed, costs = {}, []
    for log in sorted(run.glob("seed-*/results.jsonl")):
        rows = read(log)
        seed = int(log.parent.name.split("-")[1])
        per_seed[seed] = {r["setting"]: r for r in rows if r["kind"] == "score"}
        costs += [dict(r, seed=seed) for r in rows if r["kind"] == "cost"]
    return per_seed, costs, read(run / "timing.jsonl")


def more_table(run: Path) -> list[str]:
    """The settings scored on more images per seed (score_more), as table lines ([] if none were)."""
    per_seed = {int(log.parent.name.split("-")[1]): {r["setting"]: r for r in read(log) if r["kind"] == "more"}
                for log in sorted(run.glob("seed-*/results.jsonl"))}
    labels = list(dict.fromkeys(label for rows in per_seed.values() for label in rows))
    if not labels:
        return []
    lines = ["", f"On more images per seed (score_more: the benchmark's and more from sampling seed {MORE_START}), "
                 "mean ± std over seeds; Δ FD paired by seed, then each seed's:", "",
             "| setting | images per seed | FD ↓ | Δ FD vs release | per seed (Δ) |", "|---|---|---|---|---|"]
    for label in labels:
        rows = {s: r[label] for s, r in sorted(per_seed.items()) if label in r}
        ref = {s: per_seed[s][REFERENCE] for s in rows if REFERENCE in per_seed[s]
               and per_seed[s][REFERENCE]["num"] == rows[s]["num"]}
        delta = {s: rows[s]["fd"] - ref[s]["fd"] for s in ref}
        each = ", ".join(f"{s}: {rows[s]['fd']:.2f}" + (f" ({delta[s]:+.2f})" if s in delta and label != REFERENCE
                                                          else "") for s in rows)
        lines.append(f"| {label} | {'/'.join(sorted({str(r['num']) for r in rows.values()}))} | "
                     f"{mean_std([r['fd'] for r in rows.values()])} | "
                     f"{mean_std(list(delta.values())) if label != REFERENCE else '-'} | {each} |")
    return lines


def speeds(times: list[dict]) -> dict[str, tuple[float, float | None, int]]:
    """{setting: (median images/s, median of the per-round ratios to the release setting, images per process)},
    from the setting's timed runs with the most images per process (the release's runs of that size)."""
    by = {}
    for r in times:
        by.setdefault((r["images"], r["setting"]), {})[r["round"]] = r
    out = {}
    for (images, label), rounds in sorted(by.items()):
        reference = by.get((images, REFERENCE), {})
        ratios = [reference[k]["sec"] / r["sec"] for k, r in rounds.items() if k in reference]
        out[label] = (median(r["images"] / r["sec"] for r in rounds.values()), median(ratios) if ratios else None,
                      images)
    return out


def timed_as(label: str) -> str:
    """The setting whose timing a setting shares when not timed itself: the same networks and evaluations, other
    weights (DMD's rows, the tuned rows')."""
    return label.split(" (")[0].replace("DMD+GAN", "tuned").replace("DMD", "tuned")


def method_label(config: CheckpointConfig) -> str:
    """The tuning method of a tuned checkpoint's config, with DMD's steps and the levels it recorded."""
    training = config.training
    steps = training.get("dmd_steps", 2) if training["tune"] == "dmd" else None
    levels = (config.sampler or {}).get("levels")
    at = f" at {', '.join(f'{v:g}' for v in levels)}" if steps and levels and len(levels) == steps else ""
    return (training["tune"].upper() + ("+GAN" if training.get("gan_weight") else "")
            + (f" ({steps} step{'s' * (steps > 1)}{at})" if steps else ""))


def table(run: Path) -> tuple[str, list[dict]]:
    per_seed, costs, times = collect(run)
    seeds, speed = sorted(per_seed), speeds(times)
    col = lambda label, key: [per_seed[s][label][key] for s in seeds if label in per_seed[s]]  # noqa: E731
    ref_fd = col(REFERENCE, "fd")
    methods = {(t, k): method_label(read_checkpoint_config(snapshot(tuning_folder(run, seeds[0], t, k),
                                                                    "*/network-snapshot-*.safetensors")))
               for t in TUNINGS for k in LENGTHS}
    lines = [f"Two-stage sampling on the demo digits (8x8) with few network evaluations: both stages tuned by "
             f"`vcdm tune` (\"tuned\": prior {methods['tuned', 'prior']}, image model {methods['tuned', 'image']}), then "
             f"the tuned models tuned again (`vcdm tune`'s default for a tuned checkpoint; \"DMD\": prior "
             f"{methods['refined', 'prior']}, image model {methods['refined', 'image']}; \"DMD+GAN\": the same with "
             f"DMD2's GAN term, --gan-weight {GAN_WEIGHTS['prior']} and {GAN_WEIGHTS['image']}; \"image DMD of 3 steps\": "
             f"the image model trained by DMD for 3 steps, --sampler-steps 3; \"prior step 2 at {REFINE}\": the prior's "
             f"one DMD step and a second evaluation at {REFINE}, --prior-levels 80,{REFINE}; \"image DMD of the diffusion "
             f"model\": the image model's DMD started from the diffusion model itself, --method dmd; \"prior DMD at 80 and "
             f"0.15\": the prior's DMD+GAN of 2 steps at those levels, `vcdm tune`'s default since session 9) vs the "
             f"release's sampler and "
             f"--preset fast. {per_seed[seeds[0]][REFERENCE].get('num', '?')} images per setting and seed. "
             f"{len(seeds)} training seeds "
             f"({','.join(map(str, seeds))}), mean ± std over seeds; Δ FD paired by seed. Base models: prior "
             f"{LENGTHS['prior'][-1]:g} kimg, image model {LENGTHS['image'][-1]:g} kimg. FD: the demo judge's "
             f"features vs the 300 held-out digits; real-digit floor (300 images) {mean_std(col('real', 'fd'))}; (c) "
             f"accuracy: the image stage given the 300 held-out digits' own embeddings. Images/s: "
             f"whole `vcdm sample` processes, one thread, median of {len({t['round'] for t in times})} rounds, "
             f"ratios to the release's process of as many images, round by round; a DMD row not timed itself shows "
             f"its tuned twin's (the same networks and evaluations, other weights).", "",
             "| setting | evaluations (prior+image) | FD ↓ | Δ FD vs release | mean confidence | (c) accuracy "
             "| images/s | × release | images per process |", "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for label, (_, nfe, _, _) in SETTINGS.items():
        fd = col(label, "fd")
        delta = [per_seed[s][label]["fd"] - per_seed[s][REFERENCE]["fd"] for s in seeds
                 if label in per_seed[s] and REFERENCE in per_seed[s]]
        ips, ratio, images = speed.get(label) or speed.get(timed_as(label), (None, None, None))
        lines.append(f"| {label} | {nfe[0]}+{nfe[1]} | {mean_std(fd)} | {mean_std(delta) if label != REFERENCE else '-'} "
                     f"| {mean_std(col(label, 'mean_confidence'))} | {mean_std(col(label, 'accuracy'))} | "
                     f"{f'{ips:.3g}' if ips else '-'} | {f'{ratio:.3g}' if ratio else '-'} | {images or '-'} |")
        if fd:
            rows.append(row(f"two-stage FD, {label}", statistics.mean(fd), "FD", note=f"{len(fd)} seeds"))
        if ips:
            rows.append(row(f"vcdm sample, {label}", ips, "images/s", reference=f"vcdm sample, {REFERENCE}",
                            ratio=ratio, note="whole process, 1 thread, median"))
    lines += more_table(run)
    lines += ["", "| stage | tuning | trained kimg | tuned kimg | tuning / training kimg | tuning / training seconds |",
              "|---|---|---|---|---|---|"]
    for stage in LENGTHS:
        for tuning in (t for t in TUNINGS if (t, stage) not in SHARED):
            c = [r for r in costs if r["stage"] == stage and r.get("tuning", "tuned") == tuning]
            method = methods[tuning, stage] + (" of the diffusion model" if tuning in FROM_BASE and stage == "image"
                                               else "")
            lines.append(f"| {stage} | {method} | {mean_std([r['train_kimg'] for r in c])} "
                         f"| {mean_std([r['tune_kimg'] for r in c])} | {mean_std([r['tune_kimg'] / r['train_kimg'] for r in c])} "
                         f"| {mean_std([r['tune_sec'] / r['train_sec'] for r in c])} |")
    noise = f"{statistics.stdev(ref_fd):.2g}" if len(ref_fd) > 1 else "-"
    lines.append("")
    for tunings in (PATH_COSTS[:1], *((PATH_COSTS[0], t) for t in PATH_COSTS[1:])):
        both = [sum(r["tune_sec"] for r in costs if r["seed"] == s and r.get("tuning", "tuned") in tunings) /
                sum(r["train_sec"] for r in costs if r["seed"] == s and r.get("tuning", "tuned") == "tuned")
                for s in seeds]
        lines.append(f"Tuning both stages ({' then '.join(tunings)}) cost {mean_std(both)} of their training's seconds "
                     f"(wall-clock on a shared machine: the kimg ratios are the steadier measure).")
    best = [sum(r["tune_sec"] for r in costs if r["seed"] == s and (r["stage"], r.get("tuning", "tuned")) in BEST_PATH)
            / sum(r["train_sec"] for r in costs if r["seed"] == s and r.get("tuning", "tuned") == "tuned") for s in seeds]
    lines.append(f"Tuning both stages for \"{BEST}\" (prior KD then DMD+GAN; image model DMD of the diffusion model) "
                 f"cost {mean_std(best)} of their training's seconds.")
    lines.append(f"Release seed-to-seed noise: FD std {noise}.")
    return "\n".join(lines), rows


def plot(run: Path, path: Path) -> None:
    """FD against evaluations per two-stage image, and FD against whole-process images/s."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_seed, _, times = collect(run)
    speed = speeds(times)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 3.8), dpi=80)
    colours = plt.get_cmap("tab20").colors
    for i, (label, (_, nfe, _, _)) in enumerate(SETTINGS.items()):
        fd = [per_seed[s][label]["fd"] for s in per_seed if label in per_seed[s]]
        if not fd:
            continue
        m, sd = statistics.mean(fd), statistics.stdev(fd) if len(fd) > 1 else 0.0
        ax.errorbar([sum(nfe)], [m], yerr=[sd], fmt="o", capsize=3, color=colours[i % len(colours)], label=label)
        timing = speed.get(label) or speed.get(timed_as(label))
        if timing:
            ax2.errorbar([timing[0]], [m], yerr=[sd], fmt="o", capsize=3, color=colours[i % len(colours)], label=label)
    floor = [per_seed[s]["real"]["fd"] for s in per_seed if "real" in per_seed[s]]
    for a in (ax, ax2):
        if floor:
            a.axhline(statistics.mean(floor), color="grey", ls=":", lw=0.8, label="real digits (floor)")
        a.set(xscale="log", yscale="log", ylabel="FD ↓")
    ax.set_xlabel("network evaluations per image (both stages)")
    ax2.set_xlabel("images/s, whole `vcdm sample` process")
    ax2.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"Few-step two-stage sampling, demo digits 8x8, seeds {','.join(map(str, sorted(per_seed)))}",
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def report(run: Path, json_path: str | None, start: float) -> None:
    text, rows = table(run)
    with atomic_write(run / "table.md", "w") as f:
        f.write(text + "\n")
    plot(run, run / "fewstep.png")
    print("\n" + text, flush=True)
    if json_path:
        write_json(json_path, result("fewstep", rows, machine("cpu"), time.perf_counter() - start))


# ------------------------------------------------------------------------------------------ running
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="run folder (created; what it already has is reused)")
    p.add_argument("--reuse", type=Path, metavar="DIR", help="take the base models (and data) from another run folder")
    p.add_argument("--seeds", default="0,1", help="training seeds [0,1]")
    p.add_argument("--jobs", type=int, default=1, help="seeds at once, each in its own process [1]")
    p.add_argument("--num", type=int, default=2000, help="images per setting and seed (the image stage given the "
                   "held-out digits: at most their 300) [2000]")
    p.add_argument("--more", type=int, default=0, help="score --more-settings on this many more images per seed (a "
                   f"multiple of --num; sampling seeds from {MORE_START}), with the --num: less sampling noise [0]")
    p.add_argument("--more-settings", metavar="LABEL;...", default=";".join(MORE_SETTINGS),
                   help="';'-separated labels scored by --more [the release's and the best 2+2]")
    p.add_argument("--time-images", type=int, default=2048, help="images per timed `vcdm sample` run [2048]")
    p.add_argument("--time-reps", type=int, default=3, help="timed rounds (0: no timing) [3]")
    p.add_argument("--batch", type=int, default=256, help="batch of the timed runs [256]")
    p.add_argument("--time-settings", metavar="LABEL;...", help="time only these settings (and the release's), "
                   "';'-separated labels; earlier timings are kept, new rounds numbered after them (the release's too)")
    p.add_argument("--prior-method", choices=TUNE_METHODS, help="`vcdm tune --method` of the prior [its default]")
    p.add_argument("--image-method", choices=TUNE_METHODS, help="`vcdm tune --method` of the image model [its default]")
    p.add_argument("--device", default="cpu")
    p.add_argument("--report", action="store_true", help="only write table.md and fewstep.png from the run folder")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON (run_all.py's format)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # run the --seeds into this run folder
    a = p.parse_args(argv)
    start, seeds = time.perf_counter(), parse_int_list(a.seeds, "--seeds")
    a.out = a.worker or a.out
    if not 2 <= a.num <= 100_000:
        p.error(f"--num: expected 2..100000, got {a.num}")
    more_settings = tuple(a.more_settings.split(";"))
    if a.more % a.num or a.more < 0:
        p.error(f"--more: expected a multiple of --num ({a.num}), got {a.more}")
    if unknown := [label for label in more_settings if label not in SETTINGS]:
        p.error(f"--more-settings: no setting '{unknown[0]}' (see the table's labels)")
    if a.report:
        return report(a.out, a.json, start)
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.reuse and not a.worker:
        for src in [a.reuse / "data", *(a.reuse / f"seed-{s}" / k for s in seeds for k in LENGTHS)]:
            dst = a.out / src.relative_to(a.reuse)
            if not dst.exists():
                shutil.copytree(src, dst)
    if not (a.out / "data").is_dir():
        digits.write_digits(a.out / "data", SIZES.resolution)
    if a.worker or a.jobs == 1 or len(seeds) == 1:
        for seed in seeds:
            run_seed(a.out, seed, a.num, a.device, {"prior": a.prior_method, "image": a.image_method}, a.more,
                     more_settings)
        if a.worker:
            return
    else:
        run_seed_processes(__file__, seeds, a.jobs, a.out,
                           ["--out", str(a.out), "--num", str(a.num), "--device", a.device, "--more", str(a.more),
                            "--more-settings", a.more_settings,
                            *(["--prior-method", a.prior_method] if a.prior_method else []),
                            *(["--image-method", a.image_method] if a.image_method else [])])
    only = a.time_settings.split(";") if a.time_settings else None
    timed = {r["setting"] for r in read(a.out / "timing.jsonl") if r["images"] == a.time_images}
    if a.time_reps and not set(only or SETTINGS) <= timed:
        time_processes(a.out, a.time_images, a.time_reps, a.batch, only)
    report(a.out, a.json, start)


if __name__ == "__main__":
    main()
