"""Training precision per CPU path: float32 against bfloat16 autocast, for vcdm's training default
(vcdm.perf.training_precision).

Two measurements, in worker processes of one thread each:

- Speed: images/s of vcdm's whole training loop (stats.jsonl: the ticks after the first, one step per
  tick) in float32 and under bf16 autocast, A/B interleaved in one process (f32, bf16, f32, bf16; one pair
  for DDPM++ 64x64 on AVX2, whose emulated bf16 takes minutes a step on a busy machine), for the demo's
  U-Net (DDPM++ 16x16, cbase 32, cres 1,2, batch 64, the digits) and for DDPM++ 64x64 at batch 4
  (benchmarks/train.py's configuration, the issue's figure), on this CPU's own path and on the emulated
  AVX2 path (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, set before torch loads).
- Quality: the demo's U-Net, unconditional, trained on the digits at their native 8x8 (as
  benchmarks/guidance.py, 4x cheaper than the demo's 16x16) in float32 and in bf16 from the same seeds
  (same initialisation, data order and noise): the loss per tick, and the Fréchet distance of the EMA
  snapshots at equal kimg (the demo's judge against the held-out digits, as benchmarks/quality.py, the same
  sampling seeds for every model).

    python benchmarks/precision.py --out precision-run                 # both, then the report
    python benchmarks/precision.py --out precision-run --part speed    # one part (two commands: both at once)
    python benchmarks/precision.py --out precision-run --report        # the table and plot again
    python benchmarks/precision.py --out smoke --smoke                 # checks the script

Writes <out>/speed-<path>.json, <out>/quality-seed-<s>-<precision>.json, <out>/precision-digits.md and
<out>/precision-digits.png; a rerun skips the workers whose results exist.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_name, machine, result, row, rows_table, write_json
from train import make_dataset, options as ddpmpp_options
from vcdm.data import digits
from vcdm.demo.budget import SMOKE, Sizes
from vcdm.demo.sampling import sample_model
from vcdm.demo.training import read_stats, train_options
from vcdm.fileio import atomic_path, atomic_write, parse_int_list
from vcdm.perf import cpu_path
from vcdm.train import train

SIZES = Sizes()  # the demo's: its U-Net at 16x16 (speed)
QUALITY_SIZES = Sizes(resolution=8)  # the same U-Net on the digits' native 8x8 (as benchmarks/guidance.py): 4x cheaper
PATHS = {"default": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
PRECISIONS = {"f32": False, "bf16": True}


def quiet(fn, *args, **kwargs):
    """fn(*args, **kwargs) without the training loop's per-tick output."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        return fn(*args, **kwargs)


def loop_rate(opts) -> float:
    """Images/s of a run: median over its ticks after the first (one step per tick)."""
    ticks = read_stats(quiet(train, opts))[1:]
    return 1000 / statistics.median(t["sec_per_kimg"] for t in ticks)


def speed_worker(out: Path, path: str, reps: int, steps: dict[str, int], sizes: Sizes) -> None:
    """Per model, the loop's images/s in f32 and bf16, interleaved `reps` times; writes speed-<path>.json."""
    rates: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo_data = digits.write_digits(tmp / "data", sizes.resolution)["train"]
        big_data = make_dataset(tmp / "bench-64.zip", n=128, res=64)
        for model in steps:
            rates[model] = {p: [] for p in PRECISIONS}
            for rep in range(1 if (model, path) == ("ddpmpp-64", "avx2") else reps):  # emulated bf16: minutes a step
                for precision, bf16 in PRECISIONS.items():
                    run = tmp / f"{model}-{precision}-{rep}"
                    if model == "demo":
                        opts = train_options("uncond", demo_data, run, sizes, seed=0, device="cpu")
                        opts.duration, opts.tick = sizes.batch * (steps[model] + 1) / 1e6, sizes.batch / 1000
                        opts.snap = opts.dump = opts.sample = 0
                    else:
                        opts = ddpmpp_options("ddpmpp-64", big_data, run, "cpu", 4, steps[model])
                        opts.workers = 0
                    opts.bf16 = bf16
                    rates[model][precision].append(loop_rate(opts))
                    print(f"{path} {model} {precision} rep {rep}: {rates[model][precision][-1]:.2f} img/s", flush=True)
    write_json(out / f"speed-{path}.json", {"path": path, "cpu_path": cpu_path(), "rates": rates, "steps": steps,
                                             "machine": machine(), "load_avg_end": os.getloadavg()[0]})


