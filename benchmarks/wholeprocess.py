"""Whole-process sampling, idle and with one core kept busy: ``vcdm generate`` with its defaults against a
float32 eager reference, each a separate process timed from start to exit (``benchmarks/sample.py --load``).

The reference is NVlabs/edm's own ``generate.py`` (its ``edm_sampler``, run by benchmarks/edm.py from a clone
given as ``--edm-root``) on an EDM pickle built by EDM's code, which vcdm reads through ``vcdm import-edm``.
Without a clone, a stand-in runs: the plain sampler below, which loads the vcdm checkpoint and runs Heun's
second-order sampler as EDM does (its schedule, no churn, float32, contiguous memory, no autocast) and
writes one PNG per seed. Either reference runs with ``OMP_WAIT_POLICY`` unset, as EDM's process would.
vcdm runs as its command line does (which sets ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set).
Both use torch's default thread count and the same number of steps. "Loaded" runs while a synthetic
competing process (a Python busy loop) keeps one core busy. Repetitions are interleaved (reference,
vcdm, vcdm, reference, ...) so that a drifting machine hits both alike, and the spread (min / median /
max) is reported, with the largest pixel difference between the two outputs.

    python benchmarks/wholeprocess.py --baseline --network M --outdir D --seeds 8 --steps 8   # the stand-in
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from common import Timing, measure, timing_row

BUSY_LOOP = "while True: pass"
REFERENCE_EDM, REFERENCE_STANDIN, VCDM = "EDM generate.py", "fp32 eager baseline", "vcdm defaults"


@contextlib.contextmanager
def competing_process(enabled: bool) -> Iterator[None]:
    """While active, a separate process keeps one core busy (nothing when ``enabled`` is false)."""
    if not enabled:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(0.5)  # let it reach the scheduler's run queue
        yield
    finally:
        proc.kill()
        proc.wait()


def vcdm_command() -> str:
    """The ``vcdm`` entry point of this Python's environment."""
    return shutil.which("vcdm", path=str(Path(sys.executable).parent)) or "vcdm"


def commands(network: Path, outdir: Path, images: int, steps: int, baseline_policy: str | None = None,
             edm: tuple[Path, Path] | None = None) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name: (command line, environment) of each whole-process case, the reference first.
    ``baseline_policy``: the reference's OMP_WAIT_POLICY (None: unset, as EDM's process); ``edm``: (EDM's
    clone, its pickle of the network) to run EDM's generate.py as the reference."""
    vcdm = vcdm_command()
    common = ["--steps", str(steps), "--batch", str(images)]
    base_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    policy = {} if baseline_policy is None else {"OMP_WAIT_POLICY": baseline_policy}
    here = Path(__file__).resolve().parent
    if edm is None:
        reference = (REFERENCE_STANDIN, [sys.executable, str(here / "wholeprocess.py"), "--baseline",
                                         "--network", str(network), *common])
    else:
        reference = (REFERENCE_EDM, [sys.executable, str(here / "edm.py"), "generate", "--edm-root", str(edm[0]),
                                     "--network", str(edm[1]), *common])
    return {
        reference[0]: ([*reference[1], "--seeds", str(images), "--outdir", str(outdir / "reference")],
                       {**base_env, **policy}),
        VCDM: ([vcdm, "generate", "--network", str(network), *common, "--seeds", f"0-{images - 1}", "--overwrite",
                "--outdir", str(outdir / "vcdm")], dict(base_env)),
    }


def run_once(cmd: list[str], env: dict[str, str]) -> None:
    """One run from start to exit, into an emptied --outdir (vcdm generate skips seeds already there)."""
    shutil.rmtree(cmd[cmd.index("--outdir") + 1], ignore_errors=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} ... exited {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-400:]}")


