"""Guidance on the demo digits: Fréchet distance (the demo's judge), class accuracy where a class was
requested, and the judge's confidence against the guidance scale W, each without and with a guidance
interval, for
- autoguidance of an unconditional image model, of the prior, of the image model of a two-stage pair,
  and of both stages;
- a class-conditional image model trained with --cond-drop, guided by its own unconditional branch
  (classifier-free guidance, CFG) or by an earlier snapshot (autoguidance).

Every autoguide is an earlier snapshot of the same training run (Karras et al. 2024): each model trains
through two lengths, and the first length's EMA snapshot guides the second's. The digits are kept at
their native 8x8 so that the whole benchmark fits a few CPU minutes; the models are therefore far from
converged, which is the regime in which a weaker snapshot is most unlike the model.

Seed s trains every model anew (training seeds differ per model and per s) and draws images
s*N .. s*N+N-1 with the same latents for every setting (common random numbers: differences between W
are not drowned by sampling noise), so the spread over seeds holds both training and sampling noise.
The class-conditional model is asked for N/10 images of each digit, and its class accuracy is the
share of images the judge classifies as the requested digit. Unconditional and two-stage samples have
no requested class, so there the judge's mean confidence and the entropy of its class histogram
(diversity; log 10 = 2.303 is uniform) stand in. Results go to <out>/results.jsonl (one line per
setting, appended; a rerun skips done settings), <out>/training.jsonl, <out>/table.md and
<out>/fd-vs-w.png.

    python benchmarks/guidance.py --out guidance-run --seeds 0,1 --num 200 --threads 1
    python benchmarks/guidance.py --out guidance-run --report
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

sys.path.insert(0, str(Path(__file__).parent))
from common import describe, machine  # noqa: E402  (sibling scripts, not a package)
from quality import train_nested  # noqa: E402

from vcdm.data import digits  # noqa: E402
from vcdm.demo.budget import Sizes  # noqa: E402
from vcdm.demo.training import train_options  # noqa: E402
from vcdm.fileio import atomic_write, parse_int_list  # noqa: E402

SIZES = Sizes(resolution=8, cres=(1, 2))
LENGTHS = {"uncond": (1.0, 6.0), "image": (1.0, 6.0), "prior": (4.0, 24.0), "class": (1.0, 6.0)}  # (guide, model) kimg
COND_DROP = 0.1  # the class-conditional model's --cond-drop (what guidance_warning suggests)
NUM_CLASSES = 10
SAMPLER = dict(sampler="unipc", steps=12)
WEIGHTS = (1.0, 1.5, 2.0, 3.0)
INTERVAL = (0.28, 2.9)  # the interval EDM2-XXL's guidance uses (Kynkäänniemi et al. 2024), in this data's sigma
SETTINGS = {  # label: (pipeline, {guided stage: its guide, "snapshot" (the earlier one) or "cfg" (the null condition)})
    "uncond: image autoguided": ("uncond", {"image": "snapshot"}),
    "two-stage: prior autoguided": ("two_stage", {"prior": "snapshot"}),
    "two-stage: image autoguided": ("two_stage", {"image": "snapshot"}),
    "two-stage: both autoguided": ("two_stage", {"prior": "snapshot", "image": "snapshot"}),
    "class-cond.: CFG": ("class", {"image": "cfg"}),
    "class-cond.: image autoguided": ("class", {"image": "snapshot"}),
}


def options(kind: str, data: Path, outdir: Path, seed: int, device: str):
    """The demo's training options of `kind`; 'class' is its unconditional image model given the digit's
    one-hot label, with conditioning dropout so that its null condition is a trained unconditional model."""
    if kind != "class":
        return train_options(kind, data, outdir, SIZES, seed=seed, device=device)
    return dataclasses.replace(train_options("uncond", data, outdir, SIZES, seed=seed, device=device),
                               exist=[1, 1], observed=[0, 1], cond_drop=COND_DROP)


def train(out: Path, seed: int, device: str) -> dict[str, dict[str, Path]]:
    """{kind: {"guide": snapshot, "model": snapshot}} of seed `seed`, training each kind once through its two
    lengths. Training seeds: seed * 4 + the kind's index, so seed 0's first three are the earlier runs' 0, 1, 2."""
    data = digits.write_digits(out / "data", SIZES.resolution)
    nets = {}
    for i, (kind, lengths) in enumerate(LENGTHS.items()):
        run_dir = out / f"seed{seed}" / kind
        done = sorted(run_dir.glob("budget*-network-snapshot-*.safetensors"))
        if len(done) < 2:
            opts = options(kind, data["train"], run_dir, seed * len(LENGTHS) + i, device)
            start, cpu = time.perf_counter(), time.process_time()
            done = [r["snapshot"] for r in train_nested(opts, list(lengths), rampup=lengths[0] / 2)]
            row = dict(kind=kind, seed=seed, kimg=list(lengths), sec=round(time.perf_counter() - start, 1),
                       cpu_sec=round(time.process_time() - cpu, 1))
            append(out / "training.jsonl", row)
            print(json.dumps(row), flush=True)
        nets[kind] = {"guide": done[0], "model": done[1]}
    return nets