def quality_worker(out: Path, seed: int, precision: str, kimg: float, ticks: int, snaps: int, num: int,
                   sample_steps: int, sizes: Sizes) -> None:
    """Train the demo's unconditional U-Net for `kimg` in one precision; the loss per tick and the FD of the
    EMA snapshot every `ticks // snaps` ticks; writes quality-seed-<seed>-<precision>.json."""
    from vcdm.metrics.judge import make_judge

    data = digits.write_digits(out / "data", sizes.resolution)["train"]
    run = out / f"run-seed-{seed}-{precision}"
    opts = train_options("uncond", data, run, sizes, seed=seed, device="cpu")
    opts.duration, opts.lr_rampup, opts.tick = kimg / 1000, 0.05 * kimg, kimg / ticks
    opts.snap, opts.dump, opts.sample, opts.bf16 = ticks // snaps, 0, 0, PRECISIONS[precision]
    start = time.perf_counter()
    quiet(train, opts)
    train_sec = time.perf_counter() - start
    judge = quiet(make_judge, sizes.resolution, epochs=sizes.classifier_epochs, device="cpu", progress=False)
    fd = {}
    for snapshot in sorted(run.glob("network-snapshot-*.safetensors")):
        nimg = int(snapshot.stem.split("-")[-1]) * 1000
        if nimg == 0:
            continue
        images = sample_model(snapshot, list(range(num)), run / f"samples-{nimg}", steps=sample_steps, device="cpu",
                              progress=False)
        fd[nimg] = judge.evaluate(images)["fd"]
    records = read_stats(run)
    write_json(out / f"quality-seed-{seed}-{precision}.json", {
        "seed": seed, "precision": precision, "kimg": kimg, "train_sec": train_sec, "cpu_path": cpu_path(),
        "loss": [(r["nimg"], r["loss"]) for r in records], "fd": fd, "real_fd": judge.real_floor(num)["fd"],
        "sec_per_kimg": [r["sec_per_kimg"] for r in records[1:]], "num": num, "sample_steps": sample_steps})


# ------------------------------------------------------------------------------------------ report
def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}" if len(values) > 1 else f"{values[0]:.3g}"


def speed_table(out: Path) -> list[str]:
    lines = ["| CPU path | model | float32 img/s | bf16 img/s | bf16 / float32 (per pair) |", "|---|---|---|---|---|"]
    for path in PATHS:
        f = out / f"speed-{path}.json"
        if not f.is_file():
            continue
        rec = json.loads(f.read_text())
        for model, rates in rec["rates"].items():
            pairs = [b / a for a, b in zip(rates["f32"], rates["bf16"])]
            lines.append(f"| {path} ({rec['cpu_path']}) | {model} | {mean_std(rates['f32'])} | {mean_std(rates['bf16'])} | "
                         f"{statistics.median(pairs):.2f}x ({', '.join(f'{p:.2f}' for p in pairs)}) |")
    return lines


def quality_records(out: Path) -> dict[tuple[int, str], dict]:
    return {(r["seed"], r["precision"]): r for r in
            (json.loads(f.read_text()) for f in sorted(out.glob("quality-seed-*.json")))}


