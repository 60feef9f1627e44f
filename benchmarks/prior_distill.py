"""Experiment, not a vcdm command: the prior's deterministic sampler distilled into one evaluation by
regression, then two-stage FD on the demo digits with the tuned image model (benchmarks/fewstep.py's run).

Consistency tuning leaves the demo prior (an x0-predicting transformer) 20-40 FD behind its own UniPC 12
at 1-4 steps (benchmarks/results/fewstep-digits.md). This measures the alternative named there: the prior
is cheap (~1/80 of a U-Net evaluation), so its 12-step ODE map can be solved for many noise draws and
learnt directly (Luhman & Luhman 2021's knowledge distillation). Pairs (z, x) with x = UniPC-12(80 z) from
the base prior; a copy of the prior is trained to map 80 z to x at sigma 80 (Adam, MSE, batch 256); the
student's snapshot records the consistency sampler (1 step) and is sampled by `vcdm sample` as a tuned
prior is. Scored as fewstep.py scores: the demo judge's FD over --num images, the seeds fewstep.py uses.

    python benchmarks/fewstep.py --out fewstep-run ...            # base and tuned models first
    python benchmarks/prior_distill.py --run fewstep-run --seed 0   # writes seed-0/distilled-prior/
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from common import write_json
from vcdm.checkpoints import load_checkpoint, save_checkpoint
from vcdm.diffusion.sampling import sample
from vcdm.diffusion.schedules import default_range

SIGMA_MAX = default_range("edm")[1]  # the one-step consistency sampler's level


def pairs(denoiser, count: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit noise z (count, N) and the teacher's UniPC-`steps` samples from it."""
    z = torch.randn(count, denoiser.structure.latent_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = torch.cat([sample(denoiser, z[i:i + 1024].double(), sampler="unipc", num_steps=steps).float()
                       for i in range(0, count, 1024)])
    return z, x


def distil(denoiser, z: torch.Tensor, x: torch.Tensor, steps: int, lr: float, batch: int, seed: int) -> tuple:
    """A copy of `denoiser` trained to map SIGMA_MAX z to x at SIGMA_MAX; returns (student, losses)."""
    student = copy.deepcopy(denoiser).train().requires_grad_(True)
    optimizer = torch.optim.Adam(student.net.parameters(), lr=lr)
    g, losses = torch.Generator().manual_seed(seed), []
    for step in range(steps):
        idx = torch.randint(0, len(z), (batch,), generator=g)
        loss = ((student(z[idx] * SIGMA_MAX, torch.full((batch,), SIGMA_MAX)) - x[idx]) ** 2).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return student.eval().requires_grad_(False), losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="benchmarks/fewstep.py's run folder")
    p.add_argument("--seed", type=int, default=0, help="training seed (the run's seed-<s> folder) [0]")
    p.add_argument("--pairs", type=int, default=65536, help="teacher samples [65536]")
    p.add_argument("--teacher-steps", type=int, default=12, help="the teacher's UniPC steps [12]")
    p.add_argument("--steps", type=int, default=4000, help="Adam steps [4000]")
    p.add_argument("--lr", type=float, default=2.5e-4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--num", type=int, default=200, help="images scored (fewstep.py's --num) [200]")
    a = p.parse_args()
    torch.set_num_threads(1)
    import fewstep
    from vcdm.metrics.judge import make_judge

    folder = a.run / f"seed-{a.seed}"
    base = fewstep.snapshot(folder / "prior", "budget*-network-snapshot-*.safetensors")
    image = fewstep.snapshot(folder / "tuned-image", "*/network-snapshot-*.safetensors")
    denoiser, config, tensors = load_checkpoint(base)
    start = time.perf_counter()
    z, x = pairs(denoiser, a.pairs, a.teacher_steps, a.seed)
    teacher_sec = time.perf_counter() - start
    student, losses = distil(denoiser, z, x, a.steps, a.lr, a.batch, a.seed)
    student_sec = time.perf_counter() - start - teacher_sec
    out = folder / "distilled-prior" / "network-snapshot.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, {"net": student.net.state_dict(), **tensors},
                    dataclasses.replace(config, sampler={"name": "consistency", "num_steps": 1}))
    judge = make_judge(fewstep.SIZES.resolution, epochs=fewstep.SIZES.classifier_epochs, device="cpu", progress=False)
    seeds = list(range(a.seed * a.num, (a.seed + 1) * a.num))  # fewstep.py's
    rows = {"teacher_sec": teacher_sec, "student_sec": student_sec, "final_loss": statistics.fmean(losses[-100:])}
    for image_steps in (1, 2, 3):
        images = fewstep.two_stage_images(out, image, ["--image-steps", str(image_steps)], seeds, "cpu")
        rows[f"fd_1+{image_steps}"] = judge.evaluate(images)["fd"]
        print(f"seed {a.seed}: distilled prior 1 + tuned image {image_steps}: FD {rows[f'fd_1+{image_steps}']:.2f}",
              flush=True)
    write_json(folder / "distilled-prior" / "result.json", rows)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
