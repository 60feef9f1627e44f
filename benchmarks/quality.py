"""The paper's claim on the demo digits: two-stage vs unconditional against the training budget.

The paper reports 25-50% lower FID for a two-stage model (a prior over CLIP embeddings, then an image
model given the embedding) than for an unconditional image model trained with the same compute. Here,
on the UCI digits that `vcdm demo` uses, for each seed and each training budget B:

  (a) an unconditional DDPM++ image model trained for B kimg;
  (b) the two-stage model: the prior (pixel-PCA embeddings) and the image model given embeddings,
      sharing the same compute as (a): the prior gets `prior_share` of it, the image model the rest;
  (c) (b)'s image model given the TRUE embeddings of the held-out digits (a perfect prior: an upper
      bound for what a better prior could give). Its class accuracy (the share of its images that the
      judge classifies as the digit whose embedding they got) says that the image model uses its
      conditioning; near chance (0.1) it says nothing while the samples are not yet recognisable
      digits (FD far above the floor): measured on the demo's image model, the denoising loss with a
      wrong embedding is already 4% worse than with the right one at 3 kimg and 25-30% at 12 kimg,
      while (c)'s accuracy stays at 0.12-0.19 up to 12 kimg and reaches 0.32 at 16 kimg.

Budgets are training compute, not wall-clock. One budget unit is the floating-point work of training
the U-Net on 1000 images (forward and backward, counted once with torch's FlopCounterMode on the real
shapes). The U-Net of (a) and (b) is the same network (b's adds a 16-to-32 linear layer), so (a) gets B
kimg, (b)'s image model (1 - prior_share) B kimg, and the prior prior_share * B * (U-Net FLOPs / prior
FLOPs) kimg. Counted work does not change when other processes slow the machine down, which a
wall-clock budget does: two earlier single runs with wall-clock budgets on a shared 2-core machine
gave -78% and -4.1% for the same claim, the second with an image model too undertrained to draw
recognisable digits ((c) accuracy 0.16). Measured throughput would not do either: under load it moves by 2x within
minutes. Seconds spent are still reported. FLOPs favour the prior on a CPU: it needs 78x fewer FLOPs
per image than the demo's U-Net but trains only 20-40x more images per second (its small matrices run
further from peak), so its 8% of the FLOPs was 20-22% of (b)'s wall-clock in a measured run on a busy
2-core machine, and (b) took 1.2-1.45x (a)'s seconds; the table shows the seconds.

Budgets are nested: each model is trained once per seed, up to the largest budget, and its EMA snapshot
is kept at every smaller budget on the way. EDM's schedule has no decay, the learning-rate ramp-up is
fixed in kimg (`--rampup`, a share of the smallest budget) and the EMA ramp-up depends only on images
seen, and a run resumed from its training state continues bit for bit; so the snapshot at B is the model
a run of exactly B would give, and the curve costs one run of the largest budget per model and seed.

Scores: a Fréchet distance between Gaussians fitted to the penultimate-layer features of a small CNN
trained on the real training digits (vcdm.metrics.judge; neither diffusion model uses it), against the
300 held-out digits, with `--num` samples per model; the same for `--num` real training digits that the
classifier never saw gives the floor a perfect model would reach. FD from few images is biased upwards,
equally for every row of a table. The embedder is pixel-PCA, not CLIP: it captures layout rather than
semantics, so this is an analogue of the paper's setting, not a reproduction of its numbers.

    python benchmarks/quality.py --jobs 2                               # budgets 8,16,32 kimg, seeds 0,1
    python benchmarks/quality.py --budgets 1,2,4 --num 80 --steps 10 --jobs 2   # ~50 min on a busy 2-core CPU
    python benchmarks/quality.py --smoke                                # checks the script (seconds)
    python benchmarks/quality.py --extend RUN --budgets 4,8,16,32 --jobs 2   # RUN (4,8,16) to a 32 kimg budget
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, report, row, write_json  # noqa: E402  (sibling scripts, not a package)
from vcdm.data import digits  # noqa: E402
from vcdm.demo.budget import SMOKE, Sizes, fmt_time, say  # noqa: E402
from vcdm.demo.figures import save_panels  # noqa: E402
from vcdm.demo.run import new_run_dir  # noqa: E402
from vcdm.demo.sampling import sample_model, two_stage_images, write_true_embeddings  # noqa: E402
from vcdm.demo.training import read_stats, train_options, train_run  # noqa: E402
from vcdm.fileio import atomic_path, atomic_write  # noqa: E402
from vcdm.metrics.judge import make_judge  # noqa: E402
from vcdm.train.options import TrainOptions  # noqa: E402

MODELS = ("real", "uncond", "two_stage", "oracle")
LABELS = {"real": "real digits (floor)", "uncond": "(a) unconditional", "two_stage": "(b) two-stage",
          "oracle": "(c) two-stage, true embeddings"}
KINDS = ("prior", "image", "uncond")


@dataclass(frozen=True)
class Plan:
    """Training lengths (kimg) per model for each budget (U-Net kimg of compute per side)."""
    budgets: tuple[float, ...]
    prior_share: float
    flops: dict  # training FLOPs per image, per kind
    batch: int
    rampup_share: float = 0.05

    def kimg(self, kind: str, budget: float) -> float:
        """Whole batches of `kind` that the budget affords (at least one)."""
        work = budget * self.flops["uncond"]
        share = {"uncond": 1.0, "image": 1 - self.prior_share, "prior": self.prior_share}[kind]
        return max(round(share * work / self.flops[kind] * 1000 / self.batch), 1) * self.batch / 1000

    def rampup(self, kind: str) -> float:
        """The learning-rate ramp-up (kimg), fixed for every budget: a share of the smallest."""
        return self.rampup_share * self.kimg(kind, self.budgets[0])


def training_flops(opts: TrainOptions) -> float:
    """FLOPs of one training step per image (loss, backward) for the network `opts` describe, counted
    on random inputs of the real shapes. The global RNG is left as it was."""
    from torch.utils.flop_counter import FlopCounterMode

    from vcdm.train.build import build

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        s = build(opts, torch.device("cpu"))
        n = 8
        x = torch.randn(n, s.structure.latent_dim)
        y = torch.randn(n, s.structure.observed_dim) if s.structure.observed_dim else None
        counter = FlopCounterMode(display=False)
        with counter:
            s.loss_fn(s.denoiser, x, y).sum().backward()
    return counter.get_total_flops() / n


def train_nested(opts: TrainOptions, lengths: list[float], rampup: float) -> list[dict]:
    """Train once through the increasing `lengths` (kimg), resuming from the previous length's state;
    returns, per length, the kept EMA snapshot, the kimg trained and the training seconds so far."""
    out, run_dir = [], Path(opts.outdir)
    for i, kimg in enumerate(lengths):
        done = sorted(run_dir.glob(f"budget{i}-network-snapshot-*.safetensors"))
        if done:  # --extend: an earlier run of the same plan trained this leg
            ticks = [r for r in read_stats(run_dir) if r["nimg"] <= kimg * 1000 + 0.5]
            out.append({"snapshot": done[-1], "kimg": ticks[-1]["nimg"] / 1000,
                        "train_sec": sum(r.get("sec_per_tick", 0.0) for r in ticks)})
            continue
        leg = dataclasses.replace(opts, duration=kimg / 1000, lr_rampup=rampup, tick=max(kimg / 4, opts.batch / 1000),
                                  sample=0, resume=str(run_dir) if i else None)
        snapshot, trained, _ = train_run(leg)
        kept = run_dir / f"budget{i}-{snapshot.name}"  # out of the loop's snapshot-* pattern
        snapshot.replace(kept)
        secs = sum(r.get("sec_per_tick", 0.0) for r in read_stats(run_dir))
        out.append({"snapshot": kept, "kimg": trained, "train_sec": secs})
    return out


@torch.no_grad()
def conditioning_gap(image_model: Path, images: torch.Tensor, device: str, sigma: float = 1.0) -> float:
    """How much worse the image model denoises `images` (uint8) given another image's embedding than given
    their own: MSE(embeddings rolled by one) / MSE(own embeddings) - 1 at noise level `sigma`, fixed noise.
    It rises as soon as the network uses its embedding, long before its samples are recognisable."""
    from vcdm.data.dataset import to_float
    from vcdm.generate import load_model
    from vcdm.generate.core import model_embedder

    model = load_model(image_model, device)
    denoiser, x0 = model.denoiser.eval(), to_float(images).to(device)
    y = model_embedder(model, None, torch.device(device)).embed(x0)
    n = len(x0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(device) * sigma
    sigmas = torch.full((n,), sigma, device=device)

    def mse(cond: torch.Tensor) -> float:
        return float((denoiser((x0 + noise).reshape(n, -1), sigmas, cond) - x0.reshape(n, -1)).square().mean())

    return mse(y.roll(1, 0)) / mse(y) - 1


@dataclass
class Context:
    plan: Plan
    judge: object
    paths: dict
    sizes: Sizes
    num: int
    steps: int
    device: str
    progress: bool


def evaluate_budget(ctx: Context, out: Path, uncond: Path, prior: Path, image: Path) -> tuple[dict, dict]:
    """Sample (a), (b), (c) from the given snapshots and score them; returns (rows, images)."""
    seeds = list(range(ctx.num))
    kw = dict(steps=ctx.steps, device=ctx.device, progress=ctx.progress)
    images = {"uncond": sample_model(uncond, seeds, out / "samples-uncond", **kw),
              "two_stage": two_stage_images(prior, image, seeds, out / "samples-two-stage", **kw)}
    held_out = ctx.judge.test_images[:ctx.num]
    write_true_embeddings(image, held_out, out / "true-embeddings", ctx.device)
    images["oracle"] = sample_model(image, seeds, out / "samples-oracle", load_obs_from=out / "true-embeddings", **kw)
    rows = {"real": ctx.judge.real_floor(ctx.num), "uncond": ctx.judge.evaluate(images["uncond"]),
            "two_stage": ctx.judge.evaluate(images["two_stage"]),
            "oracle": ctx.judge.evaluate(images["oracle"], labels=ctx.judge.test_labels[:ctx.num])}
    rows["oracle"]["cond_gap"] = conditioning_gap(image, held_out, ctx.device)
    return rows, images


def run_seed(seed: int, out: Path, ctx: Context) -> dict[str, dict]:
    """Train (a) and (b) through every budget and score them; returns {budget: rows}."""
    plan = ctx.plan
    opts = {kind: train_options(kind, ctx.paths["train"], out / kind, ctx.sizes, seed=seed * 3 + i, device=ctx.device)
            for i, kind in enumerate(KINDS)}
    trained = {}
    for kind in KINDS:
        lengths = [plan.kimg(kind, b) for b in plan.budgets]
        say(f"seed {seed}: training {kind} through {', '.join(f'{k:g}' for k in lengths)} kimg")
        trained[kind] = train_nested(opts[kind], lengths, plan.rampup(kind))
    results = {}
    for i, budget in enumerate(plan.budgets):
        say(f"seed {seed}, budget {budget:g} kimg: sampling {ctx.num} images from (a), (b) and (c)")
        t = {kind: trained[kind][i] for kind in KINDS}
        rows, images = evaluate_budget(ctx, out / f"budget-{budget:g}", t["uncond"]["snapshot"],
                                       t["prior"]["snapshot"], t["image"]["snapshot"])
        rows["uncond"].update(kimg=t["uncond"]["kimg"], train_sec=t["uncond"]["train_sec"])
        rows["two_stage"].update(prior_kimg=t["prior"]["kimg"], image_kimg=t["image"]["kimg"],
                                 prior_sec=t["prior"]["train_sec"], image_sec=t["image"]["train_sec"],
                                 train_sec=t["prior"]["train_sec"] + t["image"]["train_sec"])
        results[f"{budget:g}"] = rows
        if i == len(plan.budgets) - 1:
            save_panels([("real (held out)", ctx.judge.test_images[:ctx.num]), ("(a) unconditional", images["uncond"]),
                         ("(b) two-stage", images["two_stage"]), ("(c) true embeddings", images["oracle"])],
                        out.parent / f"samples-seed-{seed}.png")
    return results


# ------------------------------------------------------------------------------------------ report
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def column(results: dict, budget: str, model: str, key: str) -> list[float]:
    return [r[budget][model][key] for r in results.values() if r[budget][model].get(key) is not None]


def summary_rows(results: dict[int, dict]) -> list[dict]:
    """The common result rows: per budget, each FD (and (c)'s accuracy) as the median over seeds with its
    min and max; (b)'s FD compared with (a)'s."""
    rows = []
    for b in next(iter(results.values())):
        def spread_row(metric: str, model: str, key: str, unit: str, **kw) -> dict:
            values = column(results, b, model, key)
            return row(f"{metric}, {b} kimg", statistics.median(values), unit, low=min(values), high=max(values),
                       reps=len(values), note="over training seeds", **kw)

        uncond, two_stage = (statistics.median(column(results, b, m, "fd")) for m in ("uncond", "two_stage"))
        rows += [spread_row("(a) unconditional FD", "uncond", "fd", "FD"),
                 spread_row("(b) two-stage FD", "two_stage", "fd", "FD", reference=f"(a) unconditional FD, {b} kimg",
                            ratio=two_stage / uncond),
                 spread_row("(c) true embeddings FD", "oracle", "fd", "FD"),
                 spread_row("(c) class accuracy", "oracle", "accuracy", ""),
                 spread_row("real floor FD", "real", "fd", "FD")]
    return rows


def table(results: dict[int, dict], record: dict) -> str:
    seeds, plan = sorted(results), record["plan"]
    budgets = list(next(iter(results.values())))
    lines = [(f"Two-stage vs unconditional on the UCI digits (16x16) against the training budget; seeds "
              f"{','.join(map(str, seeds))}" + (", mean ± std over seeds" if len(seeds) > 1 else "")),
             (f"Judge: CNN classifier (held-out accuracy {record['classifier_test_accuracy']:.1%}); "
              f"Fréchet distance (FD) in its feature space vs the 300 held-out digits, {record['num']} images per "
              f"model, {record['steps']}-step Heun"),
             (f"Budget: kimg of U-Net training per side; (b) gives {plan['prior_share']:.0%} of its FLOPs to the prior "
              f"(U-Net/prior training FLOPs per image: {plan['flops']['uncond'] / plan['flops']['prior']:.0f}x)"),
             "",
             "| budget (kimg) | (a) unconditional FD | (b) two-stage FD | (b) vs (a) | (c) true embeddings FD "
             "| (c) accuracy | (c) loss gap | real floor FD | prior + image kimg | training s (a) / (b) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for b in budgets:
        col = lambda model, key: column(results, b, model, key)
        change = [100 * (t / u - 1) for t, u in zip(col("two_stage", "fd"), col("uncond", "fd"))]
        kimg = f"{fmt(col('two_stage', 'prior_kimg'), 1)} + {fmt(col('two_stage', 'image_kimg'), 2)}"
        secs = f"{fmt(col('uncond', 'train_sec'), 0)} / {fmt(col('two_stage', 'train_sec'), 0)}"
        lines.append(f"| {b} | {fmt(col('uncond', 'fd'))} | {fmt(col('two_stage', 'fd'))} | {fmt(change, 1)}% | "
                     f"{fmt(col('oracle', 'fd'))} | {fmt(col('oracle', 'accuracy'), 3)} | "
                     f"{fmt(col('oracle', 'cond_gap'), 3)} | {fmt(col('real', 'fd'))} | {kimg} | {secs} |")
    lines += ["", ("(b) vs (a): FD change, negative = two-stage better (the paper: -25% to -50% FID with CLIP "
                   "embeddings). (c) is conditioned on the held-out digits themselves, so it can score below the "
                   "floor; (c) accuracy near 0.1 means either that the image model ignores its embedding or that its "
                   "samples are not yet recognisable digits (FD far above the floor). (c) loss gap: how much worse "
                   "(b)'s image model denoises the held-out digits (sigma 1) given another digit's embedding than "
                   "given their own; above 0 the embedding is used.")]
    return "\n".join(lines)


def plot(results: dict[int, dict], path: Path) -> None:
    """FD of (a), (b), (c) and the floor against the budget (mean ± std), and (c)'s accuracy."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(next(iter(results.values())))
    xs = [float(b) for b in budgets]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    for model, style in [("uncond", "o-"), ("two_stage", "s-"), ("oracle", "^--"), ("real", ":")]:
        stats = [mean_std(column(results, b, model, "fd")) for b in budgets]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], fmt=style, capsize=3, label=LABELS[model])
    ax.set(xscale="log", yscale="log", xlabel="training budget per side (U-Net kimg)", ylabel="Fréchet distance ↓")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=7)
    acc = [mean_std(column(results, b, "oracle", "accuracy")) for b in budgets]
    ax2.errorbar(xs, [m for m, _ in acc], yerr=[s for _, s in acc], fmt="^--", capsize=3, color="C2")
    ax2.axhline(0.1, color="grey", lw=0.8, ls=":")
    ax2.set(xscale="log", ylim=(0, 1), xlabel="training budget per side (U-Net kimg)",
            ylabel="(c) class accuracy (0.1 = chance)")
    ax2.set_xticks(xs, [f"{x:g}" for x in xs])
    ax2.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    fig.suptitle(f"Two-stage vs unconditional, UCI digits, seeds {','.join(map(str, sorted(results)))}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------ running
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="8,16,32", help="U-Net kimg per side, increasing [8,16,32]")
    p.add_argument("--seeds", default="0,1", help="training seeds, e.g. 0,1,2 [0,1]")
    p.add_argument("--jobs", type=int, default=1, help="seeds trained at once, each in its own process [1]")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process [1]; small networks on "
                   "busy cores run fastest on one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--outdir", default="demo-runs", help="where to make the run folder [demo-runs]")
    p.add_argument("--num", type=int, default=digits.TEST_PER_CLASS * 10,
                   help="samples per model, at most the 300 held-out digits [300]")
    p.add_argument("--steps", type=int, default=Sizes.steps, help=f"Heun steps, both stages [{Sizes.steps}]")
    p.add_argument("--prior-share", type=float, default=Sizes.prior_share,
                   help=f"share of (b)'s training FLOPs given to the prior [{Sizes.prior_share}]")
    p.add_argument("--rampup", type=float, default=0.05,
                   help="learning-rate ramp-up, as a share of the smallest budget [0.05]")
    p.add_argument("--smoke", action="store_true", help="tiny networks, a few steps: checks the script")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--extend", type=Path, default=None, metavar="RUN",
                   help="continue the run folder RUN to more budgets: its --budgets must begin with RUN's")
    p.add_argument("--json", metavar="PATH", help="also write the common result rows (benchmarks/common.py) as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # run one seed into this folder (used by --jobs)
    args = p.parse_args(argv)
    try:
        args.budgets = [float(b) for b in args.budgets.split(",")]
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error("--budgets and --seeds take comma-separated numbers")
    if not all(b > 0 for b in args.budgets) or args.budgets != sorted(set(args.budgets)):
        p.error(f"--budgets must be positive and increasing, got {args.budgets}")
    if not 2 <= args.num <= digits.TEST_PER_CLASS * 10:
        p.error(f"--num: expected 2..{digits.TEST_PER_CLASS * 10}, got {args.num}")
    if not (0 < args.prior_share < 1 and 0 <= args.rampup <= 1 and args.jobs >= 1 and args.threads >= 1
            and args.steps >= 1):
        p.error("--prior-share must be in (0, 1), --rampup in [0, 1], --jobs, --threads and --steps positive")
    return args


def make_plan(args: argparse.Namespace, paths: dict, sizes: Sizes, run: Path) -> Plan:
    probe = {kind: train_options(kind, paths["train"], run / "probe", sizes, seed=0, device="cpu") for kind in KINDS}
    flops = {kind: training_flops(o) for kind, o in probe.items()}
    plan = Plan(tuple(args.budgets), args.prior_share, flops, sizes.batch, args.rampup)
    for kind in KINDS:
        lengths = [plan.kimg(kind, b) for b in plan.budgets]
        if lengths != sorted(set(lengths)):
            raise SystemExit(f"Error: --budgets {args.budgets} give {kind} the same length twice "
                             f"({lengths} kimg in batches of {sizes.batch}); space them further apart")
    return plan


def check_extends(run: Path, budgets: list[float]) -> None:
    """--extend: the earlier run's budgets must be the first of ``budgets`` (same ramp-up, same legs)."""
    try:
        before = list(json.loads((run / "results.json").read_text())["plan"]["budgets"])
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"Error: --extend {run}: not a finished quality run ({e})") from None
    if [float(b) for b in before] != budgets[:len(before)] or len(budgets) <= len(before):
        raise SystemExit(f"Error: --extend {run}: --budgets must begin with its budgets {before} and add more, "
                         f"got {budgets}")