def quality_table(records: dict[tuple[int, str], dict]) -> list[str]:
    seeds = sorted({s for s, _ in records})
    lines = ["| kimg | " + " | ".join(f"FD {p}, seed {s}" for s in seeds for p in PRECISIONS)
             + " | FD bf16 - f32 (mean over seeds) |", "|---" * (2 + 2 * len(seeds)) + "|"]
    kimgs = sorted({int(n) for r in records.values() for n in r["fd"]})
    for nimg in kimgs:
        cells = [records.get((s, p), {}).get("fd", {}).get(str(nimg)) for s in seeds for p in PRECISIONS]
        diffs = [records[(s, "bf16")]["fd"][str(nimg)] - records[(s, "f32")]["fd"][str(nimg)] for s in seeds
                 if all(str(nimg) in records.get((s, p), {}).get("fd", {}) for p in PRECISIONS)]
        mean_diff = f"{statistics.mean(diffs):+.2f}" if diffs else "-"
        lines.append(f"| {nimg / 1000:g} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
                     + f" | {mean_diff} |")
    lines += ["", "| seed | precision | final loss (mean of last 3 ticks) | training s | real-digit floor FD |",
              "|---|---|---|---|---|"]
    for (seed, precision), r in sorted(records.items()):
        tail = [loss for _, loss in r["loss"][-3:] if loss is not None]
        lines.append(f"| {seed} | {precision} | {statistics.mean(tail):.4f} | {r['train_sec']:.0f} | {r['real_fd']:.2f} |")
    return lines


