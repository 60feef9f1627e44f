"""`vcdm tune`: a trained model of either stage turned into a sampler of 1-4 evaluations, by Easy Consistency
Tuning or consistency distillation (vcdm.diffusion.consistency) or by distilling its ODE (vcdm.diffusion.distillation);
a tuned model tuned again by distribution matching against the diffusion model (vcdm.diffusion.dmd).

The run is a training run: the checkpoint's recorded training options (dataset, structure, network,
embedder, batch, EMA) with the method's loss, every network tensor taken from the checkpoint (--init), a
constant learning rate and no ramp-up; DDP (torchrun), --resume, snapshots and --ema-std's post-hoc
EMA work as in `vcdm train`. Its snapshots record the consistency sampler, which `vcdm generate`,
`vcdm sample` and the Python API then use by default (2 steps; --steps 1-4).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from vcdm.checkpoints import read_checkpoint_config
from vcdm.cli.errors import user_errors, writable
from vcdm.cli.generate import NoiseLevels
from vcdm.cli.train import Finite, opt
from vcdm.train import TrainingError, train
from vcdm.train.lr_schedules import LRSchedule
from vcdm.diffusion.settings import CONSISTENCY_DEFAULT_STEPS, CONSISTENCY_STEPS, DMD_REFINE_LEVEL
from vcdm.train.options import (ECT_B, ECT_K, ECT_Q, FAKE_UPDATES, TEACHER_METHODS, TEACHER_STEPS, TUNE_METHODS,
                                TrainOptions)
from vcdm.workers import default_workers

TUNE_FRACTION = 1 / 2  # default length relative to the checkpoint's training (benchmarks/fewstep.py)
LR_FRACTION = 1 / 4    # default learning rate relative to the checkpoint's training (benchmarks/fewstep.py)
# dmd: (length relative to the teacher's training, learning rate of both networks relative to the teacher's last), for
# networks that predict x0 and for the rest. Measured on the demo digits (benchmarks/results/fewstep-digits.md): the
# prior at 1/300 was best from 1/3 to 1/2 of its training and drifted after 2/3 (at 1/100 it drifted after 1/6); the
# image model at 1/200 still improved at 2x (at 1/300 it was slower, at 1/20 it got worse).
DMD_DEFAULTS = {True: (1 / 2, 1 / 300), False: (2.0, 1 / 200)}
# dmd's --gan-weight by whether the network predicts x0. Measured on the demo digits, same sampling seeds
# (benchmarks/results/fewstep-digits.md): the prior's one step gained 0.2-0.6 FD on both seeds at 0.3 (3e-2: less, 1:
# no more); the image model's 2 steps at DMD2's 3e-3 gained nothing measurable (2.93 vs 2.92, 7.4 vs 7.6; 3e-2: 7.7)
# at twice the tuning cost, so the rest have none by default.
DMD_GAN_WEIGHTS = {True: 0.3, False: 0.0}
# r(t)'s first stage is ECT's q 2 (r = 0 below t ~ 2, r ~ t / 2 above), then the gap halves per stage, over 2 stages
# in a short tuning (ECT's CIFAR-10 runs: 8 stages over 25.6 Mimg; benchmarks/fewstep.py). A third stage leaves no
# r = 0 region: a network that predicts x0 (no c_skip) then collapses to a constant.
ECT_STAGES = 2
ECT_P_MEAN, ECT_P_STD = -1.1, 2.0  # ECT's ln(t) distribution: wider than EDM's, reaching the largest levels


def last_lr(recorded: TrainOptions, nimg: int) -> float:
    """The learning rate of the checkpoint's last training step (EDM2's schedule has decayed by then)."""
    return LRSchedule.of(recorded)(nimg)


def predicts_x0(recorded: TrainOptions) -> bool:
    """Whether the network predicts x0 directly (--pred_x0: the DALL-E 2 prior), which several defaults follow."""
    return any(recorded.pred_x0 or [])


def default_method(recorded: TrainOptions) -> str:
    """DMD for a checkpoint that was itself tuned (refining its sampler); otherwise KD for networks that predict x0
    directly (--pred_x0: the DALL-E 2 prior), ECT for the rest. Measured on the demo
    (benchmarks/results/fewstep-digits.md): consistency tuning left the x0-predicting prior 20-40 FD behind its own
    UniPC 12 (ECT collapsed it: two-stage FD 110 at one step; ECD 48), distilling its ODE closes the gap (one step
    as good as UniPC 12) for 35 cheap evaluations per sample; for EDM-preconditioned U-Nets ECT was as good as ECD
    at 2-4 steps and better at one (22 vs 27) at a third less compute per step, and better than KD at 2 steps.
    DMD then goes past the ODE those methods learn, towards the churned sampler's samples."""
    if recorded.tune:
        return "dmd"
    return "kd" if predicts_x0(recorded) else "ect"


