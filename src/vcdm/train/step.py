"""One optimiser step.

The global batch is split over the processes and, within each, into accumulation rounds of
`batch_gpu` (DDP synchronises only the last round). The loss is the sum of the per-element
weighted loss divided by the per-process batch, times `ls`; the learning rate comes from the run's
schedule (vcdm.train.lr_schedules). Non-finite gradients are replaced before Adam: NaN by 0, +-inf
by +-`grad_inf` (the recipe's: EDM's 1e5, EDM2's 0). The random draws of a round (augmentation, noise levels,
noise) come from a generator seeded by the global position of its first sample, so a run is
reproducible and independent of the number of processes.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from vcdm import distributed as dist
from vcdm.diffusion.loss import equally_weighted
from vcdm.train.sampler import mix_seed
from vcdm.train.state import TrainState


def reduce_loss(loss: torch.Tensor, sizes: list[int], per_rank: int, ls: float,
                equally_weight: bool = False) -> torch.Tensor:
    """The scalar to differentiate from per-element losses (batch, latent_dim) of one round.

    Sum over elements / per-process batch * ls (EDM), or, with `equally_weight`, the sum of each generated
    tensor's mean over this round's samples and elements (the original release's --equally_weight_tensors:
    under gradient accumulation each round adds a full mean; vcdm.diffusion.loss.equally_weighted).
    """
    if equally_weight:
        return equally_weighted(loss, sizes) * ls
    return loss.sum() * (ls / per_rank)


@dataclass
class StepSetup:
    """What every step uses: the training view of the denoiser (its net maybe DDP-wrapped), the loss,
    the batch maker, the geometry and the optimisation settings."""
    denoiser: Any
    ddp: torch.nn.Module
    loss_fn: Callable
    maker: Any
    sizes: list[int]
    rounds: int
    per_rank: int
    batch: int
    seed: int
    lr_schedule: Callable[[int], float]  # vcdm.train.lr_schedules.LRSchedule: the lr of the step starting at nimg
    grad_inf: float  # what +-inf gradients become (NaN become 0): the recipe's (vcdm.train.recipe.grad_inf)
    ls: float = 1.0
    equally_weight: bool = False
    train_embedder: bool = False
    autocast: Callable[[], Any] = contextlib.nullcontext


@dataclass
class StepResult:
    totals: list[float]  # loss sums over all processes: all latents, then each generated tensor
    finite: bool
    stop: bool  # some process asked to stop
    lr: float


def accumulate(state: TrainState, step: StepSetup, batches: Iterator) -> torch.Tensor:
    """Forward and backward over this process's accumulation rounds; returns the loss sums (float64)."""
    device = step.maker.device
    sums = torch.zeros(len(step.sizes) + 1, dtype=torch.float64, device=device)
    for r in range(step.rounds):
        positions, indices, images, labels = next(batches)
        gen = torch.Generator(device).manual_seed(mix_seed(step.seed, int(positions[0])))
        sync = r == step.rounds - 1 or step.ddp is state.net
        with contextlib.nullcontext() if sync else step.ddp.no_sync():
            with torch.set_grad_enabled(step.train_embedder):  # float32, so cached embeddings match
                batch = step.maker(indices, images, labels, gen)
            with step.autocast():
                loss = step.loss_fn(step.denoiser, batch.x, batch.y, batch.augment_labels, generator=gen)
            loss = loss.float()
            scalar = reduce_loss(loss, step.sizes, step.per_rank, step.ls, step.equally_weight)
            (state.scaler.scale(scalar) if state.scaler is not None else scalar).backward()
        with torch.no_grad():
            sums[0] += loss.sum(dtype=torch.float64)
            for i, p in enumerate(loss.split(step.sizes, dim=1)):
                sums[i + 1] += p.sum(dtype=torch.float64)
    return sums


def update(state: TrainState, step: StepSetup, lr: float) -> None:
    """Apply the accumulated gradients: averaged embedder gradients, non-finite ones replaced, Adam."""
    for g in state.optimizer.param_groups:
        g["lr"] = lr
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    if state.embedder is not None and step.train_embedder and dist.world_size() > 1:
        for p in state.embedder.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(dist.world_size())
    for group in state.optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=step.grad_inf, neginf=-step.grad_inf, out=p.grad)
    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()


def train_step(state: TrainState, step: StepSetup, batches: Iterator,
               want_stop: Callable[[], bool] = lambda: False) -> StepResult:
    """One optimiser step of the global batch; updates the weights, the EMA and the counters.

    One collective carries the loss sums and whether any process wants to stop (asked after the
    forward and backward passes, so a signal during them stops this step)."""
    state.optimizer.zero_grad(set_to_none=True)
    if hasattr(step.loss_fn, "set_nimg"):  # a loss with a schedule over the run (consistency tuning)
        step.loss_fn.set_nimg(state.counters["nimg"])
    sums = accumulate(state, step, batches)
    totals = dist.all_sum(sums.tolist() + [float(want_stop())], sums.device)
    finite = all(math.isfinite(v) for v in totals[:-1])
    nimg = state.counters["nimg"]
    lr = step.lr_schedule(nimg)
    update(state, step, lr)
    state.ema.update(nimg, step.batch)
    state.counters["nimg"] += step.batch
    state.counters["position"] += step.batch
    state.counters["nonfinite"] = 0 if finite else state.counters["nonfinite"] + 1
    return StepResult(totals[:-1], finite, totals[-1] > 0, lr)
