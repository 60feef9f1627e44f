"""Cost of tuning (`vcdm tune`: ECT, ECD and KD) per image, relative to training, in the same run.

For each model (benchmarks/train.py's: DDPM++ 64x64 given a pixel-pca embedding, and the dalle2 prior),
a short `vcdm train` run makes the checkpoint; `vcdm tune` then runs the same loop with each method's loss
(ECT: one more forward pass without gradients per step; ECD: three, two of them the frozen teacher's; KD:
the teacher's Heun sampler, 2 x 18 - 1 = 35 passes without gradients, and no second pass of the network) for
the same number of steps. All numbers are the runs' own stats.jsonl (median sec/kimg of the ticks after
the first, one step per tick). Their ratio is what a tuning image costs in training images; a tuning of
1/2 of the training (`vcdm tune`'s default length) then costs ratio / 2 of the training.

    python benchmarks/tune.py                      # CPU, batch 4, 3 timed steps
    python benchmarks/tune.py --quick --json out.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import add_common_args, machine, result, row, write_json
from train import PCA_DIM, make_dataset, options
from vcdm.train import TrainOptions, train


def quietly(fn, *args):
    sys.stdout, saved = open("/dev/null", "w"), sys.stdout  # the runs' own logs are not the point here
    try:
        return fn(*args)
    finally:
        sys.stdout.close()
        sys.stdout = saved


def rate(run_dir: Path) -> float:
    """images/s of a run: the median sec/kimg of its ticks after the first (one step each)."""
    ticks = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()][1:]
    return 1000 / statistics.median(t["sec_per_kimg"] for t in ticks)


def tuning(opts: TrainOptions, snapshot: Path, out: Path, method: str) -> TrainOptions:
    """`vcdm tune`'s options from `snapshot`, with the training run's geometry and length."""
    return dataclasses.replace(opts, init=str(snapshot), tune=method, outdir=str(out), lr=1e-4, lr_schedule="edm",
                               P_mean=-1.1, P_std=2.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run, after one warm-up (default 3; "
                    "--quick: 2)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--models", default="ddpmpp-64,prior", help="comma-separated: ddpmpp-64, prior")
    ap.add_argument("--methods", default="ect,ecd,kd", help="comma-separated: ect, ecd, kd")
    a = ap.parse_args()
    a.steps = a.steps or (2 if a.quick else 3)
    info, start, rows = machine("cpu"), time.perf_counter(), []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {info['name']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "bench-64.zip", n=max(2 * PCA_DIM, a.batch), res=64)
        print(f"{'model':<12s} {'method':<6s} {'batch':>5s} {'train img/s':>12s} {'tune img/s':>11s} {'tune/train cost':>16s}")
        for kind in a.models.split(","):
            opts = options(kind, data, Path(tmp) / f"train-{kind}", "cpu", a.batch, a.steps)
            run_dir = quietly(train, opts)
            snapshot = sorted(run_dir.glob("network-snapshot-*.safetensors"))[-1]
            trained = rate(run_dir)
            rows.append(row(f"training loop, {kind} (cpu)", trained, "images/s"))
            for method in a.methods.split(","):
                tuned = rate(quietly(train, tuning(opts, snapshot, Path(tmp) / f"tune-{kind}-{method}", method)))
                cost = trained / tuned
                print(f"{kind:<12s} {method:<6s} {a.batch:>5d} {trained:>12.2f} {tuned:>11.2f} {cost:>16.2f}", flush=True)
                rows.append(row(f"{method.upper()} tuning loop, {kind} (cpu)", tuned, "images/s",
                                reference=f"training loop, {kind} (cpu)", ratio=tuned / trained,
                                note=f"batch {a.batch}, {a.steps} timed steps; a tuning image costs {cost:.2f} training images"))
    if a.json:
        write_json(a.json, result("tune", rows, info, time.perf_counter() - start))


if __name__ == "__main__":
    main()