def sample(nets: dict, pipeline: str, guides: dict[str, str], w: float, interval: tuple[float, float] | None,
           seeds: list[int], device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (N, C, H, W) images of one setting, in memory through vcdm's Python API, and the requested
    classes (None: no class requested). The class-conditional model gets N/10 seeds per class, in order."""
    import vcdm

    def stage(stage: str, kind: str, prefix: str) -> dict:
        if stage not in guides or w == 1:
            return {}
        gnet = {} if guides[stage] == "cfg" else {f"{prefix}gnet": nets[kind]["guide"]}
        return {**gnet, f"{prefix}guidance": w, f"{prefix}guidance_interval": interval}

    if pipeline == "class":
        pipe = vcdm.Pipeline.from_checkpoint(nets["class"]["model"], device=device)
        per = len(seeds) // NUM_CLASSES
        outs = [pipe(seeds[c * per:(c + 1) * per], class_idx=c, **SAMPLER, **stage("image", "class", ""))
                for c in range(NUM_CLASSES)]
        images = torch.cat([torch.from_numpy(o.images) for o in outs])
        return images.permute(0, 3, 1, 2), torch.arange(NUM_CLASSES).repeat_interleave(per)
    if pipeline == "uncond":
        pipe = vcdm.Pipeline.from_checkpoint(nets["uncond"]["model"], device=device)
        out = pipe(seeds, **SAMPLER, **stage("image", "uncond", ""))
    else:
        pipe = vcdm.TwoStagePipeline.from_checkpoints(nets["prior"]["model"], nets["image"]["model"], device=device)
        kw = {f"{p}_{k}": v for p in ("prior", "image") for k, v in SAMPLER.items()}
        out = pipe(seeds, **kw, **stage("prior", "prior", "prior_"), **stage("image", "image", "image_"))
    return torch.from_numpy(out.images).permute(0, 3, 1, 2), None


def run(args: argparse.Namespace) -> None:
    from vcdm.metrics.judge import make_judge

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "machine.json", "w") as f:
        json.dump(machine(args.device), f)
    judge = make_judge(SIZES.resolution, epochs=SIZES.classifier_epochs, device=args.device, progress=False)
    log = out / "results.jsonl"
    done = {(r["setting"], r["w"], tuple(r["interval"] or ()), r["seed"]) for r in read(log)}
    rows = [(label, w, interval) for label in SETTINGS for w in WEIGHTS
            for interval in ((None, INTERVAL) if w != 1 else (None,))]
    for seed in parse_int_list(args.seeds, "--seeds"):
        nets = train(out, seed, args.device)
        seeds = list(range(seed * args.num, (seed + 1) * args.num))
        if ("real", 1.0, (), seed) not in done:
            append(log, dict(setting="real", w=1.0, interval=None, seed=seed, **scores(judge.real_floor(args.num))))
        for label, w, interval in rows:
            if (label, w, interval or (), seed) in done:
                continue
            start, cpu = time.perf_counter(), time.process_time()
            images, classes = sample(nets, *SETTINGS[label], w, interval, seeds, args.device)
            row = dict(setting=label, w=w, interval=list(interval) if interval else None, seed=seed,
                       sec=round(time.perf_counter() - start, 1), cpu_sec=round(time.process_time() - cpu, 1),
                       **scores(judge.evaluate(images, labels=classes)))
            append(log, row)
            print(json.dumps(row), flush=True)


def scores(result: dict) -> dict:
    """FD, the judge's confidence and class entropy, and the class accuracy where classes were requested."""
    return {k: result[k] for k in ("fd", "accuracy", "mean_confidence", "class_entropy") if k in result}


def read(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def append(log: Path, row: dict) -> None:
    with open(log, "a") as f:
        f.write(json.dumps(row) + "\n")


def fmt(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(out: Path) -> str:
    """table.md and fd-vs-w.png from results.jsonl; Δ is paired by seed against W = 1 of the same setting."""
    rows = read(out / "results.jsonl")
    base = {(r["setting"], r["seed"]): r for r in rows if r["w"] == 1.0}
    real = [r for r in rows if r["setting"] == "real"]
    n = len({r["seed"] for r in rows})
    lines = [f"FD (demo judge, vs the held-out digits), class accuracy (class-conditional rows: the judge's "
             f"argmax is the requested digit, {NUM_CLASSES} digits equally often), the judge's mean confidence "
             f"and the entropy of its class histogram against the guidance scale W; 8x8 digits, {n} seeds (each "
             f"trains every model anew), mean ± std over seeds, Δ paired by seed against W = 1. Autoguides: "
             f"earlier EMA snapshots of the same runs ({', '.join(f'{k} {g:g} of {m:g} kimg' for k, (g, m) in LENGTHS.items())}); "
             f"the class-conditional model is trained with --cond-drop {COND_DROP}, and CFG guides it by its own "
             f"null condition. Sampler: UniPC, 12 steps per stage. Interval: {INTERVAL[0]} < sigma <= {INTERVAL[1]}. "
             f"Real-digit floor: FD {fmt([r['fd'] for r in real])}, accuracy {fmt([r['accuracy'] for r in real], 3)}. "
             "Accuracy is n/a where no class was requested (unconditional and two-stage samples).", "",
             "| setting | W | interval | FD | Δ FD vs W = 1 | class accuracy | mean confidence | class entropy |",
             "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["setting"], r["w"], tuple(r["interval"]) if r["interval"] else ()) for r in rows
                   if r["setting"] != "real"}, key=lambda k: (list(SETTINGS).index(k[0]), k[1], k[2]))
    for setting, w, interval in keys:
        sel = [r for r in rows if (r["setting"], r["w"], tuple(r["interval"]) if r["interval"] else ()) ==
               (setting, w, interval)]
        delta = [r["fd"] - base[(setting, r["seed"])]["fd"] for r in sel if (setting, r["seed"]) in base]
        accuracy = fmt([r["accuracy"] for r in sel], 3) if all("accuracy" in r for r in sel) else "n/a"
        lines.append(f"| {setting} | {w:g} | {','.join(map(str, interval)) or '-'} | {fmt([r['fd'] for r in sel])} | "
                     f"{fmt(delta) if w != 1 else '-'} | {accuracy} | {fmt([r['mean_confidence'] for r in sel], 3)} | "
                     f"{fmt([r['class_entropy'] for r in sel], 3)} |")
    lines += ["", cost(out, rows)]
    text = "\n".join(lines) + "\n"
    with atomic_write(out / "table.md", "w") as f:
        f.write(text)
    plot(rows, out / "fd-vs-w.png")
    return text


def cost(out: Path, rows: list[dict]) -> str:
    """One line: the CPU seconds spent training and sampling (the judge's scoring and its own training not
    counted), and on what."""
    trained = read(out / "training.jsonl")
    where = out / "machine.json"
    info = describe(json.loads(where.read_text())) if where.is_file() else "an unrecorded machine"
    return (f"CPU time: training {sum(r['cpu_sec'] for r in trained) / 60:.1f} min ({len(trained)} runs), sampling "
            f"{sum(r.get('cpu_sec', 0.0) for r in rows) / 60:.1f} min; wall "
            f"{(sum(r['sec'] for r in trained) + sum(r.get('sec', 0.0) for r in rows)) / 60:.1f} min on {info}.")


def plot(rows: list[dict], dest: Path) -> None:
    """FD against W for every setting (top) and class accuracy for the class-conditional ones (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(setting: str, interval: list[float] | None, key: str) -> list[tuple[float, float]]:
        pts = []
        for w in WEIGHTS:
            sel = [r[key] for r in rows if r["setting"] == setting and r["w"] == w and key in r
                   and (r["interval"] == interval or w == 1)]
            if sel:
                pts.append((w, statistics.mean(sel)))
        return pts

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True, sharey="row", height_ratios=(3, 2))
    for col, interval in enumerate((None, list(INTERVAL))):
        for row, key in enumerate(("fd", "accuracy")):
            ax = axes[row, col]
            for i, setting in enumerate(SETTINGS):
                pts = curve(setting, interval, key)
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=setting)
        axes[0, col].set_title("no interval" if interval is None else f"interval ({interval[0]}, {interval[1]}]")
        axes[1, col].set_xlabel("guidance W")
    axes[0, 0].set_ylabel("FD (demo judge; lower is better)")
    axes[1, 0].set_ylabel("class accuracy (class-cond.)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(dest, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Run folder (models, results.jsonl, table.md, fd-vs-w.png)")
    p.add_argument("--seeds", default="0,1", help="Seeds: each trains every model anew and draws its own N images")
    p.add_argument("--num", type=int, default=200, help="Images per seed and setting (the floor has 300)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (small networks gain little from more)")
    p.add_argument("--report", action="store_true", help="Only write table.md and fd-vs-w.png from results.jsonl")
    args = p.parse_args()
    if args.num < 2 * NUM_CLASSES or args.num % NUM_CLASSES or args.threads < 1:
        p.error(f"--num must be a multiple of {NUM_CLASSES} (images per requested class), at least "
                f"{2 * NUM_CLASSES}; --threads positive")
    if not args.report:
        run(args)
    print(report(Path(args.out)))


if __name__ == "__main__":
    main()
