"""Sampler options and the seed release's results layout.

Without ``--outdir`` samples go to
``results/<run-id>/<checkpoint-stem>/<sampler args>/[<load_obs_from parts joined by _>/]samples-<first>-<last>/``
where ``<sampler args>`` is ``key-value`` pairs sorted by key and joined by ``_``, exactly as the original
release spells them (``S_churn-50.0_S_max-inf_..._solver-None``). Options this toolkit added enter the
name only when they differ from their default, so the original names stay exact; a guiding network
enters as ``gnet-<16 hex digits of the file's SHA-256>``. A name longer than
255 bytes (a deep ``--load_obs_from`` path) becomes its first 238 bytes, ``~`` and 16 hex digits of its
SHA-256 (``vcdm.paths.fit_name``): the same arguments always give the same folder.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from vcdm.fileio import IntRanges, as_int
from vcdm.paths import fit_name

if TYPE_CHECKING:
    import torch

    from vcdm.perf import InferenceSettings

ABLATION_KEYS = ("solver", "discretization", "schedule", "scaling")


class GenerateError(ValueError):
    """Bad generation input (options, files, models); the message names the flag or file."""


class FlagError(GenerateError):
    """A flag's (or API argument's) value that cannot work: a usage error, exit status 2 on the command line."""
    usage_error = True


SEED_LIMIT = 1 << 32     # seeds draw from seed mod 2**32 (EDM's rule): larger ones would repeat smaller ones
MAX_SEEDS = 10_000_000   # per run: the missing seeds are listed in memory (~40 bytes each)


def seed_list(seeds: "str | Sequence[int] | IntRanges", name: str = "seeds") -> IntRanges:
    """Seeds as the CLI writes them ('0-3,7'), a range, or a sequence of true ints → the seeds without
    repeats, in order, kept as ranges. TypeError for floats, bools and other types; FlagError (naming
    ``name``) for none, too many, or seeds outside 0..2**32-1 — all checked before any list is built."""
    if isinstance(seeds, str):
        try:
            seeds = IntRanges.parse(seeds, name)
        except ValueError as e:
            raise FlagError(str(e)) from None
    elif isinstance(seeds, range) and seeds.step == 1:
        seeds = IntRanges([seeds])
    elif not isinstance(seeds, IntRanges):
        if not hasattr(seeds, "__len__") or not hasattr(seeds, "__iter__"):
            hint = f" (one seed: [{seeds}]; {seeds} seeds: range({seeds}))" if isinstance(seeds, int) else ""
            raise TypeError(f"{name}: expected text like '0-63', a range or a sequence of ints, got "
                            f"{type(seeds).__name__} {seeds!r}{hint}")
        if len(seeds) > MAX_SEEDS:
            raise FlagError(f"{name}: {len(seeds)} seeds; at most {MAX_SEEDS} per run (split the job)")
        values = [as_int(s, name) for s in seeds]
        seeds = IntRanges(range(v, v + 1) for v in dict.fromkeys(values))
    if not seeds:
        raise FlagError(f"{name}: no seeds given")
    if seeds.min() < 0 or seeds.max() >= SEED_LIMIT:
        bad = seeds.min() if seeds.min() < 0 else seeds.max()
        raise FlagError(f"{name}: seeds must lie in 0..{SEED_LIMIT - 1} (a seed's noise is drawn from "
                            f"seed mod 2**32, so larger ones would repeat smaller ones), got {bad}")
    if len(seeds) > MAX_SEEDS:
        raise FlagError(f"{name}: {len(seeds)} seeds; at most {MAX_SEEDS} per run (split the job)")
    return seeds.unique()


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"--{key}: expected a number, got {type(value).__name__} {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplerOptions:
    """The seed's sampler arguments (EDM's names) plus ``sampler`` and guidance.

    ``sampler=None`` picks EDM's rule: the ablation sampler when any of solver / discretization /
    schedule / scaling is given, else the EDM Heun sampler with churn. Guidance (vcdm.diffusion.guidance):
    ``guidance`` w, ``gnet`` the guiding network's checkpoint (None: classifier-free guidance, the null
    condition) and ``guidance_interval`` (lo, hi], the noise levels guided (None: all). With w = 1 the guide
    and the interval are dropped: those are the unguided samples, and they go to the unguided folder.
    """
    num_steps: int = 18
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0
    solver: str | None = None
    discretization: str | None = None
    schedule: str | None = None
    scaling: str | None = None
    sampler: str | None = None
    guidance: float = 1.0
    gnet: str | None = None
    guidance_interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        # Floats print as the seed's click-parsed floats did ("50.0", not "50"), so directory names match.
        for key in ("sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise", "guidance"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, _number(value, key))
        from vcdm.diffusion.sampling import CHURN_SAMPLERS, CONSISTENCY_STEPS, MAX_STEPS, SAMPLERS

        object.__setattr__(self, "num_steps", as_int(self.num_steps, "--steps"))
        if not 1 <= self.num_steps <= MAX_STEPS:
            raise FlagError(f"--steps: expected 1..{MAX_STEPS} steps, got {self.num_steps}")
        self._check_ranges()
        self._check_guide()
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise FlagError(f"--sampler: expected one of {', '.join(SAMPLERS)}, got '{self.sampler}'")
        lo, hi = CONSISTENCY_STEPS
        if self.sampler == "consistency" and not lo <= self.num_steps <= hi:
            raise FlagError(f"--steps: the consistency sampler takes {lo}..{hi} steps, got {self.num_steps}")
        ablation = [k for k in ABLATION_KEYS if getattr(self, k) is not None]
        if ablation and self.sampler not in (None, "ablation"):
            raise FlagError(f"--sampler {self.sampler} does not take --{', --'.join(ablation)} "
                            "(those select the ablation sampler)")
        if self.sampler not in (None, *CHURN_SAMPLERS) and (self.S_churn or self.S_noise != 1.0 or self.S_min
                                                             or self.S_max != math.inf):
            kind = "is deterministic" if self.sampler in ("dpm2m", "unipc") else "has no churn"
            raise FlagError(f"--sampler {self.sampler} {kind}: drop --S_churn/--S_min/--S_max/--S_noise")

    def _check_ranges(self) -> None:
        """Every number finite (S_max may be +inf: churn at all noise levels) and in its range: a NaN or inf
        would run the whole sampler and write black images."""
        positive = ("sigma_min", "sigma_max", "rho", "guidance")
        for key in ("sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise", "guidance"):
            value = getattr(self, key)
            if value is None or (key == "S_max" and value == math.inf):
                continue
            if not math.isfinite(value) or value < 0 or (key in positive and value == 0):
                kind = "positive" if key in positive else "non-negative"
                raise FlagError(f"--{key}: expected a finite {kind} number, got {value}")
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise FlagError(f"--sigma_min {self.sigma_min} must be below --sigma_max {self.sigma_max}")

    def _check_guide(self) -> None:
        if self.guidance == 1.0:
            object.__setattr__(self, "gnet", None)
            object.__setattr__(self, "guidance_interval", None)
            return
        if self.gnet is not None:
            object.__setattr__(self, "gnet", os.fspath(self.gnet))
        if self.guidance_interval is None:
            return
        interval = self.guidance_interval
        if isinstance(interval, (str, bytes)) or not hasattr(interval, "__len__") or len(interval) != 2:
            raise TypeError(f"--guidance-interval: expected (SIGMA_LO, SIGMA_HI), got {interval!r}")
        lo, hi = (_number(v, "guidance-interval") for v in interval)
        if not 0 <= lo < hi:
            raise FlagError(f"--guidance-interval: expected SIGMA_LO,SIGMA_HI with 0 <= SIGMA_LO < SIGMA_HI, "
                            f"got {lo},{hi}")
        object.__setattr__(self, "guidance_interval", (lo, hi))

    @property
    def resolved_sampler(self) -> str:
        if self.sampler is not None:
            return self.sampler
        return "ablation" if any(getattr(self, k) is not None for k in ABLATION_KEYS) else "edm"

    def sampler_kwargs(self) -> dict:
        """Keyword arguments for ``vcdm.diffusion.samplers.sample`` (None values left to its defaults)."""
        keys = ["num_steps", "sigma_min", "sigma_max", "rho"]
        if self.resolved_sampler in ("edm", "ablation"):  # the samplers with churn
            keys += ["S_churn", "S_min", "S_max", "S_noise"]
        if self.resolved_sampler == "ablation":
            keys += list(ABLATION_KEYS)
        if self.guidance_interval is not None:
            keys.append("guidance_interval")
        kwargs = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        return {"sampler": self.resolved_sampler, "guidance": self.guidance, **kwargs}

    def replace(self, **changes) -> "SamplerOptions":
        return SamplerOptions(**{**asdict(self), **changes})


def recorded_defaults(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The SamplerOptions a checkpoint's recorded sampler sets where the user chose none: a consistency-tuned
    model's sampler and steps, without churn (vcdm tune); {} for other models, which keep the commands' defaults."""
    sampler = (config or {}).get("sampler")
    if not sampler:
        return {}
    return {"sampler": sampler["name"], "num_steps": sampler["num_steps"], "S_churn": 0.0, "S_noise": 1.0}