def measure_processes(cases: dict[str, tuple[list[str], dict[str, str]]], reps: int) -> dict[str, dict[str, Timing]]:
    """{'idle'|'loaded': {case: Timing}}: one untimed warm-up run of each case, then ``reps`` alternating
    repetitions per condition (common.measure)."""
    runs = {name: lambda cmd=cmd, env=env: run_once(cmd, env) for name, (cmd, env) in cases.items()}
    for fn in runs.values():
        fn()
    times = {}
    for condition in ("idle", "loaded"):
        with competing_process(condition == "loaded"):
            times[condition] = measure(runs, reps, warmup=0, alternate=True)
        print(f"  {condition}: " + ", ".join(f"{name} {t.median:.1f} s" for name, t in times[condition].items())
              + f" (medians; load average {os.getloadavg()[0]:.1f})", flush=True)
    return times


def pixel_difference(cases: dict[str, tuple[list[str], dict[str, str]]]) -> tuple[float, int]:
    """(mean, max) |difference| in 8-bit levels between the reference's PNGs and vcdm's, seed by seed."""
    import numpy as np
    import PIL.Image

    ref, ours = (Path(cmd[cmd.index("--outdir") + 1]) for cmd, _ in cases.values())
    diffs = [np.abs(np.asarray(PIL.Image.open(f), dtype=np.int16) - np.asarray(PIL.Image.open(ours / f.name), dtype=np.int16))
             for f in sorted(ref.glob("*.png"))]
    if not diffs:
        raise RuntimeError(f"no PNGs in {ref}")
    return float(np.mean(diffs)), int(np.max(diffs))


def summary(times: dict[str, dict[str, Timing]], images: int, steps: int, pixels: tuple[float, int]) -> list[dict]:
    """Rows for run_all: images/s from the median seconds (min/max from the slowest/fastest run);
    ratio = reference median / vcdm median."""
    rows = []
    for condition, cases in times.items():
        reference = next(iter(cases))
        base, ours = cases[reference], cases[VCDM]
        paired = sorted(b / o for b, o in zip(base.seconds, ours.seconds))
        ref = f"whole-process sampling, {reference} ({condition})"
        for name, t in cases.items():
            is_ours = name == VCDM
            note = f"{images} images, {steps} Heun steps; min/median/max {t.min:.1f}/{t.median:.1f}/{t.max:.1f} s" + (
                f"; paired speedups {paired[0]:.2f}-{paired[-1]:.2f}x; pixels vs the reference: mean |diff| "
                f"{pixels[0]:.3f}, max {pixels[1]} levels" if is_ours else "")
            rows.append(timing_row(f"whole-process sampling, {name} ({condition})", t, count=images, unit="images/s",
                                   reference=ref if is_ours else None,
                                   ratio=base.median / t.median if is_ours else None, note=note))
    return rows


def baseline_main(argv: list[str]) -> None:
    """The plain float32 eager sampler: EDM's Heun (no churn) on one batch, then one PNG per seed."""
    import numpy as np
    import PIL.Image
    import torch

    from vcdm.generate import load_model

    p = argparse.ArgumentParser()
    for flag in ("--network", "--outdir"):
        p.add_argument(flag, required=True)
    for flag in ("--seeds", "--steps", "--batch"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument("--baseline", action="store_true")
    a = p.parse_args(argv)
    model = load_model(a.network, torch.device("cpu"))
    denoiser = model.denoiser.eval().to(memory_format=torch.contiguous_format)
    shape = (3, denoiser.net.img_resolution, denoiser.net.img_resolution)
    latents = torch.stack([torch.randn(int(np.prod(shape)), generator=torch.Generator().manual_seed(s))
                           for s in range(a.seeds)]).double()
    sigma_min, sigma_max, rho = 0.002, 80.0, 7.0
    i = torch.arange(a.steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / max(a.steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])

    def d(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return (x - denoiser(x.float(), sigma.float()).double()) / sigma

    x = latents * t[0]
    with torch.no_grad():
        for k in range(a.steps):
            dx = d(x, t[k])
            x_next = x + (t[k + 1] - t[k]) * dx
            if k < a.steps - 1:
                x_next = x + (t[k + 1] - t[k]) * 0.5 * (dx + d(x_next, t[k + 1]))
            x = x_next
    out = Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    images = (x.reshape(-1, *shape) * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for seed, img in enumerate(images):
        PIL.Image.fromarray(img).save(out / f"{seed:06d}.png")


if __name__ == "__main__":
    baseline_main(sys.argv[1:])
