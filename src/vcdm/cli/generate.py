"""`vcdm generate` (and root generate.py): the original release's sampling command, flag for flag."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import click
from click.core import ParameterSource

from vcdm.cli.errors import user_errors
from vcdm.diffusion.settings import CHOICES, DEFAULT_STEPS, PRESETS, SAMPLERS, SamplerOptionError, SamplerOptions
from vcdm.fileio import IntRanges

class SigmaInterval(click.ParamType):
    """``LO,HI`` → (lo, hi), two noise levels (``inf`` allowed for HI); SamplerOptions checks their order."""
    name = "LO,HI"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, float]:
        if isinstance(value, tuple):
            return value
        try:
            lo, hi = (float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"expected two noise levels SIGMA_LO,SIGMA_HI (e.g. 0.28,2.9), got '{value}'", param, ctx)
        return lo, hi


class NoiseLevels(click.ParamType):
    """``S1,S2,...`` → (s1, s2, ...), noise levels; SamplerOptions checks their number and order."""
    name = "SIGMA,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"expected noise levels SIGMA,... separated by commas (e.g. 80,0.15), got '{value}'", param, ctx)


MAX_NAMES_SHOWN = 20  # class names listed in an error (ImageNet has 1000)


def choices(names: tuple[str, ...]) -> str:
    return f"[{'|'.join(names)}]"


# (flag, SamplerOptions field, click type, help). The original release's flag names; --disc maps to
# `discretization`. The types only parse: SamplerOptions checks the values (vcdm.diffusion.settings).
SAMPLER_FLAGS: list[tuple[str, str, Any, str]] = [
    ("steps", "num_steps", int, "Number of sampling steps"),
    ("sigma_min", "sigma_min", float, "Lowest noise level  [default: varies]"),
    ("sigma_max", "sigma_max", float, "Highest noise level  [default: varies]"),
    ("rho", "rho", float, "Time step exponent"),
    ("S_churn", "S_churn", float, "Stochasticity strength"),
    ("S_min", "S_min", float, "Stoch. min noise level"),
    ("S_max", "S_max", float, "Stoch. max noise level"),
    ("S_noise", "S_noise", float, "Stoch. noise inflation"),
    ("solver", "solver", str, "Ablate ODE solver"),
    ("disc", "discretization", str, "Ablate time step discretization {t_i}"),
    ("schedule", "schedule", str, "Ablate noise schedule sigma(t)"),
    ("scaling", "scaling", str, "Ablate signal scaling s(t)"),
    ("sampler", "sampler", str,
     "edm: Heun + churn (the ablation sampler if --solver/--disc/--schedule/--scaling is given); ablation: EDM's "
     "generalized sampler; dpm2m: DPM-Solver++(2M); unipc: UniPC (both deterministic, one evaluation per step); "
     "euler_a: Euler ancestral; dpm2m_sde / dpm3m_sde: DPM-Solver++(2M)/(3M) SDE; consistency: multistep "
     "consistency sampling, 1-4 steps (default 2), for models tuned by `vcdm tune`  [default: the sampler the "
     "checkpoint records (consistency, for tuned models), else edm]"),
    ("guidance", "guidance", float,
     "Guidance scale w: D = D_g + w (D - D_g), where the guide D_g is the guiding network (gnet) or, without "
     "one, the model given the "
     "null condition (classifier-free guidance: needs a model trained with --cond-drop); 1 = none"),
    ("gnet", "gnet", click.Path(dir_okay=False),
     "Guiding network: a smaller or less-trained checkpoint of the same model (autoguidance) or "
     "an unconditional one; it must model the same tensors, noise, embedder and data"),
    ("guidance-interval", "guidance_interval", SigmaInterval(),
     "Guide only the evaluations at noise levels SIGMA_LO < sigma <= SIGMA_HI; the others are unguided  "
     "[default: all]"),
    ("levels", "levels", NoiseLevels(),
     "The consistency sampler's noise levels, falling, one evaluation at each (e.g. 80,0.15: the sample of one step "
     "re-noised to 0.15 and denoised again); they set the steps  [default: the levels the checkpoint records, else "
     "Karras's]"),
]
FLAGS = {key: flag for flag, key, _, _ in SAMPLER_FLAGS}  # SamplerOptions field → flag
METAVARS = {"num_steps": "INT", "gnet": "PATH", "guidance_interval": "LO,HI", "levels": "SIGMA,...",
            "sampler": choices(SAMPLERS),
            **{key: choices(names) for key, names in CHOICES.items()}}
EDM_DEFAULTS: dict[str, Any] = {"num_steps": DEFAULT_STEPS, **{
    f.name: f.default for f in dataclasses.fields(SamplerOptions) if f.name in FLAGS and f.default is not None}}


def sampler_flags(prefix: str = "", defaults: dict[str, Any] | None = None, stage: str = "") -> Callable:
    """Click options for one stage's sampler: ``--steps`` … or ``--<prefix>steps`` …; ``defaults``: the
    command's own (RELEASE_DEFAULTS), over EDM's."""
    defaults = {**EDM_DEFAULTS, **(defaults or {})}

    def decorate(f: Callable) -> Callable:
        for flag, key, type_, help_ in reversed(SAMPLER_FLAGS):
            dest = prefix.replace("-", "_") + key
            f = click.option(f"--{prefix}{flag}", dest, type=type_, default=defaults.get(key),
                             metavar=METAVARS.get(key, "FLOAT"), show_default=key in defaults,
                             help=f"{stage}{help_}")(f)
        return f
    return decorate


def preset_option(both_stages: bool = False) -> Callable:
    """--preset; ``both_stages``: `vcdm sample`'s, which sets the sampler of the prior and the image model."""
    scope, per = (" for both stages", " per stage") if both_stages else ("", "")
    return click.option("--preset", metavar=choices(tuple(PRESETS)), help=(
        f"Named sampler settings{scope}; flags given explicitly still win. fast: UniPC, 12 steps = 12 network "
        f"evaluations{per} instead of the original release's 79 (40 Heun steps with churn), at a Fréchet distance "
        "within the release setting's seed-to-seed noise or lower on the digits models measured (README, "
        "benchmarks/solvers.py)"))


