"""Training recipes: EDM's (the original release's) and EDM2's, for any network, the prior included.

A recipe is the default of every option left unset (None) among: the preconditioning and loss, the
noise-level distribution (P_mean, P_std), Adam's betas, the learning rate and its schedule, the EMA
(EDM's half-life or EDM2's power-function profiles); and it decides how non-finite gradients are
replaced. `resolve` fills those options in once, before a run starts, so the run records (and a
resumed run keeps) the values it used.

EDM2's (Karras et al. 2024, training_loop.py and train_edm2.py): the loss with the learned uncertainty,
Adam with betas (0.9, 0.99), inverse square-root decay of the learning rate after a reference of
`decay` batches, power-function EMA profiles of relative lengths 0.05 and 0.10 (for post-hoc EMA),
non-finite gradients set to 0 (EDM sets +-inf to +-1e5). With one of EDM2's network presets, the
preset's learning rate, reference and noise distribution; with any other network, the learning rate
and noise distribution stay EDM's (they belong to the network and the data, not to the recipe) and
the reference is the pixel presets' 35000 batches.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vcdm.nets.presets import EDM2_PRESETS
from vcdm.perf import training_precision

if TYPE_CHECKING:  # options.py takes the recipe names from here
    import torch

    from vcdm.train.options import TrainOptions

EDM2_PIXEL_DECAY = 35000  # batches: the reference of EDM2's img64 presets
EDM_AUGMENT = 0.12  # EDM's and the original release's augmentation probability


@dataclass(frozen=True)
class Recipe:
    precond: str
    lr_schedule: str
    adam_betas: tuple[float, float]
    grad_inf: float  # what +-inf gradients become (NaN become 0)
    lr: float = 1e-3
    P_mean: float = -1.2
    P_std: float = 1.2
    ema_std: tuple[float, ...] | None = None  # power-function EMA profiles; None: EDM's half-life EMA (--ema)


RECIPES = {
    "edm": Recipe(precond="edm", lr_schedule="edm", adam_betas=(0.9, 0.999), grad_inf=1e5),
    "edm2": Recipe(precond="edm2", lr_schedule="edm2", adam_betas=(0.9, 0.99), grad_inf=0.0, ema_std=(0.050, 0.100)),
}


def network_recipe(arch: str | None) -> dict[str, float]:
    """What an EDM2 network preset sets in EDM2's recipe (lr, decay in batches, P_mean, P_std); {} otherwise."""
    preset = EDM2_PRESETS.get(arch or "")
    if preset is None:
        return {}
    return {"lr": preset.lr, "decay": preset.decay, "P_mean": preset.P_mean, "P_std": preset.P_std}


def resolve(opts: TrainOptions) -> TrainOptions:
    """`opts` with the options left None set from its recipe (and the network preset, for EDM2's)."""
    recipe = RECIPES[opts.recipe]
    preset = network_recipe(opts.arch) if opts.recipe == "edm2" else {}
    schedule = opts.lr_schedule or recipe.lr_schedule
    decay = preset.get("decay", EDM2_PIXEL_DECAY) if schedule == "edm2" else 0
    lr = _first(opts.lr, preset.get("lr"), recipe.lr)
    return dataclasses.replace(
        opts,
        precond=opts.precond or recipe.precond,
        P_mean=_first(opts.P_mean, preset.get("P_mean"), recipe.P_mean),
        P_std=_first(opts.P_std, preset.get("P_std"), recipe.P_std),
        lr=lr,
        fake_lr=_first(opts.fake_lr, lr) if opts.tune == "dmd" else opts.fake_lr,  # dmd: the fake denoiser's, --lr's
        gan_lr=_first(opts.gan_lr, lr) if opts.tune == "dmd" else opts.gan_lr,  # dmd: the discriminator's, --lr's
        adam_betas=list(opts.adam_betas or recipe.adam_betas),
        lr_schedule=schedule,
        lr_ref=_first(opts.lr_ref, decay * opts.batch / 1000),
        ema_std=opts.ema_std or (list(recipe.ema_std) if recipe.ema_std else None),
        augment=_first(opts.augment, 0.0 if opts.arch in EDM2_PRESETS else EDM_AUGMENT),
    )