def run_workers(args: argparse.Namespace, run: Path) -> None:
    """Each seed in its own process (`--jobs` at a time), writing seed-<s>/results.json."""
    common = ["--budgets", ",".join(f"{b:g}" for b in args.budgets), "--num", str(args.num), "--steps",
              str(args.steps), "--prior-share", str(args.prior_share), "--rampup", str(args.rampup),
              "--threads", str(args.threads), "--device", args.device, "--no-progress"]
    run_seed_processes(__file__, args.seeds, args.jobs, run, common + (["--smoke"] if args.smoke else []))


def run_seed_processes(script: str, seeds: list[int], jobs: int, run: Path, common: list[str]) -> None:
    """Run `script --seeds S --worker RUN *common` for each seed, `jobs` at a time, each logging to
    RUN/seed-S.log; stop with one Error line naming the log of the first that fails."""
    pending, running = list(seeds), []
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            log = open(run / f"seed-{seed}.log", "w")
            cmd = [sys.executable, script, "--seeds", str(seed), "--worker", str(run), *common]
            running.append((seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
            say(f"seed {seed}: started (log {run / f'seed-{seed}.log'})")
        time.sleep(1.0)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            item[2].close()
            if item[1].returncode:
                raise SystemExit(f"Error: seed {item[0]} failed (exit {item[1].returncode}); "
                                 f"see {run / f'seed-{item[0]}.log'}")
            say(f"seed {item[0]}: done")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start, info = time.perf_counter(), machine(args.device)
    sizes = SMOKE if args.smoke else Sizes()
    if args.smoke:
        args.budgets = [2 ** (i + 1) * SMOKE.batch / 1000 for i in range(len(args.budgets))]
    run = Path(args.worker or args.extend or new_run_dir(args.outdir, "quality-smoke" if args.smoke else "quality"))
    if args.extend and not args.worker:
        check_extends(run, args.budgets)
    paths = digits.write_digits(run / "data", sizes.resolution) if not (args.worker or args.extend) else \
        {"train": run / "data" / f"digits-train-{sizes.resolution}x{sizes.resolution}.zip"}
    if not args.worker:
        say(f"Run folder {run}; budgets {args.budgets} kimg per side; seeds {args.seeds} on {args.device}")
    if len(args.seeds) > 1 and args.jobs > 1:
        run_workers(args, run)
    else:
        judge = make_judge(sizes.resolution, epochs=sizes.classifier_epochs, device=args.device, progress=args.progress)
        ctx = Context(make_plan(args, paths, sizes, run), judge, paths, sizes, args.num, args.steps, args.device,
                      args.progress)
        for seed in args.seeds:
            rows = run_seed(seed, run / f"seed-{seed}", ctx)
            write_json(run / f"seed-{seed}" / "results.json",
                       {"seed": seed, "results": rows, "classifier_test_accuracy": judge.test_accuracy,
                        "plan": dataclasses.asdict(ctx.plan)})
    if args.worker:
        return
    parts = [json.loads((run / f"seed-{s}" / "results.json").read_text()) for s in args.seeds]
    results = {p["seed"]: p["results"] for p in parts}
    record = {"seeds": args.seeds, "results": results, "classifier_test_accuracy": parts[0]["classifier_test_accuracy"],
              "plan": parts[0]["plan"], "num": args.num, "steps": args.steps, "threads": args.threads,
              "jobs": args.jobs, "device": args.device, "wall_seconds": time.perf_counter() - start,
              "sizes": dataclasses.asdict(sizes)}
    text = table(results, record) + f"\n\nWall time {fmt_time(record['wall_seconds'])}; run folder {run}"
    write_json(run / "results.json", record)
    with atomic_write(run / "table.md", "w") as f:
        f.write(text + "\n")
    plot(results, run / "quality.png")
    print("\n" + text, flush=True)
    report(args, "quality", summary_rows(results), info, record["wall_seconds"], run=str(run))


if __name__ == "__main__":
    sys.exit(main())