def pop_sampler_options(kwargs: dict[str, Any], prefix: str = "", preset: str | None = None,
                        recorded: dict[str, Any] | None = None) -> SamplerOptions:
    """Remove one stage's sampler flags from click's kwargs → SamplerOptions: the flags given, over the
    command's defaults, resolved by ``SamplerOptions.resolve`` (``preset``; ``recorded``: the checkpoint's
    own sampler, vcdm.generate.options.recorded_defaults). Errors name this stage's flags (--image-steps)."""
    dest, ctx = prefix.replace("-", "_"), click.get_current_context()
    given, defaults = {}, {}
    for _, key, _, _ in SAMPLER_FLAGS:
        value = kwargs.pop(dest + key)
        if ctx.get_parameter_source(dest + key) != ParameterSource.DEFAULT:
            given[key] = value
        elif value is not None:
            defaults[key] = value
    try:
        return SamplerOptions.resolve(given, defaults, preset, recorded)
    except SamplerOptionError as e:
        raise click.UsageError(e.named(lambda key: f"--{prefix}{FLAGS[key]}" if key in FLAGS else f"--{key}")) from None


def class_option(help_: str) -> Callable:
    """--class INT|NAME (``class_from_flag`` turns it into an index)."""
    return click.option("--class", "class_idx", metavar="INT|NAME", help=help_)


