"""Guidance on the demo digits: Fréchet distance (the demo's judge) and the judge's confidence against the
guidance scale W, for autoguidance of an unconditional image model, of the prior, of the image model of a
two-stage pair, and of both stages, each without and with a guidance interval.

Every guide is an earlier snapshot of the same training run (autoguidance, Karras et al. 2024): each
model trains once through two lengths, and the first length's EMA snapshot guides the second's. The
digits are kept at their native 8x8 so that the whole benchmark fits a few CPU minutes; the models are
therefore far from converged, which is the regime in which a weaker snapshot is most unlike the model.

For each seed s, images s*N .. s*N+N-1 are drawn with the same latents for every setting (common random
numbers: differences between W are not drowned by sampling noise) and scored against the held-out
digits. Results go to <out>/results.jsonl (one line per setting, appended; a rerun skips done settings),
<out>/table.md and <out>/fd-vs-w.png.

    python benchmarks/guidance.py --out guidance-run --seeds 0,1 --num 200
    python benchmarks/guidance.py --out guidance-run --report
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quality import train_nested  # noqa: E402  (a sibling script, not a package)

from vcdm.data import digits  # noqa: E402
from vcdm.demo.budget import Sizes  # noqa: E402
from vcdm.demo.training import train_options  # noqa: E402
from vcdm.fileio import atomic_write, parse_int_list  # noqa: E402

SIZES = Sizes(resolution=8, cres=(1, 2))
LENGTHS = {"uncond": (1.0, 6.0), "image": (1.0, 6.0), "prior": (4.0, 24.0)}  # (guide, model) kimg
SAMPLER = dict(sampler="unipc", steps=12)
WEIGHTS = (1.0, 1.5, 2.0, 3.0)
INTERVAL = (0.28, 2.9)  # the interval EDM2-XXL's guidance uses (Kynkäänniemi et al. 2024), in this data's sigma
SETTINGS = {  # label: (pipeline, which stages the earlier snapshot guides)
    "uncond: image autoguided": ("uncond", ("image",)),
    "two-stage: prior autoguided": ("two_stage", ("prior",)),
    "two-stage: image autoguided": ("two_stage", ("image",)),
    "two-stage: both autoguided": ("two_stage", ("prior", "image")),
}


def train(out: Path, device: str) -> dict[str, dict[str, Path]]:
    """{kind: {"guide": snapshot, "model": snapshot}}, training each kind once through its two lengths."""
    data = digits.write_digits(out / "data", SIZES.resolution)
    nets = {}
    for i, (kind, lengths) in enumerate(LENGTHS.items()):
        done = sorted((out / kind).glob("budget*-network-snapshot-*.safetensors"))
        if len(done) < 2:
            opts = train_options(kind, data["train"], out / kind, SIZES, seed=i, device=device)
            start = time.perf_counter()
            done = [r["snapshot"] for r in train_nested(opts, list(lengths), rampup=lengths[0] / 2)]
            print(f"trained {kind} through {lengths} kimg in {time.perf_counter() - start:.0f} s", flush=True)
        nets[kind] = {"guide": done[0], "model": done[1]}
    return nets


def sample(nets: dict, pipeline: str, guided: tuple[str, ...], w: float, interval: tuple[float, float] | None,
           seeds: list[int], device: str) -> torch.Tensor:
    """uint8 (N, C, H, W) images of one setting, in memory through vcdm's Python API."""
    import vcdm

    def stage(stage: str, kind: str, prefix: str) -> dict:
        if stage not in guided or w == 1:
            return {}
        return {f"{prefix}gnet": nets[kind]["guide"], f"{prefix}guidance": w, f"{prefix}guidance_interval": interval}

    if pipeline == "uncond":
        pipe = vcdm.Pipeline.from_checkpoint(nets["uncond"]["model"], device=device)
        out = pipe(seeds, **SAMPLER, **stage("image", "uncond", ""))
    else:
        pipe = vcdm.TwoStagePipeline.from_checkpoints(nets["prior"]["model"], nets["image"]["model"], device=device)
        kw = {f"{p}_{k}": v for p in ("prior", "image") for k, v in SAMPLER.items()}
        out = pipe(seeds, **kw, **stage("prior", "prior", "prior_"), **stage("image", "image", "image_"))
    return torch.from_numpy(out.images).permute(0, 3, 1, 2)