def checkpoint_defaults(path: str | os.PathLike) -> dict[str, Any]:
    """``recorded_defaults`` of the checkpoint at ``path``; {} when it cannot be read (loading it says why)."""
    from vcdm.checkpoints import read_config

    try:
        return recorded_defaults(read_config(path))
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class RunOptions:
    """How a run is carried out and written — nothing here changes a sample.

    ``outdir``: None = the seed's results layout; ``max_batch_size``: --batch; ``subdirs``: a folder per
    1000 seeds; ``grid``: also tile the first 256 images into this PNG; ``overwrite``: replace samples
    made with other settings; ``progress``: progress bars; ``flags``: how messages spell the stage's
    sampler flags (``--image-`` in `vcdm sample`: ``--image-guidance``)."""
    outdir: str | os.PathLike | None = None
    max_batch_size: int = 64
    subdirs: bool = False
    grid: str | os.PathLike | None = None
    overwrite: bool = False
    progress: bool = True
    flags: str = "--"


@dataclass(frozen=True)
class Conditioning:
    """Where a conditional model's observed tensors come from: ``class_idx`` (None: random per seed),
    ``load_obs_from`` (a prior's sample files), else random items of ``data_path`` (None: the training
    data's recorded path), embedded with the model's embedder (``clip_weights``: local CLIP weights)."""
    class_idx: int | None = None
    load_obs_from: str | os.PathLike | None = None
    data_path: str | None = None
    clip_weights: str | os.PathLike | None = None


