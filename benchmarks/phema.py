"""Post-hoc EMA's memory: peak RSS of `vcdm phema` against loading one snapshot, for runs of different lengths.

The script writes power-function EMA snapshots of one DDPM++ (random weights, float16 parameters as
training writes them; two lengths per time) into a temp folder, then runs each case in a fresh process
and reads its peak RSS: the imports alone, loading one snapshot (`load_checkpoint`), and `vcdm phema` on
runs of N and 4N snapshot times, for one length and for four. A streaming reconstruction's peak should
not grow with the run's length and should stay near the imports plus one network per length.

    python benchmarks/phema.py                   # DDPM++ 32x32, cbase 128 (55.7M parameters), 5 and 20 times
    python benchmarks/phema.py --quick           # cbase 64, 3 and 12 times
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import add_common_args, machine, report, row
from vcdm.checkpoints import CheckpointConfig, save_checkpoint
from vcdm.data.structure import Structure
from vcdm.nets import build_network
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import preset

# VmHWM: the peak RSS of this process's own memory (ru_maxrss would keep the forking parent's across exec)
PEAK = "print('PEAK', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
IMPORTS = "import torch, vcdm.checkpoints, vcdm.nets, vcdm.train.phema, vcdm.cli.phema"


def write_run(folder: Path, cbase: int, times: int) -> int:
    """`times` x 2 profile snapshots of one network; returns the network's float32 bytes."""
    structure = Structure.from_flags({"image": (3, 32, 32)}, "1", "0")
    cls, kwargs = preset("ddpmpp", resolution=32, channels=3, embed_dim=0, label_dim=0, augment_dim=0, cbase=cbase,
                         cres=[2, 2, 2], dropout=0.0)
    net = build_network(cls, kwargs)
    config = CheckpointConfig(cls, kwargs, Denoiser(net, structure).config(), structure.to_dict())
    params = {name for name, _ in net.named_parameters()}
    state = net.state_dict()
    for k in range(1, times + 1):
        for std in (0.05, 0.1):
            weights = {n: (t + 0.01 * k * std).half() if n in params else t for n, t in state.items()}
            training = {"nimg": k * 100_000, "batch": 512, "ema_profile": {"std": std}}
            save_checkpoint(folder / f"network-snapshot-{k * 100:06d}-{std:.3f}.safetensors", {"net": weights},
                            replace(config, training=training))
    return sum(t.numel() * 4 for t in state.values())


def peak_mib(code: str) -> float:
    """Peak RSS of a fresh Python process running `code`, in MiB."""
    out = subprocess.run([sys.executable, "-c", f"{code}\n{PEAK}"], capture_output=True, text=True, check=True).stdout
    return int(out.split("PEAK")[-1]) / 1024


def phema_code(run: Path, stds: str, outdir: Path) -> str:
    args = ["--run", str(run), "--std", stds, "--outdir", str(outdir), "--overwrite"]
    return f"from vcdm.cli.phema import command\ncommand.main({json.dumps(args)}, standalone_mode=False)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cbase", type=int, default=None, help="DDPM++ base channels  [default: 128, --quick 64]")
    parser.add_argument("--times", type=int, default=None, help="snapshot times of the shorter run (the longer: 4x)")
    add_common_args(parser)
    args = parser.parse_args()
    cbase = args.cbase or (64 if args.quick else 128)
    times = args.times or (3 if args.quick else 5)
    info, start = machine(), time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {n: tmp / f"run{n}" for n in (times, 4 * times)}
        for n, folder in runs.items():
            net_bytes = write_run(folder, cbase, n)
        net_mib = net_bytes / 2**20
        base = peak_mib(IMPORTS)
        one = sorted(runs[times].iterdir())[-1]
        load = peak_mib(f"from vcdm.checkpoints import load_checkpoint\nload_checkpoint({str(one)!r})")
        rows.append(row("peak RSS: imports", base, "MiB"))
        rows.append(row("peak RSS: load one snapshot", load, "MiB", reference="peak RSS: imports", ratio=load / base))
        for n, folder in runs.items():
            for stds in ("0.07", "0.03,0.07,0.12,0.2"):
                peak = peak_mib(phema_code(folder, stds, tmp / "out"))
                count = len(stds.split(","))
                rows.append(row(f"peak RSS: phema, {2 * n} snapshots, {count} length(s)", peak, "MiB",
                                reference="peak RSS: load one snapshot", ratio=peak / load,
                                note=f"imports + {(peak - base) / net_mib:.2f} networks"))
    print(f"DDPM++ 32x32 cbase {cbase}: one network {net_mib:.0f} MiB in float32")
    report(args, "phema", rows, info, time.perf_counter() - start, cbase=cbase, network_mib=net_mib)


if __name__ == "__main__":
    sys.exit(main())