def class_from_flag(value: str | None, *checkpoints: str) -> int | None:
    """--class as an index, or as a class name that the first of ``checkpoints`` recording names has (its
    training data's dataset.json ``class_names``); one-line error listing the names otherwise. The index's
    range is checked against the model (vcdm.generate.core.check_class)."""
    if value is None:
        return None
    if value.strip().isdigit():
        return int(value)
    from vcdm.checkpoints import read_checkpoint_config  # torch: imported by the command, not by its --help

    names: list[str] = []
    for path in checkpoints:
        try:
            names = names or list(read_checkpoint_config(path).data.get("class_names") or [])
        except (OSError, ValueError):
            pass  # loading the checkpoint says why
    if value in names:
        return names.index(value)
    if not names:
        raise click.UsageError(f"--class: expected a class index (the model records no class names), got '{value}'")
    shown = ", ".join(names[:MAX_NAMES_SHOWN]) + (f", … ({len(names)} in all)" if len(names) > MAX_NAMES_SHOWN else "")
    raise click.UsageError(f"--class: expected a class index or one of the model's class names ({shown}), got "
                           f"'{value}'")


def inference_options(f: Callable) -> Callable:
    """--bf16/--fp32, --channels-last/--no-channels-last, --compile/--no-compile (unset: vcdm.perf's
    choice for the device and network)."""
    flags = [
        ("--bf16/--fp32", "bf16", "Evaluate the network under bfloat16 autocast, or in float32; the sampler state "
         "is float64 either way  [default: bf16 on CUDA, and on CPUs with native bfloat16 (AVX512-BF16/AMX) for "
         "U-Nets of 32x32 and larger]"),
        ("--channels-last/--no-channels-last", "channels_last", "NHWC memory format for U-Net convolutions  "
         "[default: on CUDA; on CPU from 64x64 (from 32x32 without native bfloat16)]"),
        ("--compile/--no-compile", "compile", "torch.compile the network: faster evaluations after minutes of "
         "compiling per process and batch size, so it pays off only for long runs  [default: off]"),
    ]
    for decl, dest, help_ in reversed(flags):
        f = click.option(decl, dest, default=None, help=help_)(f)
    return f


def pop_inference(kwargs: dict[str, Any]):
    """Remove the --bf16 / --channels-last / --compile choices from click's kwargs → InferenceChoices."""
    from vcdm.generate import InferenceChoices

    return InferenceChoices(**{k: kwargs.pop(k) for k in ("bf16", "channels_last", "compile")})


def pop_run_options(kwargs: dict[str, Any]):
    """Remove --outdir, --batch, --subdirs, --grid, --overwrite, --progress from click's kwargs → RunOptions."""
    from vcdm.generate import RunOptions

    return RunOptions(**{k: kwargs.pop(k) for k in ("outdir", "max_batch_size", "subdirs", "grid", "overwrite",
                                                     "progress")})


def parse_seeds(ctx: click.Context, param: click.Parameter, value: str) -> IntRanges:
    """--seeds as ranges (never a list of a billion ints); limits and bad syntax are bad parameters."""
    from vcdm.generate.options import seed_list

    try:
        return seed_list(value, f"--{param.name}")
    except ValueError as e:
        raise click.BadParameter(str(e).split(": ", 1)[-1]) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--network", "network", required=True, metavar="PATH",
              help="Checkpoint to sample (.safetensors; convert EDM/VCDM .pkl files with `vcdm import-edm`)")
@click.option("--outdir", metavar="DIR", help="Where to write the samples  [default: results/<run-id>/<checkpoint>/"
              "<sampler args>/[<load_obs_from>/]samples-<first>-<last>]")
@click.option("--data_path", metavar="PATH", help="Dataset to draw conditioning from, instead of the training data's "
              "recorded path (conditional models without --load_obs_from)")
@click.option("--load_obs_from", "--load-obs-from", "load_obs_from", metavar="DIR", help="Condition on previously sampled tensors: DIR/<seed:06d>.pt "
              "(e.g. a prior's embeddings)")
@click.option("--seeds", default="0-63", show_default=True, metavar="LIST", callback=parse_seeds,
              help="Random seeds, one sample each (e.g. 1,2,5-10)")
@click.option("--subdirs", is_flag=True, help="Create a subdirectory for every 1000 seeds")
@class_option("Class label: its index, or its name where the training data recorded class names  "
              "[default: random per seed]")