@dataclass(frozen=True)
class InferenceChoices:
    """The --bf16 / --channels-last / --compile choices; None leaves one to ``vcdm.perf.default_settings``
    for the device and network. A ``vcdm.perf.InferenceSettings`` fixes all three instead."""
    bf16: bool | None = None
    channels_last: bool | None = None
    compile: bool | None = None


def inference_settings(choice: "InferenceChoices | InferenceSettings", device: "torch.device",
                       denoiser: "torch.nn.Module") -> "InferenceSettings":
    """The settings to evaluate ``denoiser`` with on ``device``."""
    from vcdm import perf

    if isinstance(choice, perf.InferenceSettings):
        return choice
    return perf.resolve(device, denoiser, bf16=choice.bf16, channels_last=choice.channels_last,
                        compile=choice.compile)


FLAG_NAMES = {"num_steps": "steps", "discretization": "disc"}  # field → command-line flag, where they differ


GUIDE_FIELDS = ("gnet", "guidance_interval")


def flag_values(opts: SamplerOptions) -> dict[str, object]:
    """``{"--steps": 18, "--sigma_min": None, …}``: the options under their command-line names. The guide
    and the guidance interval appear only when set (the manifests of unguided runs stay as they were)."""
    return {f"--{FLAG_NAMES.get(k, k)}": v for k, v in asdict(opts).items() if v is not None or k not in GUIDE_FIELDS}


def sample_dirname(opts: SamplerOptions, class_idx: int | None = None, increment_seeds: int = 0) -> str:
    """``<sorted key-value pairs>[_<increment_seeds>]``, the seed's name for a set of sampler arguments."""
    items: dict[str, object] = {k: getattr(opts, k) for k in
                                ("num_steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise",
                                 "solver", "discretization", "schedule", "scaling")}
    items["class"] = class_idx
    if opts.sampler not in (None, "edm", "ablation"):
        items["sampler"] = opts.sampler
    if opts.guidance != 1.0:
        items["guidance"] = opts.guidance
    if opts.gnet is not None:
        from vcdm.generate.guide import guide_digest

        items["gnet"] = guide_digest(opts.gnet)[:16]
    if opts.guidance_interval is not None:
        items["guidance_interval"] = ",".join(map(str, opts.guidance_interval))
    name = "_".join(f"{k}-{v}" for k, v in sorted(items.items()))
    return name + (f"_{increment_seeds}" if increment_seeds > 0 else "")


def obs_dirname(load_obs_from: str | os.PathLike) -> str:
    """The seed's sub-directory for conditioned samples: the path's parts joined by '_' (anchor dropped,
    so an absolute path does not escape the results tree)."""
    path = Path(load_obs_from)
    parts = path.parts[1:] if path.anchor else path.parts
    return "_".join(parts)


def results_dir(network: str | os.PathLike, opts: SamplerOptions, seeds: Sequence[int], *,
                class_idx: int | None = None, load_obs_from: str | os.PathLike | None = None,
                increment_seeds: int = 0, root: str | os.PathLike = "results") -> Path:
    """Where the seed release writes samples of ``network`` when no --outdir is given."""
    network = Path(network)
    names = [network.parent.name or ".", network.stem, sample_dirname(opts, class_idx, increment_seeds)]
    if load_obs_from is not None:
        names.append(obs_dirname(load_obs_from))
    return Path(root).joinpath(*map(fit_name, names), f"samples-{seeds[0]}-{seeds[-1]}")


def seed_path(outdir: str | os.PathLike, seed: int, ext: str, subdirs: bool = False) -> Path:
    """``<outdir>/[<thousands>/]<seed:06d>.<ext>`` (EDM's --subdirs groups seeds by thousand)."""
    outdir = Path(outdir)
    if subdirs:
        outdir = outdir / f"{seed - seed % 1000:06d}"
    return outdir / f"{seed:06d}.{ext}"
