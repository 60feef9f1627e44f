"""Training options: typed, JSON-able settings with the original release's flag names and defaults,
in groups (data, embedder, model, optimisation, schedule, I/O). Flags are parsed into these in
vcdm.cli.train; nothing here reads strings.

Defaults are EDM's / the original release's train.py: 200 Mimg, global batch 512, Adam lr 1e-3
(betas 0.9/0.999, eps 1e-8) ramped up linearly over 10 Mimg, EMA half-life 0.5 Mimg ramped up with
ratio 0.05, dropout 0.13, augmentation probability 0.12, a tick per 50 kimg, snapshots and training
states every 50 ticks (the release's value; EDM's state interval is 500).
Options left None (precond, P_mean, P_std, lr, adam_betas, lr_schedule, lr_ref) take the values of the
`recipe` (EDM's or EDM2's; vcdm.train.recipe.resolve), and a run records them resolved.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from vcdm.data.structure import DATA_CLASS_TENSORS
from vcdm.diffusion.settings import CONSISTENCY_DEFAULT_STEPS, CONSISTENCY_STEPS, SamplerOptionError, SamplerOptions
from vcdm.nets.presets import ARCHS
from vcdm.train.phema import MAX_STD
from vcdm.train.lr_schedules import LR_SCHEDULES
from vcdm.train.recipe import RECIPES
from vcdm.workers import default_workers

PRECONDS = ("edm", "vp", "ve", "edm2")
TUNE_METHODS = ("ect", "ecd", "kd", "dmd")  # vcdm tune: ECT; ECT's schedule with the checkpoint as teacher; its ODE distilled; DMD2
TEACHER_METHODS = ("ecd", "kd", "dmd")  # the tuning methods that load the checkpoint as a frozen teacher
ECT_Q, ECT_K, ECT_B = 2.0, 8.0, 1.0  # ECT's r(t) (its CIFAR-10 values); vcdm tune's defaults too
FAKE_UPDATES = 5  # dmd: DMD2's fake-denoiser steps per sampler step (its two time-scale update rule)
TEACHER_STEPS = 18  # kd: EDM's Heun sampler for 32x32 images (35 evaluations)
EMBEDDERS = ("clip-vit-b32", "pixel-pca", "dinov2-vitb14")  # as vcdm.embedders.EMBEDDERS (not imported: heavy)


OPTIONS_BYTES = 1 << 20  # a training_options.json holds a few KB
FINITE = ("ect_q", "ect_k", "ect_b", "fake_lr", "gan_lr", "gan_weight", "guidance", "lr", "ls", "duration", "lr_rampup", "lr_ref", "P_mean", "P_std", "ema", "ema_rampup", "tick", "time_limit", "augment", "dropout")


class OptionError(ValueError):
    """Options that cannot work together; the message names the flag."""


def _require(flag: str, value: float | int | None, ok: bool, expected: str) -> None:
    """One check of one flag: the one-line error names the flag, what it takes and what it got."""
    if not ok:
        raise OptionError(f"{flag}: expected {expected}, got {value:g}" if isinstance(value, float)
                          else f"{flag}: expected {expected}, got {value}")


@dataclass
class DataOptions:
    path: str = ""
    data_class: str = "CLIPDataset"
    exist: list[int] | None = None  # 0/1 per tensor of the data class (None: all)
    observed: list[int] = field(default_factory=list)  # 0/1 per tensor: conditioning
    xflip: bool = False
    cache: bool = True


@dataclass
class EmbedderOptions:
    embedder: str | None = None
    clip_weights: str | None = None
    n_comp: list[int] = field(default_factory=lambda: [0])  # one value, or one per tensor
    n_clusters: list[int] = field(default_factory=lambda: [0])
    pca_dim: int = 64
    train_embedder: bool = False
    embed_cache: bool = True


@dataclass
class ModelOptions:
    arch: str | None = None
    recipe: str = "edm"  # the defaults of the options left None: EDM's, or EDM2's (vcdm.train.recipe)
    precond: str | None = None  # edm | vp | ve | edm2 (EDM's preconditioning + learned uncertainty, EDM2's loss)
    P_mean: float | None = None  # ln(sigma) ~ N(P_mean, P_std^2) in the edm/edm2 losses
    P_std: float | None = None
    pred_x0: list[int] = field(default_factory=lambda: [0])  # one value, or one per tensor
    noise_mult: list[float] = field(default_factory=lambda: [1.0])
    equally_weight_tensors: bool = False
    cond_drop: float = 0.0  # --cond-drop: conditioning replaced by zeros with this probability (for guidance)
    cbase: int | None = None
    cres: list[int] | None = None
    prior_dim: int | None = None
    prior_depth: int | None = None
    dropout: float | None = None  # None: 0.13 for the U-Nets (EDM), 0 for dalle2 (the release ignores it)
    augment: float | None = None  # None: 0.12 (EDM's), 0 for EDM2's networks (they have no augmentation input)
    pretrained_weights: str | None = None
    freeze_pretrained: bool = False
    transfer: str | None = None
    init: str | None = None  # a vcdm checkpoint whose every network tensor starts the run (vcdm tune)
    tune: str | None = None  # "ect"/"ecd"/"kd": tuning instead of the diffusion loss (vcdm.diffusion.consistency, .distillation)
    ect_q: float = ECT_Q  # ECT's r(t): t - r shrinks by q per stage
    ect_k: float = ECT_K  # ... times 1 + k sigmoid(-b t)
    ect_b: float = ECT_B
    ect_stages: int = 8  # equal stages over --duration
    teacher_steps: int = TEACHER_STEPS  # kd: the teacher's Heun sampler steps (2 n - 1 evaluations per sample and step)
    teacher: str | None = None  # ecd/kd/dmd: the frozen teacher's checkpoint (None: --init's)
    dmd_steps: int = CONSISTENCY_DEFAULT_STEPS  # dmd: the consistency sampler's steps it trains (and records)
    dmd_levels: list[float] | None = None  # dmd: that sampler's levels, one per step (None: dmd.sampler_levels')
    fake_updates: int = FAKE_UPDATES  # dmd: fake-denoiser steps per training step
    fake_lr: float | None = None  # dmd: the fake denoiser's learning rate (None: --lr)
    gan_weight: float = 0.0  # dmd: DMD2's GAN term, the sampler's generator-loss weight (0: none)
    gan_lr: float | None = None  # dmd: the discriminator head's learning rate (None: --lr; vcdm tune: the teacher's)
    guidance: float = 1.0  # dmd: the teacher's guidance scale (1: unguided)
    guide: str | None = None  # dmd: the network the teacher is guided away from (None: its null condition)


@dataclass
class OptimOptions:
    batch: int = 512
    batch_gpu: int | None = None
    lr: float | None = None  # the recipe's: 1e-3, or the EDM2 preset's
    adam_betas: list[float] | None = None  # (beta1, beta2): EDM's (0.9, 0.999), EDM2's (0.9, 0.99)
    ls: float = 1.0
    fp16: bool = False
    bf16: bool | None = None  # None: per device and network (vcdm.train.recipe.resolve_precision); runs record it resolved
    bench: bool = True
    seed: int | None = None
    max_nonfinite: int = 10


@dataclass
class ScheduleOptions:
    duration: float = 200.0  # Mimg
    lr_rampup: float = 10000.0  # kimg
    lr_schedule: str | None = None  # vcdm.train.lr_schedules: edm | edm2
    lr_ref: float | None = None  # kimg: edm2's decay starts here (0: no decay)
    ema: float = 0.5  # Mimg
    ema_rampup: float = 0.05
    ema_std: list[float] | None = None  # EDM2's power-function EMA profiles instead of --ema (e.g. [0.05, 0.1])
    time_limit: float = 0.0  # seconds for this process (0: none); then stop as on SIGTERM
    tick: float = 50  # kimg
    snap: int = 50  # ticks
    dump: int = 50
    sample: int = 50


@dataclass
class IOOptions:
    outdir: str = "training-runs"
    desc: str | None = None
    nosubdir: bool = False
    resume: str | None = None
    device: str | None = None
    workers: int = field(default_factory=default_workers)
    tensorboard: bool = False
    wandb_dir: str = "."
    resume_id: str | None = None
    dry_run: bool = False


GROUPS = (DataOptions, EmbedderOptions, ModelOptions, OptimOptions, ScheduleOptions, IOOptions)


def _recorded_type(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON fits an option's annotation (ints pass as floats; a list may be
    recorded as the flags' text, "0,1")."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_recorded_type(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        return isinstance(value, str) or isinstance(value, list) and all(_recorded_type(v, item) for v in value)
    if hint is float:
        return type(value) in (int, float)
    if hint is int:
        return type(value) is int
    return hint is Any or isinstance(value, hint)
LIST_FIELDS = {"exist": int, "observed": int, "n_comp": int, "n_clusters": int, "pred_x0": int, "noise_mult": float,
               "ema_std": float, "dmd_levels": float, "cres": int}


# What defines a run's model and the data it learns: a resumed run must keep these (--resume=auto
# only resumes a run that recorded the same values; --resume=DIR refuses flags that change them).
IDENTITY = ("path", "data_class", "exist", "observed", "xflip", "embedder", "n_comp", "n_clusters", "pca_dim",
            "train_embedder", "arch", "recipe", "precond", "pred_x0", "noise_mult", "equally_weight_tensors", "cbase", "cres",
            "prior_dim", "prior_depth", "tune")


@dataclass
class TrainOptions(IOOptions, ScheduleOptions, OptimOptions, ModelOptions, EmbedderOptions, DataOptions):
    """Every training setting, typed (lists are lists), under the release's flag names; the groups
    (data, embedder, model, optimisation, schedule, I/O) are also dataclasses of their own (`group`)."""

    def __post_init__(self) -> None:
        # A list given as text takes the flags' syntax ("0,1"; also how older vcdm recorded lists), never
        # a string's characters.
        for name, kind in LIST_FIELDS.items():
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, [kind(v) for v in value.split(",") if v.strip()])
                except ValueError:
                    raise OptionError(f"--{name}: expected comma-separated numbers like '0,1', got '{value}'") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def group(self, cls: type) -> Any:
        """The settings of one group, e.g. ``opts.group(OptimOptions)``."""
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainOptions":
        """Options as recorded in a training_options.json, also by older vcdm (lists as "1,0" strings);
        keys that are not options (world_size, batch_gpu of the run) are ignored."""
        if not isinstance(d, dict):
            raise OptionError(f"recorded options are {type(d).__name__}, expected an object")
        hints = typing.get_type_hints(cls)
        values = {k: v for k, v in d.items() if k in hints and not k.startswith("_")}
        for name, value in values.items():
            if not _recorded_type(value, hints[name]):
                hint = hints[name]
                raise OptionError(f"recorded option '{name}' is {json.dumps(value)[:40]}, expected "
                                  f"{hint.__name__ if isinstance(hint, type) else hint}")
        if values.get("arch") == "dalle2" and d.get("network", "PriorTransformer") == "PriorTransformer":
            values["arch"] = "prior"  # recorded before --arch dalle2 built the release's network (no "network" then)
        return cls(**values)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return DATA_CLASS_TENSORS[self.data_class]

    @property
    def exist_flags(self) -> list[int]:
        return list(self.exist) if self.exist is not None else [1] * len(self.tensor_names)

    @property
    def uses_embedding(self) -> bool:
        names, bits = self.tensor_names, self.exist_flags
        return "embedding" in names and len(bits) == len(names) and bits[names.index("embedding")] == 1

    @property
    def embedder_name(self) -> str | None:
        """The embedder actually used: none unless the embedding tensor exists."""
        if not self.uses_embedding:
            return None
        return self.embedder or "clip-vit-b32"

    def validate(self) -> None:
        """Checks that need neither the dataset nor the network; raise OptionError."""
        if not self.path:
            raise OptionError("--path: the dataset (zip or folder) is required")
        if self.data_class not in DATA_CLASS_TENSORS:
            raise OptionError(f"--data_class: expected one of {', '.join(DATA_CLASS_TENSORS)}, got '{self.data_class}'")
        if not self.observed:
            raise OptionError(f"--observed: required, one 0/1 per tensor of {self.data_class} {list(self.tensor_names)}")
        if self.arch is not None and self.arch not in ARCHS:
            raise OptionError(f"--arch: expected one of {', '.join(ARCHS)}, got '{self.arch}'")
        if self.recipe not in RECIPES:
            raise OptionError(f"--recipe: expected one of {', '.join(RECIPES)}, got '{self.recipe}'")
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            raise OptionError(f"--lr-schedule: expected one of {', '.join(LR_SCHEDULES)}, got '{self.lr_schedule}'")
        if self.adam_betas is not None and (len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas)):
            raise OptionError(f"--adam-betas: expected two numbers in [0, 1), got {self.adam_betas}")
        if self.P_std is not None and not self.P_std > 0:
            raise OptionError(f"--P_std: must be positive, got {self.P_std}")
        if self.lr_ref is not None and not self.lr_ref >= 0:
            raise OptionError(f"--lr-ref: must be 0 (no decay) or a number of kimg, got {self.lr_ref}")
        if self.precond is not None and self.precond not in PRECONDS:
            raise OptionError(f"--precond: expected one of {', '.join(PRECONDS)}, got '{self.precond}'")
        if self.embedder is not None and self.embedder not in EMBEDDERS:
            raise OptionError(f"--embedder: expected one of {', '.join(EMBEDDERS)}, got '{self.embedder}'")
        if self.fp16 and self.bf16:
            raise OptionError("--fp16 and --bf16: pick one")
        if self.transfer and self.resume:
            raise OptionError("--transfer and --resume cannot be specified at the same time")
        if self.transfer and self.pretrained_weights:
            raise OptionError("--transfer and --pretrained_weights cannot be specified at the same time")
        if self.init and (self.transfer or self.pretrained_weights):
            raise OptionError("--init starts from a whole vcdm checkpoint: drop --transfer/--pretrained_weights")
        if self.tune is not None and self.tune not in TUNE_METHODS:
            raise OptionError(f"--tune: expected one of {', '.join(TUNE_METHODS)}, got '{self.tune}'")
        if self.tune:
            _require("--ect-q", self.ect_q, self.ect_q > 1, "a number > 1")
            _require("--ect-k", self.ect_k, self.ect_k >= 0, "a number >= 0")
            _require("--ect-b", self.ect_b, self.ect_b >= 0, "a number >= 0")
            _require("--ect-stages", self.ect_stages, self.ect_stages >= 1, "at least 1")
        if self.tune == "kd":
            _require("--teacher-steps", self.teacher_steps, self.teacher_steps >= 2, "at least 2")
        if self.tune == "dmd":
            low, high = CONSISTENCY_STEPS
            _require("--sampler-steps", self.dmd_steps, low <= self.dmd_steps <= high, f"{low}..{high}")
            if self.dmd_levels is not None:
                try:
                    SamplerOptions(sampler="consistency", num_steps=self.dmd_steps, levels=self.dmd_levels)
                except SamplerOptionError as e:
                    flags = {"levels": "--sampler-levels", "num_steps": "--sampler-steps"}
                    raise OptionError(e.named(lambda field: flags.get(field, field))) from None
            _require("--fake-updates", self.fake_updates, self.fake_updates >= 1, "at least 1")
            _require("--fake-lr", self.fake_lr, self.fake_lr is None or self.fake_lr > 0, "a positive lr")
            _require("--gan-weight", self.gan_weight, self.gan_weight >= 0, "a weight >= 0 (0: no GAN term)")
            _require("--gan-lr", self.gan_lr, self.gan_lr is None or self.gan_lr > 0, "a positive lr")
            _require("--guidance", self.guidance, self.guidance > 0, "a positive scale (1: unguided)")
            if self.guide is not None and self.guidance == 1:
                raise OptionError(f"--guide {self.guide}: a guide needs --guidance other than 1 (at 1 it is not used)")
            if self.guidance != 1 and self.guide is None and not any(self.observed):
                raise OptionError(f"--guidance {self.guidance:g}: without --guide the teacher is guided by its null "
                                  f"condition, but this model is unconditional; give --guide")
        elif self.guidance != 1 or self.guide is not None:
            raise OptionError("--guidance/--guide: guide the teacher of `vcdm tune --method dmd`; a sampler's guidance "
                              "is `vcdm generate --guidance`")
        if self.freeze_pretrained and not self.pretrained_weights:
            raise OptionError("--freeze_pretrained needs --pretrained_weights")
        if self.batch_gpu is not None and self.batch_gpu > self.batch:
            raise OptionError(f"--batch-gpu {self.batch_gpu} is larger than --batch {self.batch}")
        if not self.tick > 0:
            raise OptionError(f"--tick: must be positive (kimg), got {self.tick}")
        if self.batch < 1:
            raise OptionError(f"--batch: must be at least 1, got {self.batch}")
        for name in ("snap", "dump", "sample"):
            if getattr(self, name) < 0:
                raise OptionError(f"--{name}: must be 0 (off) or a number of ticks, got {getattr(self, name)}")
        if not self.duration > 0:
            raise OptionError(f"--duration: must be positive (Mimg), got {self.duration}")
        if not (0 <= (self.augment or 0) <= 1 and 0 <= (self.dropout or 0) <= 1):
            raise OptionError("--augment and --dropout: probabilities must lie in [0, 1]")
        if self.workers < 0 or self.max_nonfinite < 0 or self.time_limit < 0:
            raise OptionError("--workers, --max-nonfinite and --time-limit: must not be negative")
        for name in FINITE:
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise OptionError(f"--{name.replace('_', '-')}: must be a finite number, got {value}")
        if self.ema_std is not None:
            self.check_ema_std()
        if self.lr is not None and not self.lr > 0:
            raise OptionError(f"--lr: must be positive, got {self.lr}")

    def check_ema_std(self) -> None:
        if not self.ema_std or not all(0 < s < MAX_STD for s in self.ema_std):
            raise OptionError(f"--ema-std: expected relative standard deviations in (0, {MAX_STD:.3f}), got {self.ema_std}")
        if len({f"{s:.3f}" for s in self.ema_std}) != len(self.ema_std):
            raise OptionError(f"--ema-std: {self.ema_std} are not distinct to three decimals (snapshot names)")
