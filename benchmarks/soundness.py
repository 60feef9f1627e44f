"""Does bf16 change what a trained model samples? FD of bf16 vs float32 samples of the same seeds.

    python benchmarks/soundness.py --uncond U.safetensors [--prior P --image I] --num 100 [--json out.json]

Models: trained demo checkpoints (digits; `vcdm demo` or benchmarks/solvers.py's recipe). For each model
kind (unconditional, two-stage prior + image model) the same seeds are sampled twice: with float32
(no autocast) and with bf16 autocast forced on (on the 16x16 demo U-Net bf16 is off by default on CPUs,
vcdm.perf), then with float32 again from other seeds. The demo's judge (a digit classifier) gives
features; reported: each set's FD to the held-out digits, the FD between the bf16 and float32 sets of
the same seeds, the FD between two float32 sets of different seeds (sampling noise, the scale to read the
former against), and how far the pixels moved (mean |difference| in 8-bit levels, share changed).
Reuses benchmarks/solvers.py's sampling (as `vcdm generate` evaluates on this device).
"""
from __future__ import annotations

import argparse
import time

import torch
from common import add_common_args, machine, report, row
from solvers import Models

from vcdm import perf
from vcdm.metrics.classifier import feature_stats
from vcdm.metrics.fid import frechet_distance
from vcdm.metrics.judge import make_judge

PATHS = {"fp32": perf.FP32, "bf16": perf.InferenceSettings(autocast_dtype=torch.bfloat16)}


def sample_sets(models, kind: str, seeds: list[int], sampler: str, opts: dict) -> dict[str, torch.Tensor]:
    """uint8 images per path for `seeds`, plus float32 from other seeds ('fp32 other seeds')."""
    out = {}
    for name, settings in PATHS.items():
        models.settings = {k: settings for k in models.nets}
        out[name] = models.images(kind, seeds, sampler, opts)
    models.settings = {k: perf.FP32 for k in models.nets}
    out["fp32 other seeds"] = models.images(kind, [s + 10_000 for s in seeds], sampler, opts)
    return out


def fd_between(classifier, a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = feature_stats(classifier, a), feature_stats(classifier, b)
    return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)


def compare(judge, sets: dict[str, torch.Tensor]) -> dict[str, float]:
    diff = (sets["bf16"].int() - sets["fp32"].int()).abs().float()
    return {"fd fp32": judge.evaluate(sets["fp32"])["fd"], "fd bf16": judge.evaluate(sets["bf16"])["fd"],
            "fd bf16 vs fp32 (same seeds)": fd_between(judge.classifier, sets["bf16"], sets["fp32"]),
            "fd fp32 vs fp32 (other seeds)": fd_between(judge.classifier, sets["fp32 other seeds"], sets["fp32"]),
            "mean |pixel difference|": diff.mean().item(), "pixels changed": (diff > 0).float().mean().item(),
            "largest pixel difference": diff.max().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--uncond", help="unconditional image model checkpoint")
    p.add_argument("--prior", help="prior checkpoint (with --image: two-stage)")
    p.add_argument("--image", help="image model given embeddings")
    p.add_argument("--num", type=int, default=None, help="images per set (default 100; --quick 20)")
    p.add_argument("--steps", type=int, default=18, help="Heun steps (default 18, vcdm generate's)")
    p.add_argument("--judge-epochs", type=int, default=None, help="judge training epochs (default 15; --quick 3)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    num, epochs = a.num or (20 if a.quick else 100), a.judge_epochs or (3 if a.quick else 15)
    info, start = machine(a.device), time.perf_counter()
    models = Models(a.prior, a.image, a.uncond, torch.device(a.device))
    kinds = [k for k, need in (("uncond", ("uncond",)), ("two_stage", ("prior", "image")))
             if all(n in models.nets for n in need)]
    if not kinds:
        raise SystemExit("Error: give --uncond and/or --prior with --image")
    judge = make_judge(16, epochs=epochs, device=a.device, progress=False)
    rows = []
    for kind in kinds:
        res = compare(judge, sample_sets(models, kind, list(range(num)), "edm", {"num_steps": a.steps}))
        print(f"{kind} ({num} images, {a.steps} Heun steps): " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()),
              flush=True)
        noise = res["fd fp32 vs fp32 (other seeds)"]
        rows += [row(f"{kind}: {k}", v, "levels" if "pixel difference" in k else "" if "changed" in k else "FD",
                     reference=f"{kind}: fd fp32 vs fp32 (other seeds)" if k.startswith("fd bf16 vs") else None,
                     ratio=v / noise if k.startswith("fd bf16 vs") and noise else None, note=f"{num} images")
                 for k, v in res.items()]
    report(a, "soundness", rows, info, time.perf_counter() - start)


if __name__ == "__main__":
    main()
