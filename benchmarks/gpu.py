"""One command for a GPU: U-Net FLOP/s as a share of the device's bf16 peak, sampling and training
throughput per inference path, and (given trained demo models) FD of bf16 vs float32 samples.

    python benchmarks/gpu.py                                     # cuda, DDPM++ 64x64 (EDM's config)
    python benchmarks/gpu.py --uncond U.safetensors --prior P.safetensors --image I.safetensors
    python benchmarks/gpu.py --device cpu --tiny --quick         # smoke run

FLOPs of one evaluation are counted by torch.utils.flop_counter (multiply-adds of convolutions, matrix
products and attention, x2); the peak is the vendor's dense bf16 tensor-core figure for known GPUs
(PEAKS) and, always, a measured one: the best of a few large bf16 matrix products. Paths: float32 eager
(the reference), vcdm.perf's default for the device, channels_last + bf16. Sampling: 18 Heun steps
(35 evaluations) on random weights; training: benchmarks/train.py's bare step (augmentation, loss,
backward, Adam, EMA) with and without bf16 autocast, with their losses. FD: benchmarks/soundness.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import soundness
import torch
import train
from common import add_common_args, first_call, machine, measure_one, report, row, timing_row
from denoiser import unzero_init
from solvers import Models
from torch.utils.flop_counter import FlopCounterMode

from vcdm import perf
from vcdm.data.structure import Structure
from vcdm.diffusion import sample
from vcdm.metrics.judge import make_judge
from vcdm.nets import build_network
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import preset

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched by name.
PEAKS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "L40S": 362, "L40": 181,
         "L4": 121, "A10G": 70, "A10": 125, "RTX 4090": 165, "RTX 3090": 71, "RTX A6000": 155, "A6000": 155}
HEUN_STEPS = 18


def vendor_peak(name: str) -> float | None:
    """TFLOP/s for the first PEAKS key in the device name (longest keys first: 'H100 PCIe' before 'H100', which is the SXM part)."""
    return next((PEAKS[k] for k in sorted(PEAKS, key=len, reverse=True) if k in name), None)


def measured_peak(device: torch.device, n: int) -> float:
    """TFLOP/s of the best of a few n x n bf16 matrix products (float32 accumulation)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    timing = measure_one(lambda: [a @ b for _ in range(4)], reps=5, warmup=1, device=device)
    return 2 * n ** 3 / (timing.min / 4) / 1e12


def unet(device: torch.device, tiny: bool) -> Denoiser:
    res = 16 if tiny else 64
    structure = Structure.from_flags({"image": (3, res, res)}, "1", "0")
    cls, kwargs = preset("ddpmpp", resolution=res, channels=3, embed_dim=0, label_dim=0, augment_dim=0,
                         cbase=16 if tiny else None, cres=[1, 2] if tiny else [1, 2, 2, 2])
    torch.manual_seed(0)
    return Denoiser(unzero_init(build_network(cls, kwargs)), structure).to(device).eval()


def flops_per_eval(den: Denoiser, batch: int, device: torch.device) -> float:
    x = torch.randn(batch, den.structure.latent_dim, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        den(x, torch.ones(batch, device=device))
    return float(counter.get_total_flops())


def path_rows(den: Denoiser, device: torch.device, batch: int, flops: float, peak: float, reps: int) -> list[dict]:
    """Per path: evaluations/s at `batch` → TFLOP/s and % of peak (median of `reps` evaluations); Heun
    sampling images/s (one run)."""
    paths = {"fp32": perf.FP32, "default": perf.default_settings(device, den),
             "channels_last+bf16": perf.InferenceSettings(channels_last=True, autocast_dtype=torch.bfloat16)}
    x = torch.randn(batch, den.structure.latent_dim, device=device)
    sigma = torch.ones(batch, device=device)
    rows, ref = [], {}
    for name, settings in paths.items():
        perf.prepare(den, settings)
        with torch.no_grad(), perf.autocast(settings, device):
            evals = measure_one(lambda: den(x, sigma), reps=reps, warmup=1, device=device)
            _, sampling = first_call(lambda: sample(den, torch.randn_like(x), None, sampler="edm", num_steps=HEUN_STEPS),
                                     device=device)
        tflops = flops / evals.median / 1e12
        ref.setdefault("eval", evals.median)
        ref.setdefault("sample", sampling.median)
        vs = None if name == "fp32" else "fp32"
        rows += [timing_row(f"U-Net evaluation, {name}", evals, count=flops / 1e12, unit="TFLOP/s",
                            reference=vs and f"U-Net evaluation, {vs}", ratio=vs and ref["eval"] / evals.median,
                            note=f"{settings.name}; {100 * tflops / peak:.1f}% of bf16 peak {peak:.0f} TFLOP/s; "
                            f"batch {batch}"),
                 timing_row(f"sampling, {name}", sampling, count=batch, unit="images/s", reference=vs and f"sampling, {vs}",
                            ratio=vs and ref["sample"] / sampling.median, note=f"{HEUN_STEPS} Heun steps, batch {batch}")]
    perf.prepare(den, perf.FP32)
    return rows


def training_rows(device: torch.device, batch: int, steps: int, tiny: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        data = train.make_dataset(Path(tmp) / "d.zip", n=max(2 * train.PCA_DIM, batch), res=64)
        opts = train.options("ddpmpp-64", data, Path(tmp) / "run", str(device), batch, steps)
        if tiny:
            opts = dataclasses.replace(opts, cbase=16, cres=[1, 2])
        results = train.bare_steps(opts, steps, ["fp32", "channels_last+bf16"])
    return train.path_rows("ddpmpp-64", str(device), batch, results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64; --quick 8)")
    p.add_argument("--tiny", action="store_true", help="a small 16x16 U-Net (smoke runs)")
    p.add_argument("--uncond", help="trained demo checkpoints for the bf16-vs-fp32 FD (benchmarks/soundness.py)")
    p.add_argument("--prior")
    p.add_argument("--image")
    a = p.parse_args()
    device = torch.device(a.device)
    batch, reps = a.batch or (8 if a.quick else 64), 2 if a.quick else 10
    info, start = machine(device), time.perf_counter()
    den = unet(device, a.tiny)
    flops = flops_per_eval(den, batch, device)
    measured = measured_peak(device, 1024 if a.quick or device.type == "cpu" else 8192)
    peak = vendor_peak(info["name"]) or measured
    print(f"{info['name']}: bf16 peak {peak:.0f} TFLOP/s ({'data sheet' if vendor_peak(info['name']) else 'measured'}; "
          f"measured matmul {measured:.1f}); {flops / batch / 1e9:.2f} GFLOP per image per evaluation", flush=True)
    rows = [row("bf16 matmul, measured", measured, "TFLOP/s", note=f"data-sheet peak {vendor_peak(info['name'])}")]
    rows += path_rows(den, device, batch, flops, peak, reps)
    rows += training_rows(device, min(batch, 16), 2 if a.quick else 5, a.tiny)
    if a.uncond or (a.prior and a.image):
        models = Models(a.prior, a.image, a.uncond, device)
        judge = make_judge(16, epochs=3 if a.quick else 15, device=a.device, progress=False)
        for kind in [k for k, n in (("uncond", a.uncond), ("two_stage", a.prior and a.image)) if n]:
            res = soundness.compare(judge, soundness.sample_sets(models, kind, list(range(20 if a.quick else 200)),
                                                                 "edm", {"num_steps": HEUN_STEPS}))
            rows += [row(f"{kind}: {k}", v, "") for k, v in res.items()]
    report(a, "gpu", rows, info, time.perf_counter() - start)


if __name__ == "__main__":
    main()