def resolve_precision(opts: TrainOptions, device: torch.device, resolution: int | None,
                      resumed: bool | None) -> tuple[bool, str]:
    """(bf16, why): --bf16 as given; else the choice of the run being resumed (``resumed``), so that a run
    moved to another machine keeps its precision; else the measured default for the device and the
    generated images' ``resolution`` (vcdm.perf.training_precision)."""
    if opts.bf16 is not None:
        return opts.bf16, f"--bf16 {int(opts.bf16)}"
    if opts.fp16:
        return False, "--fp16"
    if resumed is not None:
        return resumed, "the resumed run's precision"
    return training_precision(device, resolution)


def precision_line(bf16: bool, why: str) -> str:
    """The line a run prints at its start."""
    return f"Precision: {'bf16 autocast' if bf16 else 'float32'} ({why}); --bf16 0/1 overrides"


def grad_inf(opts: TrainOptions) -> float:
    """What +-inf gradients become under the options' recipe (NaN become 0)."""
    return RECIPES[opts.recipe].grad_inf


def _first(*values):
    return next(v for v in values if v is not None)


def describe(opts: TrainOptions) -> str:
    """One line saying what resolved options train with (--dry-run, and the start of a run)."""
    b1, b2 = opts.adam_betas
    decay = f", decay from {opts.lr_ref:g} kimg" if opts.lr_schedule == "edm2" and opts.lr_ref > 0 else ""
    inf = grad_inf(opts)
    grads = "non-finite gradients -> 0" if inf == 0 else f"NaN gradients -> 0, +-inf -> +-{inf:g}"
    noise = f"ln(sigma) ~ N({opts.P_mean:g}, {opts.P_std:g}^2), " if opts.precond in ("edm", "edm2") else ""
    ema = (f"EMA profiles std {','.join(f'{s:g}' for s in opts.ema_std)}" if opts.ema_std
           else f"EMA half-life {opts.ema:g} Mimg")
    hint = f"; EDM2 trains --arch {opts.arch} with --recipe edm2" if opts.recipe == "edm" and opts.arch in EDM2_PRESETS else ""
    tune = ""
    if opts.tune == "kd":
        tune = f"; ODE distillation (KD): the checkpoint's {opts.teacher_steps}-step Heun sampler as target"
    elif opts.tune == "dmd":
        levels = f" at levels {','.join(f'{v:g}' for v in opts.dmd_levels)}" if opts.dmd_levels else ""
        tune = (f"; distribution matching (DMD2) of the {opts.dmd_steps}-step sampler{levels}: the fake denoiser takes "
                f"{opts.fake_updates} steps at lr {opts.fake_lr:g} per step"
                f"{f', with a discriminator at lr {opts.gan_lr:g} (GAN term weight {opts.gan_weight:g})' if opts.gan_weight else ''}; "
                f"teacher {opts.teacher or opts.init}"
                f"{'' if opts.guidance == 1 else f', guided at {opts.guidance:g} by ' + (opts.guide or 'its null condition')}")
    elif opts.tune:
        tune = (f"; consistency tuning ({opts.tune.upper()}): r(t) with q {opts.ect_q:g}, k {opts.ect_k:g}, "
                f"b {opts.ect_b:g} over {opts.ect_stages} stages")
    return (f"recipe {opts.recipe}: --precond {opts.precond}, {noise}Adam betas {b1:g},{b2:g}, lr {opts.lr:g} "
            f"({opts.lr_schedule} schedule, ramp-up {opts.lr_rampup:g} kimg{decay}), {ema}, {grads}{hint}{tune}")