def default_teacher(recorded: TrainOptions) -> str | None:
    """The diffusion model a tuned checkpoint was tuned from (None for a diffusion model: itself)."""
    return (recorded.teacher or recorded.init) if recorded.tune else None


METHOD_FLAGS = {"ect_q": ("ect", "ecd"), "ect_k": ("ect", "ecd"), "ect_b": ("ect", "ecd"), "ect_stages": ("ect", "ecd"),
                "teacher_steps": ("kd",), "teacher": ("ecd", "kd", "dmd"), "fake_updates": ("dmd",),
                "fake_lr": ("dmd",), "sampler_steps": ("dmd",), "sampler_levels": ("dmd",), "gan_weight": ("dmd",),
                "gan_lr": ("dmd",), "guidance": ("dmd",), "guide": ("dmd",)}


def recorded_training(checkpoint: str, flag: str = "CHECKPOINT") -> dict:
    """The training options a vcdm checkpoint records (a UsageError naming ``flag`` if it has none)."""
    if not Path(checkpoint).is_file():
        raise click.UsageError(f"{flag}: {checkpoint} does not exist (expected a vcdm .safetensors snapshot)")
    with user_errors():
        training = read_checkpoint_config(checkpoint).training
    if not training.get("data_class"):
        raise click.UsageError(f"{flag}: {checkpoint} records no training options (an imported network?); "
                               f"tune a model trained by `vcdm train`")
    return training


def trained_nimg(training: dict) -> int | None:
    nimg = training.get("nimg")
    return nimg if isinstance(nimg, int) and nimg > 0 else None


def tune_options(checkpoint: str, kwargs: dict) -> TrainOptions:
    """The training options of `checkpoint` turned into a tuning run's."""
    training = recorded_training(checkpoint)
    with user_errors():
        recorded = TrainOptions.from_dict(training)
    given = {k: v for k, v in kwargs.items() if v is not None}
    method = given.get("method") or default_method(recorded)
    for name in given.keys() & METHOD_FLAGS.keys():
        if method not in METHOD_FLAGS[name]:
            raise click.UsageError(f"--{name.replace('_', '-')} does not apply to --method {method}")
    teacher = (given.get("teacher") or default_teacher(recorded)) if method in TEACHER_METHODS else None
    if teacher and "teacher" not in given and not Path(teacher).is_file():
        raise click.UsageError(f"--teacher: {checkpoint} was tuned from {teacher}, which does not exist (here); "
                               f"give that diffusion model's path with --teacher")
    source = recorded_training(teacher, "--teacher") if teacher else training  # the training the defaults follow
    with user_errors():
        diffusion = TrainOptions.from_dict(source)
    trained = trained_nimg(source)
    levels = given.get("sampler_levels")
    fraction, lr_fraction = DMD_DEFAULTS[predicts_x0(recorded)] if method == "dmd" else (TUNE_FRACTION, LR_FRACTION)
    kimg = given.get("kimg") or (fraction * trained / 1000 if trained else None)
    if kimg is None:
        raise click.UsageError(f"--kimg: {teacher or checkpoint} records no training length to take {fraction:g} of; "
                               f"give the tuning length")
    lr = given.get("lr") or lr_fraction * (last_lr(diffusion, trained) if trained else diffusion.lr)
    return dataclasses.replace(
        recorded, init=str(checkpoint), tune=method, transfer=None, pretrained_weights=None, freeze_pretrained=False,
        resume=given.get("resume"), path=given.get("path", recorded.path), duration=kimg / 1000,
        lr=lr, lr_schedule="edm", lr_rampup=0.0, lr_ref=0.0, P_mean=kwargs["P_mean"],
        P_std=kwargs["P_std"], ect_q=given.get("ect_q", ECT_Q), ect_k=given.get("ect_k", ECT_K), ect_b=given.get("ect_b", ECT_B),
        ect_stages=given.get("ect_stages", ECT_STAGES), teacher_steps=given.get("teacher_steps", TEACHER_STEPS),
        teacher=teacher, fake_updates=given.get("fake_updates", FAKE_UPDATES), fake_lr=given.get("fake_lr"),
        gan_weight=given.get("gan_weight", DMD_GAN_WEIGHTS[predicts_x0(recorded)] if method == "dmd" else 0.0),
        gan_lr=given.get("gan_lr", diffusion.lr if method == "dmd" else None),
        guidance=given.get("guidance", TrainOptions.guidance), guide=given.get("guide"),  # not the checkpoint's
        dmd_steps=given.get("sampler_steps", len(levels) if levels else CONSISTENCY_DEFAULT_STEPS),
        dmd_levels=list(levels) if levels else None,
        outdir=kwargs["outdir"],
        desc=given.get("desc", method), nosubdir=False,
        seed=given.get("seed"), device=given.get("device"), workers=kwargs["workers"],
        batch=given.get("batch", recorded.batch), batch_gpu=given.get("batch_gpu"), tick=kwargs["tick"],
        snap=kwargs["snap"], dump=kwargs["dump"], time_limit=kwargs["time_limit"], dry_run=kwargs["dry_run"],
        tensorboard=False, resume_id=None)