@click.option("--batch", "max_batch_size", type=click.IntRange(min=1), default=64, show_default=True, metavar="INT",
              help="Maximum batch size")
@click.option("--increment_seeds", type=click.IntRange(min=0), default=0, show_default=True, metavar="INT",
              help="Add to every seed's noise seed: other samples for the same observations")
@sampler_flags()
@preset_option()
@click.option("--device", metavar="DEV", help="torch device  [default: cuda (one GPU per torchrun rank) if available, "
              "else cpu]")
@inference_options
@click.option("--grid", metavar="PNG", help="Also tile the images of the first 256 seeds into this PNG")
@click.option("--clip-weights", "--embedder-weights", "clip_weights", metavar="PATH",
              help="Local weights of the model's embedder (CLIP or DINOv2), for conditioning on embeddings of dataset "
                   "images  [default: $VCDM_CLIP_WEIGHTS or $VCDM_DINOV2_VITB14_WEIGHTS, else the caches]")
@click.option("--overwrite", is_flag=True, help="Replace the samples of a results folder made with other settings "
              "(its vcdm-manifest.json records them)  [default: refuse]")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar")
def command(network: str, seeds: IntRanges, **kwargs: Any) -> None:
    """Generate one sample per seed with the techniques of "Elucidating the Design Space of Diffusion-Based
    Generative Models", skipping seeds already generated. Image models write <seed:06d>.png; models of
    embeddings write <seed:06d>.pt, which an image model reads back with --load_obs_from. The folder's
    vcdm-manifest.json records the settings: a rerun with others stops (--overwrite replaces the samples),
    one with the same settings resumes, and several processes may share the folder (they split the work).

    \b
    Examples:
    # Embeddings from a prior, then images given them (the original release's recipe)
    torchrun --standalone --nproc_per_node=1 generate.py --seeds=0-19999 --batch=64 \\
        --network=training-runs/<PRIOR-ID>/network-snapshot-<KIMG>.safetensors --steps 40 --S_churn 50 --S_noise 1.007
    torchrun --standalone --nproc_per_node=1 generate.py --seeds=0-19999 --batch=64 \\
        --network=training-runs/<IMAGE-ID>/network-snapshot-<KIMG>.safetensors --steps 40 --S_churn 50 \\
        --S_noise 1.007 --load_obs_from results/<PRIOR-ID>/network-snapshot-<KIMG>/<sampler args>/samples-0-19999/
    \b
    # 64 images to out/ with the deterministic DPM-Solver++(2M), 20 steps, and a grid
    vcdm generate --network model.safetensors --outdir out --seeds 0-63 --sampler dpm2m --steps 20 --grid grid.png
    \b
    # Autoguidance: guided away from an earlier snapshot of the same run, at middle noise levels only
    vcdm generate --network network-snapshot-010000.safetensors --gnet network-snapshot-002000.safetensors \\
        --guidance 2 --guidance-interval 0.3,5
    """
    from vcdm import distributed
    from vcdm.generate import Conditioning, generate
    from vcdm.generate.options import checkpoint_defaults

    with user_errors():
        opts = pop_sampler_options(kwargs, preset=kwargs.pop("preset"), recorded=checkpoint_defaults(network))
        run, inference = pop_run_options(kwargs), pop_inference(kwargs)
        kwargs["class_idx"] = class_from_flag(kwargs["class_idx"], network)
        cond = Conditioning(**{k: kwargs.pop(k) for k in ("class_idx", "load_obs_from", "data_path", "clip_weights")})
        with distributed.session(kwargs["device"]):
            result = generate(network, seeds, opts=opts, cond=cond, run=run, inference=inference, **kwargs)
            if distributed.rank() == 0:
                click.echo(f"{result.outdir}: {result.generated} generated, {result.skipped} already there"
                           + (f"; grid {run.grid}" if run.grid else "") + f" (network: {result.settings.name})")
