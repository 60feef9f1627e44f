"""EDM's DDPM++ vs EDM2's U-Net as the image model of the two-stage pipeline, on the demo digits, at equal
counted training compute; and the EDM2 image model's FD against its post-hoc EMA length.

For each seed, one prior (pixel-PCA embeddings, the release's recipe) is trained and shared by two image
models given the embedding:
  ddpmpp: the demo's DDPM++ (cbase 32, cres 1,2) with EDM's recipe (lr 2e-3, EDM's half-life EMA);
  edm2:   EDM2's U-Net (`--arch edm2-img64-xs` at the demo's cbase 32, cres 1,2) with `--recipe edm2`
          (the preset's lr 1.2e-2, learned uncertainty, power-function EMA profiles 0.050 and 0.100).
A budget B is counted as in benchmarks/quality.py: B kimg of the demo DDPM++'s training FLOPs (forward and
backward per image, counted by torch's FlopCounterMode); each image model gets (1 - prior_share) of it in
its own FLOPs per image, the prior prior_share. Budgets are nested (one run per model and seed, resumed
leg by leg; the snapshot at B is the model a run of exactly B gives). Both image models sample with the
same prior samples (same seeds) and are scored by quality.py's judge: the Fréchet distance in a small
CNN's features against the held-out digits, with the real-digit floor. The edm2 row uses its 0.100
profile. Post-hoc EMA: the edm2 run also keeps its two profiles at extra times on the way, and at the
largest budget `vcdm phema`'s reconstruction gives the network for each length of `--phema-stds`.

    python benchmarks/backbones.py --budgets 2,4,8 --num 200 --steps 10 --jobs 2   # results/backbones-digits.md
    python benchmarks/backbones.py --smoke                                      # checks the script (a minute)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from common import machine, report, row, write_json
from quality import fmt, run_seed_processes, training_flops
from vcdm.checkpoints import read_checkpoint_config
from vcdm.data import digits
from vcdm.demo.budget import SMOKE, Sizes, fmt_time, say
from vcdm.demo.run import new_run_dir
from vcdm.demo.sampling import two_stage_images
from vcdm.demo.training import read_stats, train_options, train_run
from vcdm.fileio import atomic_write
from vcdm.metrics.judge import make_judge
from vcdm.train import phema as phema_io
from vcdm.train.options import TrainOptions

KINDS = ("prior", "ddpmpp", "edm2")
IMAGE_KINDS = ("ddpmpp", "edm2")
EDM2_ARCH = "edm2-img64-xs"
PROFILE = 0.100  # the edm2 profile sampled in the main table
PHEMA_TIMES = 8  # the edm2 run also keeps its profiles at every 1/8 of its length: inputs of the reconstruction


def options(kind: str, data: Path, outdir: Path, sizes: Sizes, seed: int, device: str) -> TrainOptions:
    opts = train_options("prior" if kind == "prior" else "image", data, outdir, sizes, seed=seed, device=device)
    if kind == "edm2":
        opts = dataclasses.replace(opts, arch=EDM2_ARCH, recipe="edm2", lr=None)
    return opts


def kimg_for(kind: str, budget: float, flops: dict[str, float], prior_share: float, batch: int) -> float:
    """Whole batches of `kind` (at least one) that its share of B kimg of DDPM++ training FLOPs affords."""
    share = prior_share if kind == "prior" else 1 - prior_share
    work = share * budget * flops["ddpmpp"]
    return max(round(work / flops[kind] * 1000 / batch), 1) * batch / 1000


def train_legs(opts: TrainOptions, lengths: list[float], rampup: float) -> dict[int, list[Path]]:
    """Train once through the increasing `lengths` (kimg), resuming leg by leg; after each leg its snapshots
    are renamed kept-<nimg>-... (the loop names them by whole kimg, so later legs would overwrite them).
    Returns {nimg: kept snapshots}."""
    run_dir, kept = Path(opts.outdir), {}
    for i, kimg in enumerate(lengths):
        leg = dataclasses.replace(opts, duration=kimg / 1000, lr_rampup=rampup, tick=kimg, sample=0,
                                  resume=str(run_dir) if i else None)
        train_run(leg)
        for path in sorted(run_dir.glob("network-snapshot-*.safetensors")):
            nimg = read_checkpoint_config(path).training["nimg"]
            target = run_dir / f"kept-{nimg:09d}-{path.name}"
            path.replace(target)
            kept.setdefault(nimg, []).append(target)
    return kept


def profile(paths: list[Path], std: float | None) -> Path:
    """The snapshot of EMA profile `std` among one time's snapshots (None: EDM's single EMA)."""
    if std is None:
        return paths[0]
    return next(p for p in paths if p.name.endswith(f"-{std:.3f}.safetensors"))


def train_seconds(run_dir: Path, nimg: int) -> float:
    return sum(r.get("sec_per_tick", 0.0) for r in read_stats(run_dir) if r["nimg"] <= nimg)


def run_seed(seed: int, out: Path, args: argparse.Namespace, sizes: Sizes, data: Path) -> dict:
    flops = {kind: training_flops(options(kind, data, out / "probe", sizes, 0, "cpu")) for kind in KINDS}
    lengths = {kind: [kimg_for(kind, b, flops, args.prior_share, sizes.batch) for b in args.budgets] for kind in KINDS}
    for kind, ks in lengths.items():
        if ks != sorted(set(ks)):
            raise SystemExit(f"Error: --budgets {args.budgets} give {kind} the same length twice ({ks} kimg)")
    last = lengths["edm2"][-1]
    extra = [round(last * k / PHEMA_TIMES * 1000 / sizes.batch) * sizes.batch / 1000 for k in range(1, PHEMA_TIMES)]
    legs = {**lengths, "edm2": sorted(set(lengths["edm2"]) | {k for k in extra if k > 0})}
    kept, nimgs = {}, {}
    for i, kind in enumerate(KINDS):
        say(f"seed {seed}: training {kind} through {', '.join(f'{k:g}' for k in lengths[kind])} kimg")
        kept[kind] = train_legs(options(kind, data, out / kind, sizes, seed * 3 + i, args.device), legs[kind],
                                args.rampup * lengths[kind][0])
        nimgs[kind] = [max(n for n in kept[kind] if n <= round(k * 1000)) for k in lengths[kind]]
    judge = make_judge(sizes.resolution, epochs=sizes.classifier_epochs, device=args.device, progress=False)
    seeds, kw = list(range(args.num)), dict(steps=args.steps, device=args.device, progress=False)
    results = {}
    for i, budget in enumerate(args.budgets):
        say(f"seed {seed}, budget {budget:g}: sampling {args.num} two-stage images per image model")
        prior = profile(kept["prior"][nimgs["prior"][i]], None)
        rows = {"real": judge.real_floor(args.num)}
        for kind in IMAGE_KINDS:
            nimg = nimgs[kind][i]
            image = profile(kept[kind][nimg], PROFILE if kind == "edm2" else None)
            rows[kind] = judge.evaluate(two_stage_images(prior, image, seeds, out / f"budget-{budget:g}" / kind, **kw))
            rows[kind].update(kimg=nimg / 1000, train_sec=train_seconds(out / kind, nimg))
        rows["prior"] = {"kimg": nimgs["prior"][i] / 1000, "train_sec": train_seconds(out / "prior", nimgs["prior"][i])}
        results[f"{budget:g}"] = rows
    say(f"seed {seed}: post-hoc EMA of the edm2 run at {nimgs['edm2'][-1] / 1000:g} kimg, lengths {args.phema_stds}")
    inputs = phema_io.open_inputs([p for n, ps in sorted(kept["edm2"].items()) if n <= nimgs["edm2"][-1] for p in ps])
    plan = phema_io.plan(inputs, args.phema_stds)
    phema = {}
    for std, path in zip(args.phema_stds, phema_io.write(plan, args.phema_stds, out / "phema")):
        images = two_stage_images(prior, path, seeds, out / "phema" / f"samples-{std:.3f}", **kw)
        phema[f"{std:.3f}"] = judge.evaluate(images)["fd"]
    return {"seed": seed, "results": results, "phema": phema, "phema_inputs": len(plan.snapshots),
            "flops": flops, "classifier_test_accuracy": judge.test_accuracy}


# ------------------------------------------------------------------------------------------ report
def table(parts: list[dict], record: dict) -> str:
    flops = parts[0]["flops"]
    budgets = list(parts[0]["results"])
    col = lambda b, kind, key: [p["results"][b][kind][key] for p in parts]
    lines = [f"Seeds {','.join(str(p['seed']) for p in parts)} (mean ± std over seeds); {record['num']} two-stage "
             f"images per model, {record['steps']}-step Heun; judge accuracy {parts[0]['classifier_test_accuracy']:.1%}",
             f"Training FLOPs per image: DDPM++ {flops['ddpmpp'] / 1e6:.1f} M, EDM2 U-Net {flops['edm2'] / 1e6:.1f} M, "
             f"prior {flops['prior'] / 1e6:.2f} M; the prior gets {record['prior_share']:.0%} of each budget",
             "",
             "| budget (DDPM++ kimg) | DDPM++ (EDM) FD | EDM2 U-Net (EDM2, profile 0.100) FD | EDM2 vs DDPM++ | "
             "real floor FD | image kimg DDPM++ / EDM2 | prior kimg | training s DDPM++ / EDM2 / prior |",
             "|---|---|---|---|---|---|---|---|"]
    for b in budgets:
        change = [100 * (e / d - 1) for e, d in zip(col(b, "edm2", "fd"), col(b, "ddpmpp", "fd"))]
        lines.append(f"| {b} | {fmt(col(b, 'ddpmpp', 'fd'))} | {fmt(col(b, 'edm2', 'fd'))} | {fmt(change, 1)}% | "
                     f"{fmt(col(b, 'real', 'fd'))} | {fmt(col(b, 'ddpmpp', 'kimg'), 2)} / {fmt(col(b, 'edm2', 'kimg'), 2)} | "
                     f"{fmt(col(b, 'prior', 'kimg'), 2)} | {fmt(col(b, 'ddpmpp', 'train_sec'), 0)} / "
                     f"{fmt(col(b, 'edm2', 'train_sec'), 0)} / {fmt(col(b, 'prior', 'train_sec'), 0)} |")
    stds = list(parts[0]["phema"])
    lines += ["", f"Post-hoc EMA of the EDM2 image model at budget {budgets[-1]} ({parts[0]['phema_inputs']} input "
              "snapshots per seed), same prior and seeds:", "",
              "| EMA length (std) | " + " | ".join(f"FD seed {p['seed']}" for p in parts) + " | mean |",
              "|---|" + "---|" * (len(parts) + 1)]
    for s in stds:
        values = [p["phema"][s] for p in parts]
        lines.append(f"| {s} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {fmt(values)} |")
    return "\n".join(lines)


def summary_rows(parts: list[dict]) -> list[dict]:
    """The common result rows: per budget, each network's FD as the median over seeds with min and max."""
    rows = []
    for b in parts[0]["results"]:
        fds = {kind: [p["results"][b][kind]["fd"] for p in parts] for kind in ("ddpmpp", "edm2", "real")}
        ref = f"DDPM++ (EDM) FD, {b} kimg"
        for kind, metric in (("ddpmpp", "DDPM++ (EDM) FD"), ("edm2", "EDM2 U-Net (profile 0.100) FD"),
                             ("real", "real floor FD")):
            med = statistics.median(fds[kind])
            rows.append(row(f"{metric}, {b} kimg", med, "FD", low=min(fds[kind]), high=max(fds[kind]),
                            reps=len(parts), reference=ref if kind == "edm2" else None,
                            ratio=med / statistics.median(fds["ddpmpp"]) if kind == "edm2" else None,
                            note="over training seeds"))
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="also write the common result rows (benchmarks/common.py) as JSON")
    p.add_argument("--budgets", default="1,2", help="increasing budgets, kimg of DDPM++ training FLOPs [1,2]")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds [0,1]")
    p.add_argument("--num", type=int, default=100, help="two-stage samples per model [100]")
    p.add_argument("--steps", type=int, default=10, help="Heun steps of both stages [10]")
    p.add_argument("--prior-share", type=float, default=Sizes().prior_share, help="the prior's share of a budget")
    p.add_argument("--rampup", type=float, default=0.05, help="lr ramp-up, a share of the smallest budget [0.05]")
    p.add_argument("--phema-stds", default="0.03,0.05,0.07,0.1,0.14,0.2", help="post-hoc EMA lengths to score")
    p.add_argument("--jobs", type=int, default=1, help="seeds trained at once, one process each [1]")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process [1]")
    p.add_argument("--device", default="cpu")
    p.add_argument("--outdir", default="benchmark-runs")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # run one seed into this folder
    args = p.parse_args(argv)
    try:
        args.budgets = [float(b) for b in args.budgets.split(",")]
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.phema_stds = [float(s) for s in args.phema_stds.split(",")]
    except ValueError:
        p.error("--budgets, --seeds and --phema-stds take comma-separated numbers")
    if not all(b > 0 for b in args.budgets) or args.budgets != sorted(set(args.budgets)):
        p.error(f"--budgets must be positive and increasing, got {args.budgets}")
    if not all(0 < s < phema_io.MAX_STD for s in args.phema_stds):
        p.error(f"--phema-stds must be in (0, {phema_io.MAX_STD:.3f}), got {args.phema_stds}")
    if not (2 <= args.num <= digits.TEST_PER_CLASS * 10 and 0 < args.prior_share < 1 and args.jobs >= 1
            and args.threads >= 1 and args.steps >= 1):
        p.error("--num must be in 2..300, --prior-share in (0, 1), --jobs, --threads and --steps positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start, info = time.perf_counter(), machine(args.device)
    sizes = SMOKE if args.smoke else Sizes()
    if args.smoke:
        args.budgets = [2 ** (i + 3) * SMOKE.batch / 1000 for i in range(len(args.budgets))]
    run = Path(args.worker or new_run_dir(args.outdir, "backbones-smoke" if args.smoke else "backbones"))
    data = run / "data" / f"digits-train-{sizes.resolution}x{sizes.resolution}.zip"
    if args.worker:
        part = run_seed(args.seeds[0], run / f"seed-{args.seeds[0]}", args, sizes, data)
        write_json(run / f"seed-{args.seeds[0]}" / "results.json", part)
        return
    digits.write_digits(run / "data", sizes.resolution)
    say(f"Run folder {run}; budgets {args.budgets} kimg; seeds {args.seeds}")
    run_workers(args, run)
    parts = [json.loads((run / f"seed-{s}" / "results.json").read_text()) for s in args.seeds]
    record = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "parts": parts,
              "num": args.num, "steps": args.steps, "prior_share": args.prior_share,
              "wall_seconds": time.perf_counter() - start}
    text = table(parts, record) + f"\n\nWall time {fmt_time(record['wall_seconds'])}; run folder {run}"
    write_json(run / "results.json", record)
    with atomic_write(run / "table.md", "w") as f:
        f.write(text + "\n")
    print("\n" + text, flush=True)
    report(args, "backbones", summary_rows(parts), info, record["wall_seconds"], run=str(run))


def run_workers(args: argparse.Namespace, run: Path) -> None:
    """Each seed in its own process, `--jobs` at a time; each writes seed-<s>/results.json."""
    common = ["--budgets", ",".join(f"{b:g}" for b in args.budgets), "--num", str(args.num), "--steps", str(args.steps),
              "--prior-share", str(args.prior_share), "--rampup", str(args.rampup), "--threads", str(args.threads),
              "--phema-stds", ",".join(f"{s:g}" for s in args.phema_stds), "--device", args.device]
    run_seed_processes(__file__, args.seeds, args.jobs, run, common + (["--smoke"] if args.smoke else []))


if __name__ == "__main__":
    sys.exit(main())