def plot(records: dict[tuple[int, str], dict], dest: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    for (seed, precision), r in sorted(records.items()):
        style = dict(color=f"C{seed}", ls="-" if precision == "f32" else "--")
        pts = [(n / 1000, loss) for n, loss in r["loss"] if loss is not None and n > 0]
        ax.plot(*zip(*pts), label=f"seed {seed}, {precision}", **style)
        fd = sorted((int(n) / 1000, v) for n, v in r["fd"].items())
        if fd:
            ax2.plot(*zip(*fd), marker="o", label=f"seed {seed}, {precision}", **style)
    ax.set(yscale="log", xlabel="kimg", ylabel="training loss (per tick)")
    ax2.set(xlabel="kimg", ylabel="FD of the EMA model ↓")
    ax.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle("Demo U-Net on the 8x8 digits: float32 (solid) vs bf16 autocast (dashed)", fontsize=9)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def common_rows(out: Path, records: dict[tuple[int, str], dict]) -> list[dict]:
    """The figures as the benchmarks' common rows: bf16/float32 speed per CPU path and model (median of the
    pairs, with their min and max), and bf16's FD minus float32's per kimg (median over seeds)."""
    rows = []
    for path in PATHS:
        f = out / f"speed-{path}.json"
        if f.is_file():
            rec = json.loads(f.read_text())
            for model, rates in rec["rates"].items():
                pairs = [b / a for a, b in zip(rates["f32"], rates["bf16"])]
                rows.append(row(f"training speed bf16 / float32, {model}", statistics.median(pairs), "x",
                                low=min(pairs), high=max(pairs), reps=len(pairs), note=f"CPU path {rec['cpu_path']}"))
    for nimg in sorted({int(n) for r in records.values() for n in r["fd"]}):
        diffs = [records[(s, "bf16")]["fd"][str(nimg)] - records[(s, "f32")]["fd"][str(nimg)]
                 for s in sorted({s for s, _ in records})
                 if all(str(nimg) in records.get((s, p), {}).get("fd", {}) for p in PRECISIONS)]
        if diffs:
            rows.append(row(f"FD bf16 - float32 at {nimg / 1000:g} kimg", statistics.median(diffs), "FD",
                            low=min(diffs), high=max(diffs), reps=len(diffs), note="over training seeds"))
    return rows


def report(out: Path, command: str) -> str:
    records = quality_records(out)
    rows = common_rows(out, records)
    write_json(out / "precision.json", result("precision", rows, machine(), 0.0, command=command))
    text = "\n".join([f"CPU: {cpu_name()}; one thread per worker. Command: `{command}`", "",
                      "Training speed (whole loop, A/B interleaved):", "", *speed_table(out), "",
                      "Quality (the demo's U-Net, unconditional, on the 8x8 digits; FD of the EMA model, "
                      f"{next(iter(records.values()), {}).get('num', '-')} samples):", "", *quality_table(records), "",
                      "The figures as the benchmarks' common rows (also in precision.json):", "", rows_table(rows)])
    with atomic_write(out / "precision-digits.md", "w") as f:
        f.write(text + "\n")
    if records:
        plot(records, out / "precision-digits.png")
    return text


# ------------------------------------------------------------------------------------------ running
def run_worker(args: argparse.Namespace, env: dict[str, str], result: str, *extra: str) -> None:
    """One worker process with one thread; skipped if its `result` file exists (a rerun continues)."""
    if (args.out / result).is_file():
        return
    cmd = [sys.executable, __file__, "--out", str(args.out), "--threads", "1", *(["--smoke"] if args.smoke else []), *extra]
    log = args.out / result.replace(".json", ".log")
    with open(log, "w") as f:
        if subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"Error: worker {' '.join(extra)} failed; see {log}")
    print(f"done: {' '.join(extra)} ({log})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="results folder")
    p.add_argument("--part", choices=["all", "speed", "quality"], default="all",
                   help="both parts one after the other, or one (two commands may run the parts at once)")
    p.add_argument("--seeds", default="0,1", help="training seeds for the quality part [0,1]")
    p.add_argument("--kimg", type=float, default=192.0, help="training length of each quality run [192: 3000 steps]")
    p.add_argument("--ticks", type=int, default=24, help="loss-curve points per quality run [24]")
    p.add_argument("--snaps", type=int, default=4, help="EMA snapshots scored per quality run [4]")
    p.add_argument("--num", type=int, default=200, help="samples per FD [200]")
    p.add_argument("--steps", type=int, default=18, help="Heun steps when sampling [18]")
    p.add_argument("--reps", type=int, default=2, help="interleaved f32/bf16 pairs per speed measurement [2]")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script")
    p.add_argument("--report", action="store_true", help="only rewrite the table and plot")
    p.add_argument("--speed-worker", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--quality-worker", metavar="SEED,PRECISION", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = SMOKE if args.smoke else SIZES
    steps = {"demo": 3, "ddpmpp-64": 1}  # timed steps per run: enough on an idle machine, and all a busy one affords
    if args.smoke:
        args.kimg, args.ticks, args.snaps, args.num, args.steps = 2.0, 4, 2, 16, 3
    args.out.mkdir(parents=True, exist_ok=True)
    if args.speed_worker:
        return speed_worker(args.out, args.speed_worker, args.reps, steps, sizes)
    if args.quality_worker:
        seed, precision = args.quality_worker.split(",")
        return quality_worker(args.out, int(seed), precision, args.kimg, args.ticks, args.snaps, args.num,
                              args.steps, SMOKE if args.smoke else QUALITY_SIZES)
    if not args.report:
        if args.part in ("all", "quality"):
            for seed in parse_int_list(args.seeds, "--seeds"):
                for precision in PRECISIONS:
                    run_worker(args, {}, f"quality-seed-{seed}-{precision}.json", "--quality-worker", f"{seed},{precision}", "--kimg", f"{args.kimg:g}",
                               "--ticks", str(args.ticks), "--snaps", str(args.snaps), "--num", str(args.num),
                               "--steps", str(args.steps))
        if args.part in ("all", "speed"):
            for path, env in PATHS.items():
                run_worker(args, env, f"speed-{path}.json", "--speed-worker", path, "--reps", str(args.reps))
    print(report(args.out, "python benchmarks/precision.py " + " ".join(sys.argv[1:])))


if __name__ == "__main__":
    sys.exit(main())