@click.command(name="tune", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("checkpoint", metavar="CHECKPOINT")
@opt("--path", "--data", metavar="ZIP|DIR", type=str, default=None,
     help="The training data, where it lies now  [default: the path the checkpoint records]")
@opt("--method", type=click.Choice(TUNE_METHODS), default=None,
     help="ect: consistency training (x_r = x + r n); ecd: distillation, x_r a Heun step of the checkpoint's ODE; "
          "kd: regression onto the checkpoint's ODE solution (--teacher-steps); dmd: distribution matching (DMD2) "
          "against --teacher  [default: dmd for a tuned checkpoint, kd for networks that predict x0 (--pred_x0), "
          "else ect]")
@opt("--teacher", metavar="SAFETENSORS", type=str, default=None,
     help="ecd/kd/dmd: the diffusion model distilled  [default: the one a tuned CHECKPOINT was tuned from, else CHECKPOINT]")
@opt("--kimg", metavar="KIMG", type=Finite(min=0, min_open=True), default=None,
     help="Tuning duration  [default: 1/2 of the checkpoint's training; dmd: 1/2 of the teacher's for networks that "
          "predict x0, else 2x]")
@opt("--lr", metavar="FLOAT", type=Finite(min=0, min_open=True), default=None,
     help="Learning rate, constant (no ramp-up, no decay)  [default: 1/4 of the training's last; dmd: 1/300 of the "
          "teacher's for networks that predict x0, else 1/200]")
@opt("--ect-q", metavar="Q", type=Finite(min=1, min_open=True), default=None,
     help=f"ect/ecd: r(t) = t (1 - q^-(a+1) (1 + k sigmoid(-b t))) at stage a: t - r shrinks by Q per stage  "
          f"[default: {ECT_Q:g}]")
@opt("--ect-k", metavar="K", type=Finite(min=0), default=None, help=f"ect/ecd: r(t)'s K  [default: {ECT_K:g}]")
@opt("--ect-b", metavar="B", type=Finite(min=0), default=None, help=f"ect/ecd: r(t)'s B  [default: {ECT_B:g}]")
@opt("--ect-stages", metavar="INT", type=click.IntRange(min=1), default=None,
     help=f"ect/ecd: stages of r(t) over --kimg  [default: {ECT_STAGES}]")
@opt("--teacher-steps", metavar="INT", type=click.IntRange(min=2), default=None,
     help=f"kd: steps of the checkpoint's Heun sampler solved for each target (2 INT - 1 evaluations)  "
          f"[default: {TEACHER_STEPS}]")
@opt("--sampler-steps", metavar="INT", type=click.IntRange(*CONSISTENCY_STEPS), default=None,
     help=f"dmd: the consistency sampler's steps it trains, recorded as the tuned model's default  "
          f"[default: {CONSISTENCY_DEFAULT_STEPS}]")
@opt("--sampler-levels", metavar="SIGMA,...", type=NoiseLevels(), default=None,
     help="dmd: the noise levels of those steps, one each, falling (e.g. 80,0.15: the second step denoises the "
          "first's sample re-noised to 0.15), trained and recorded as the tuned model's default; they set "
          f"--sampler-steps  [default: Karras's; 2 steps of a network that predicts x0 (--pred_x0): its top level "
          f"and {DMD_REFINE_LEVEL} sigma_data]")
@opt("--fake-updates", metavar="INT", type=click.IntRange(min=1), default=None,
     help=f"dmd: steps of the fake denoiser per step  [default: {FAKE_UPDATES}]")
@opt("--fake-lr", metavar="FLOAT", type=Finite(min=0, min_open=True), default=None,
     help="dmd: the fake denoiser's learning rate  [default: --lr]")
@opt("--gan-weight", metavar="FLOAT", type=Finite(min=0), default=None,
     help="dmd: DMD2's GAN term, a discriminator on the fake denoiser's bottleneck given real data; the sampler's "
          "weight of its loss (DMD2's ImageNet value: 3e-3); 0: none  [default: 0.3 for networks that predict x0 "
          "(--pred_x0), else 0]")
@opt("--gan-lr", metavar="FLOAT", type=Finite(min=0, min_open=True), default=None,
     help="dmd: the discriminator head's learning rate (it starts from random weights)  "
          "[default: the teacher's training lr]")
@opt("--guidance", metavar="W", type=Finite(min=0, min_open=True), default=None,
     help="dmd: guide the teacher, D_g + W (D - D_g), so that the sampler learns the guided model's samples "
          "(with --guide: autoguidance)  [default: 1, unguided]")
@opt("--guide", metavar="SAFETENSORS", type=str, default=None,
     help="dmd: the guiding network D_g, a weaker model of the same data (an earlier snapshot or a smaller network; "
          "EDM2's autoguidance)  [default: the teacher's own null condition, classifier-free]")
@opt("--P_mean", metavar="FLOAT", type=float, default=ECT_P_MEAN, help="Mean of ln(t).")
@opt("--P_std", metavar="FLOAT", type=Finite(min=0, min_open=True), default=ECT_P_STD,
     help="Standard deviation of ln(t).")
@opt("--batch", metavar="INT", type=click.IntRange(min=1), default=None, help="Total batch size  [default: the training's]")
@opt("--batch-gpu", metavar="INT", type=click.IntRange(min=1), default=None, help="Limit batch size per process.")
@opt("--outdir", metavar="DIR", type=str, default="training-runs", help="Where to make the run directory.")
@opt("--desc", metavar="STR", type=str, default=None, help="Appended to the run directory name  [default: the method]")
@opt("--seed", metavar="INT", type=int, default=None, help="Random seed  [default: random]")
@opt("--tick", metavar="KIMG", type=Finite(min=0, min_open=True), default=10.0, help="How often to print progress.")
@opt("--snap", metavar="TICKS", type=click.IntRange(min=0), default=5,
     help="How often to save snapshots (0: only at the end).")
@opt("--dump", metavar="TICKS", type=click.IntRange(min=0), default=5,
     help="How often to save training states (0: only at the end).")
@opt("--resume", metavar="PT|DIR|auto", type=str, default=None, help="Resume a tuning run, as `vcdm train --resume`.")
@opt("--time-limit", metavar="SEC", type=Finite(min=0), default=0.0, help="Stop (saving a state) after SEC seconds.")
@opt("--device", type=str, default=None, help="cpu | cuda | cuda:N  [default: cuda if available]")
@opt("--workers", metavar="INT", type=click.IntRange(min=0), default=default_workers(), help="DataLoader workers.")
@opt("--dry-run", "-n", type=bool, default=False, help="Print the options, then exit, writing nothing.")
def command(checkpoint: str, **kwargs) -> None:
    """Tune CHECKPOINT (a prior or an image model trained by `vcdm train`, EDM or EDM2 network) into a
    sampler of 1-4 network evaluations: Easy Consistency Tuning (Geng et al. 2024), consistency distillation
    on its schedule, or distillation of the checkpoint's ODE (Luhman & Luhman 2021). Needs the
    training data. Run with plain `python` or under `torchrun` (DDP), as `vcdm train`.

    \b
    vcdm tune runs/prior/network-snapshot-002000.safetensors --outdir runs
    vcdm generate --network runs/<ID>-<METHOD>/network-snapshot-<KIMG>.safetensors --seeds 0-63   # 2 steps
    vcdm generate --network runs/<ID>-<METHOD>/network-snapshot-<KIMG>.safetensors --steps 1 --seeds 0-63
    """
    opts = tune_options(checkpoint, kwargs)
    if not opts.dry_run:
        writable(opts.outdir, "--outdir")
    with user_errors(usage=True):
        try:
            train(opts)
        except TrainingError as e:
            raise click.ClickException(str(e)) from None
