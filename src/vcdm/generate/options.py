"""Generation options (SamplerOptions, from vcdm.diffusion.settings; RunOptions, Conditioning) and the
original release's results layout.

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

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from vcdm.diffusion.settings import EXTRA_OPTIONS, SamplerOptions
from vcdm.fileio import IntRanges, as_int
from vcdm.paths import fit_name

if TYPE_CHECKING:
    import torch

    from vcdm.checkpoints import CheckpointConfig
    from vcdm.perf import InferenceSettings


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


def recorded_defaults(config: CheckpointConfig | None) -> dict[str, Any]:
    """The SamplerOptions a checkpoint's recorded sampler sets where the user chose none: a consistency-tuned
    model's sampler, steps and levels where it records them, without churn (vcdm tune); {} for other models, which
    keep the commands' defaults."""
    sampler = config.sampler if config is not None else None
    if not sampler:
        return {}
    levels = {"levels": tuple(sampler["levels"])} if "levels" in sampler else {}
    return {"sampler": sampler["name"], "num_steps": sampler["num_steps"], **levels, "S_churn": 0.0, "S_noise": 1.0}


def checkpoint_defaults(path: str | os.PathLike) -> dict[str, Any]:
    """``recorded_defaults`` of the checkpoint at ``path``; {} when it cannot be read (loading it says why)."""
    from vcdm.checkpoints import read_checkpoint_config

    try:
        return recorded_defaults(read_checkpoint_config(path))
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class RunOptions:
    """How a run is carried out and written — nothing here changes a sample.

    ``outdir``: None = the original release's results layout; ``max_batch_size``: --batch; ``subdirs``: a folder per
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
    return perf.resolve_settings(device, denoiser, bf16=choice.bf16, channels_last=choice.channels_last,
                        compile=choice.compile)


FLAG_NAMES = {"num_steps": "steps", "discretization": "disc"}  # field → command-line flag, where they differ


OPTIONAL_FIELDS = ("gnet", "guidance_interval", *EXTRA_OPTIONS, "levels")  # recorded only when set


def flag_values(opts: SamplerOptions) -> dict[str, object]:
    """``{"--steps": 18, "--sigma_min": None, …}``: the options under their command-line names. The guide,
    the guidance interval and the API-only options appear only when set (the manifests of runs without
    them stay as they were)."""
    return {f"--{FLAG_NAMES.get(k, k)}": v for k, v in asdict(opts).items() if v is not None or k not in OPTIONAL_FIELDS}


def sample_dirname(opts: SamplerOptions, class_idx: int | None = None, increment_seeds: int = 0) -> str:
    """``<sorted key-value pairs>[_<increment_seeds>]``, the original release's name for a set of sampler arguments."""
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
    for key in ("guidance_interval", "levels"):
        if getattr(opts, key) is not None:
            items[key] = ",".join(map(str, getattr(opts, key)))
    items.update({k: getattr(opts, k) for k in EXTRA_OPTIONS if getattr(opts, k) is not None})
    name = "_".join(f"{k}-{v}" for k, v in sorted(items.items()))
    return name + (f"_{increment_seeds}" if increment_seeds > 0 else "")


def obs_dirname(load_obs_from: str | os.PathLike) -> str:
    """The original release's sub-directory for conditioned samples: the path's parts joined by '_' (anchor dropped,
    so an absolute path does not escape the results tree)."""
    path = Path(load_obs_from)
    parts = path.parts[1:] if path.anchor else path.parts
    return "_".join(parts)


def results_dir(network: str | os.PathLike, opts: SamplerOptions, seeds: Sequence[int], *,
                class_idx: int | None = None, load_obs_from: str | os.PathLike | None = None,
                increment_seeds: int = 0, root: str | os.PathLike = "results") -> Path:
    """Where the original release writes samples of ``network`` when no --outdir is given."""
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