def run(args: argparse.Namespace) -> None:
    from vcdm.metrics.judge import make_judge

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nets = train(out, args.device)
    judge = make_judge(SIZES.resolution, epochs=SIZES.classifier_epochs, device=args.device, progress=False)
    log = out / "results.jsonl"
    done = {(r["setting"], r["w"], tuple(r["interval"] or ()), r["seed"]) for r in read(log)}
    rows = [(label, w, interval) for label in SETTINGS for w in WEIGHTS
            for interval in ((None, INTERVAL) if w != 1 else (None,))]
    for seed in parse_int_list(args.seeds, "--seeds"):
        seeds = list(range(seed * args.num, (seed + 1) * args.num))
        if ("real", 1.0, (), seed) not in done:
            append(log, dict(setting="real", w=1.0, interval=None, seed=seed, **scores(judge.real_floor(args.num))))
        for label, w, interval in rows:
            if (label, w, interval or (), seed) in done:
                continue
            start = time.perf_counter()
            images = sample(nets, *SETTINGS[label], w, interval, seeds, args.device)
            row = dict(setting=label, w=w, interval=list(interval) if interval else None, seed=seed,
                       sec=round(time.perf_counter() - start, 1), **scores(judge.evaluate(images)))
            append(log, row)
            print(json.dumps(row), flush=True)


def scores(result: dict) -> dict:
    return {k: result[k] for k in ("fd", "mean_confidence", "class_entropy")}


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
    real = [r["fd"] for r in rows if r["setting"] == "real"]
    n = len({r["seed"] for r in rows})
    lines = [f"FD (demo judge, vs the held-out digits) and the judge's mean confidence against the guidance "
             f"scale W; 8x8 digits, {n} seeds, mean ± std over seeds, Δ paired by seed against W = 1. Guides: "
             f"earlier EMA snapshots of the same runs ({', '.join(f'{k} {g:g} of {m:g} kimg' for k, (g, m) in LENGTHS.items())}). "
             f"Sampler: UniPC, 12 steps per stage. Interval: {INTERVAL[0]} < sigma <= {INTERVAL[1]}. "
             f"Real-digit floor: FD {fmt(real)}.", "",
             "| setting | W | interval | FD | Δ FD vs W = 1 | mean confidence | class entropy |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["setting"], r["w"], tuple(r["interval"]) if r["interval"] else ()) for r in rows
                   if r["setting"] != "real"}, key=lambda k: (list(SETTINGS).index(k[0]), k[1], k[2]))
    for setting, w, interval in keys:
        sel = [r for r in rows if (r["setting"], r["w"], tuple(r["interval"]) if r["interval"] else ()) ==
               (setting, w, interval)]
        delta = [r["fd"] - base[(setting, r["seed"])]["fd"] for r in sel if (setting, r["seed"]) in base]
        lines.append(f"| {setting} | {w:g} | {','.join(map(str, interval)) or '-'} | {fmt([r['fd'] for r in sel])} | "
                     f"{fmt(delta) if w != 1 else '-'} | {fmt([r['mean_confidence'] for r in sel], 3)} | "
                     f"{fmt([r['class_entropy'] for r in sel], 3)} |")
    text = "\n".join(lines) + "\n"
    with atomic_write(out / "table.md", "w") as f:
        f.write(text)
    plot(rows, out / "fd-vs-w.png")
    return text


def plot(rows: list[dict], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, interval in zip(axes, (None, list(INTERVAL))):
        for setting in SETTINGS:
            pts = []
            for w in WEIGHTS:
                sel = [r["fd"] for r in rows if r["setting"] == setting and r["w"] == w
                       and (r["interval"] == interval or w == 1)]
                if sel:
                    pts.append((w, statistics.mean(sel)))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=setting)
        ax.set_title("no interval" if interval is None else f"interval ({interval[0]}, {interval[1]}]")
        ax.set_xlabel("guidance W")
    axes[0].set_ylabel("FD (demo judge; lower is better)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(dest, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Run folder (models, results.jsonl, table.md, fd-vs-w.png)")
    p.add_argument("--seeds", default="0,1", help="Seeds of the image sets (each N images)")
    p.add_argument("--num", type=int, default=200, help="Images per seed and setting (the floor has 300)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--report", action="store_true", help="Only write table.md and fd-vs-w.png from results.jsonl")
    args = p.parse_args()
    if not args.report:
        run(args)
    print(report(Path(args.out)))


if __name__ == "__main__":
    main()
