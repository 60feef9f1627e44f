"""`vcdm train` / `train.py`: the original release's training command, flag for flag.

Every flag is accepted with underscores or hyphens (`--data_class`, `--data-class`) and as
`--flag value` or `--flag=value`. Boolean flags take an optional value, as the release's do
(`--fp16`, `--fp16=1`, `--fp16 True`).
"""
from __future__ import annotations

import math
from pathlib import Path

import click
from click.core import ParameterSource

from vcdm.checkpoints import CheckpointError
from vcdm.cli.errors import writable
from vcdm.fileio import parse_int_list
from vcdm.paths import describe_os_error
from vcdm.safeload import load_json
from vcdm.train import TrainingError, train
from vcdm.train.lr_schedules import LR_SCHEDULES
from vcdm.train.options import ARCHS, EMBEDDERS, IDENTITY, OPTIONS_BYTES, PRECONDS, TrainOptions
from vcdm.train.recipe import RECIPES
from vcdm.workers import default_workers

D = TrainOptions()


def int_list(ctx, param, value):
    """'1,0' → [1, 0] (also EDM's ranges, '0-3'); the error names the flag."""
    if value is None:
        return None
    try:
        return parse_int_list(value, param.opts[0])
    except ValueError as e:
        raise click.BadParameter(str(e).split(": ", 1)[-1]) from None


def float_list(ctx, param, value):
    """'1,2.5' → [1.0, 2.5], finite numbers only."""
    if value is None:
        return None
    try:
        values = [float(v) for v in str(value).split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got '{value}'") from None
    if not all(math.isfinite(v) for v in values):
        raise click.BadParameter(f"expected finite numbers, got '{value}'")
    return values


class Finite(click.FloatRange):
    """A FloatRange that also rejects nan and inf (which compare false with every bound)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


def opt(name: str, *extra: str, **kwargs):
    """A click option under `name` and its underscore/hyphen twin."""
    twin = "--" + (name[2:].replace("_", "-") if "_" in name else name[2:].replace("-", "_"))
    names = [name] + ([twin] if twin != name else []) + list(extra)
    dest = name[2:].replace("-", "_")
    if kwargs.get("type") is bool:
        kwargs.update(is_flag=False, flag_value=True)
    if "default" in kwargs and kwargs["default"] is not None:
        kwargs.setdefault("show_default", True)
    return click.option(*names, dest, **kwargs)


OPTIONS = [
    # Data and structure.
    opt("--path", "--data", metavar="ZIP|DIR", type=str, default=None,
        help="Dataset (EDM-format zip or folder). Required, unless --resume names a run."),
    opt("--data_class", type=click.Choice(["ImageFolderDataset", "CLIPDataset", "LabelledCLIPDataset"]),
        default=None, help="Tensors per sample: image,label | image,embedding | image,embedding,label."),
    opt("--exist", metavar="LIST", type=str, default=None, callback=int_list,
        help="0/1 per tensor: which tensors the model uses  [default: all]"),
    opt("--observed", metavar="LIST", type=str, default=None, callback=int_list,
        help="0/1 per tensor: which are conditioning (the rest are generated)."),
    opt("--xflip", type=bool, default=D.xflip, help="Double the dataset with mirrored images."),
    opt("--cache", type=bool, default=D.cache, help="Keep decoded images in memory."),
    # Embedder.
    opt("--embedder", type=click.Choice(EMBEDDERS), default=None,
        help="Embedding of each (augmented) image: clip-vit-b32 (the paper's), dinov2-vitb14 (DINOv2 ViT-B/14's "
             "class token, 768-d) or pixel-pca (offline, fitted on the data)  [default: clip-vit-b32]"),
    opt("--clip-weights", "--embedder-weights", metavar="FILE", type=str, default=None,
        help="The pretrained embedder's weights: CLIP ViT-B/32 (open_clip state dict or OpenAI's ViT-B-32.pt) or "
             "DINOv2 ViT-B/14 (dinov2_vitb14_pretrain.pth)  [default: $VCDM_CLIP_WEIGHTS or "
             "$VCDM_DINOV2_VITB14_WEIGHTS, else the caches]"),
    opt("--pca-dim", metavar="INT", type=click.IntRange(min=1), default=D.pca_dim, help="pixel-pca: embedding size."),
    opt("--n_comp", metavar="LIST", type=str, default="0", callback=int_list, help="PCA of embeddings to this many components (0: off)."),
    opt("--n_clusters", metavar="LIST", type=str, default="0", callback=int_list,
        help="k-means of embeddings into one-hot cluster vectors (0: off)."),
    opt("--train_embedder", type=bool, default=D.train_embedder, help="Train the embedder with the network."),
    opt("--embed-cache", type=bool, default=D.embed_cache,
        help="Without augmentation, embed each image once (cached beside the dataset) instead of every batch."),
    opt("--embedder_path", type=str, default=None, hidden=True, expose_value=False,
        help="Ignored (kept for compatibility, as in the original release)."),
    # Model.
    opt("--arch", type=click.Choice(ARCHS), default=None,
        help="Network: DDPM++/NCSN++/ADM U-Net for images; for embeddings dalle2 (the original release's prior: "
             "multi-query cosine-similarity attention, x as a raw token, no dropout) or prior (vcdm's: multi-head "
             "attention, x through a projection, --dropout applies; what dalle2 built before, so older runs "
             "resume as prior); concatunet (the release's "
             "default: one U-Net over image and vector tensors, e.g. joint --exist 1,1 --observed 0,0); film-ddpmpp "
             "(DDPM++ with FiLM conditioning); control-adm (ControlNet-style ADM: a class-conditional ADM frozen, a "
             "trainable copy takes the other observed tensors); edm2-img64-xs|s|m|l|xl, edm2-img512-xxs|xs|s|m|l|xl|xxl "
             "(EDM2's magnitude-preserving U-Net with the width and dropout of EDM2's --preset of that name, for "
             "pixels or latents; no augmentation input: --augment 0)  [default: by latent]"),
    opt("--recipe", type=click.Choice(list(RECIPES)), default=D.recipe,
        help="Training recipe: the defaults of --precond, --P_mean/--P_std, --lr, --adam-betas, --lr-schedule, "
             "--lr-ref and --ema-std, and how non-finite gradients are replaced. edm: the original release's (EDM's; "
             "+-inf gradients become +-1e5). edm2: EDM2's (--precond edm2, betas 0.9,0.99, --lr-schedule edm2, "
             "--ema-std 0.05,0.1, non-finite gradients become 0; with an EDM2 network preset also its --lr, "
             "--lr-ref and --P_mean/--P_std). Works with any --arch."),
    opt("--precond", type=click.Choice(PRECONDS), default=None,
        help="Preconditioning and loss: EDM's edm, vp, ve; edm2 is EDM's preconditioning with EDM2's learned "
             "uncertainty (a log-variance head on the network) and EDM2's loss  [default: the recipe's]"),
    opt("--P_mean", metavar="FLOAT", type=float, default=None,
        help="edm/edm2 losses: mean of ln(sigma)  [default: -1.2 (EDM), or the EDM2 preset's with --recipe edm2]"),
    opt("--P_std", metavar="FLOAT", type=Finite(min=0, min_open=True), default=None,
        help="edm/edm2 losses: standard deviation of ln(sigma)  [default: 1.2 (EDM), or the EDM2 preset's]"),
    opt("--pred_x0", metavar="LIST", type=str, default="0", callback=int_list,
        help="0/1 per tensor: the network predicts x0 directly for these."),
    opt("--noise_mult", metavar="LIST", type=str, default="1", callback=float_list, help="Noise multiplier per tensor."),
    opt("--equally_weight_tensors", type=bool, default=D.equally_weight_tensors,
        help="Weight each generated tensor's mean loss equally."),
    opt("--cond-drop", metavar="P", type=click.FloatRange(0, 1), default=D.cond_drop,
        help="Replace each sample's conditioning by zeros with probability P, so --guidance can be used when "
             "sampling (vcdm's; the release has none)."),
    opt("--cbase", metavar="INT", type=click.IntRange(min=1), default=None, help="U-Net channel multiplier  [default: varies]"),
    opt("--cres", metavar="LIST", type=str, default=None, callback=int_list, help="U-Net channels per resolution  [default: varies]"),
    opt("--prior-dim", metavar="INT", type=click.IntRange(min=1), default=None, help="dalle2/prior width  [default: 512]"),
    opt("--prior-depth", metavar="INT", type=click.IntRange(min=1), default=None, help="dalle2/prior blocks  [default: 6]"),
    opt("--dropout", metavar="FLOAT", type=Finite(0, 1), default=None,
        help="Dropout probability (dalle2 ignores it)  [default: 0.13 for U-Nets, 0 for prior]"),
    opt("--augment", metavar="FLOAT", type=Finite(0, 1), default=None,
        help="Augment probability  [default: 0.12 (EDM's); 0 for EDM2's networks, which have no augmentation input]"),
    opt("--pretrained_weights", metavar="PKL|SAFETENSORS", type=str, default=None,
        help="Initialise from these weights (EDM .pkl or vcdm checkpoint); new conditioning starts at zero."),
    opt("--freeze_pretrained", type=bool, default=D.freeze_pretrained,
        help="Train only the parameters --pretrained_weights lacks."),
    opt("--transfer", metavar="PKL|SAFETENSORS", type=str, default=None,
        help="Transfer learning: copy the tensors that match, no EMA ramp-up."),
    # Optimisation.
    opt("--duration", metavar="MIMG", type=Finite(min=0, min_open=True), default=D.duration,
        help="Training duration."),
    opt("--batch", metavar="INT", type=click.IntRange(min=1), default=D.batch, help="Total batch size."),
    opt("--batch-gpu", metavar="INT", type=click.IntRange(min=1), default=None, help="Limit batch size per process."),
    opt("--lr", metavar="FLOAT", type=Finite(min=0, min_open=True), default=None,
        help="Learning rate (with --lr-schedule edm2, EDM2's reference rate)  [default: 0.001, or the EDM2 "
             "preset's with --recipe edm2]"),
    opt("--lr-schedule", type=click.Choice(list(LR_SCHEDULES)), default=None,
        help="edm: linear ramp-up over --lr-rampup, then constant. edm2: the same ramp-up, and from --lr-ref on "
             "--lr / sqrt(kimg / lr-ref)  [default: the recipe's]"),
    opt("--lr-rampup", metavar="KIMG", type=Finite(min=0), default=D.lr_rampup,
        help="Learning-rate ramp-up (0: none)."),
    opt("--lr-ref", metavar="KIMG", type=Finite(min=0), default=None,
        help="--lr-schedule edm2: where the decay starts (0: no decay)  [default: the EDM2 preset's reference "
             "in batches (35000 for other networks) x --batch]"),
    opt("--adam-betas", metavar="B1,B2", type=str, default=None, callback=float_list,
        help="Adam's beta1,beta2  [default: 0.9,0.999 (EDM), 0.9,0.99 with --recipe edm2]"),
    opt("--ema", metavar="MIMG", type=Finite(min=0), default=D.ema, help="EMA half-life."),
    opt("--ema-rampup", metavar="RATIO", type=Finite(min=0), default=D.ema_rampup,
        help="EMA half-life ramp-up ratio (0: none)."),
    opt("--ema-std", metavar="LIST", type=str, default=None, callback=float_list,
        help="Keep EDM2's power-function EMA profiles of these relative standard deviations instead of --ema "
             "(EDM2: 0.05,0.1), each written as network-snapshot-<kimg>-<std>.safetensors; `vcdm phema` "
             "reconstructs any other length from them."),
    opt("--ls", metavar="FLOAT", type=Finite(min=0, min_open=True), default=D.ls, help="Loss scaling."),
    opt("--fp16", type=bool, default=D.fp16, help="Mixed precision: float16 autocast + GradScaler (CUDA)."),
    opt("--bf16", type=bool, default=None,
        help="Mixed precision: bfloat16 autocast (CUDA or CPU), 0 for float32  [default: bf16 on CPUs with native "
             "bf16 (AVX512-BF16, AMX) for images of 32x32 and up, else float32, as measured; a resumed run keeps "
             "its own]"),
    opt("--bench", type=bool, default=D.bench, help="Enable cuDNN benchmarking."),
    opt("--seed", metavar="INT", type=int, default=None, help="Random seed  [default: random]"),
    opt("--max-nonfinite", metavar="N", type=click.IntRange(min=0), default=D.max_nonfinite,
        help="Stop (saving a state) after N consecutive non-finite losses (0: never)."),
    opt("--time-limit", metavar="SEC", type=Finite(min=0), default=D.time_limit,
        help="Stop after this many seconds of this process, saving a state to --resume from (0: no limit)."),
    # I/O.
    opt("--outdir", metavar="DIR", type=str, default=D.outdir, help="Where to make run directories."),
    opt("--desc", metavar="STR", type=str, default=None, help="Appended to the run directory name."),
    opt("--nosubdir", type=bool, default=D.nosubdir, help="Write into --outdir itself."),
    opt("--tick", metavar="KIMG", type=Finite(min=0, min_open=True), default=D.tick, help="How often to print progress."),
    opt("--snap", metavar="TICKS", type=click.IntRange(min=0), default=D.snap,
        help="How often to save snapshots (0: only at the end)."),
    opt("--dump", metavar="TICKS", type=click.IntRange(min=0), default=D.dump,
        help="How often to save training states (0: only at the end)."),
    opt("--sample", metavar="TICKS", type=click.IntRange(min=0), default=D.sample,
        help="How often to save a sample grid, for image models (0: never)."),
    opt("--resume", metavar="PT|DIR|auto", type=str, default=None,
        help="Resume from a training state or the newest valid one in a run directory, with that run's "
             "recorded options (flags given again override them, but not the model's; --time-limit is never "
             "carried over); or 'auto': the newest run in --outdir with the same dataset and model options, else "
             "a fresh start. The dataset is matched by content, so --path may name where it lies now. A "
             "finished run is left as it is (a larger --duration extends it). "
             "training-state-*-nonfinite.pt (saved after non-finite losses) is never picked."),
    opt("--device", type=str, default=None, help="cpu | cuda | cuda:N  [default: cuda if available]"),
    opt("--workers", metavar="INT", type=click.IntRange(min=0), default=default_workers(),
        help="DataLoader worker processes."),
    opt("--tensorboard", type=bool, default=D.tensorboard, help="Also log to TensorBoard (run dir/tensorboard)."),
    opt("--wandb_dir", metavar="DIR", type=str, default=D.wandb_dir,
        help="wandb's directory (wandb is used when WANDB_ENTITY and WANDB_PROJECT are set)."),
    opt("--resume_id", metavar="ID", type=str, default=None, help="wandb run id to continue."),
    opt("--dry-run", "-n", type=bool, default=False,
        help="Print the options and the state --resume would resume (or why a new run), then exit, writing nothing."),
]


def _command(**kwargs) -> None:
    """Train a prior (model of embeddings) or an image model, EDM-style. Run with plain `python`
    (one process) or under `torchrun --standalone --nproc_per_node=N` (DDP; NCCL on GPUs, gloo on CPU).

    \b
    # Model of CLIP embeddings (the paper's auxiliary model), 1 GPU:
    torchrun --standalone --nproc_per_node=1 train.py --path=datasets/afhqv2-64x64.zip \\
        --data_class CLIPDataset --batch 256 --seed 1 --exist 0,1 --observed 0,0 --arch=dalle2 \\
        --lr=1e-4 --augment=0.15 --pred_x0 1
    # Image model given CLIP embeddings, 4 GPUs:
    torchrun --standalone --nproc_per_node=4 train.py --path=datasets/afhqv2-64x64.zip \\
        --data_class CLIPDataset --batch 128 --seed 1 --exist 1,1 --observed 0,1 --arch=ddpmpp \\
        --cres=1,2,2,2 --lr=1e-4 --dropout=0.05 --augment=0.15
    """
    kwargs = with_recorded_options(kwargs)
    for name in ("path", "data_class", "observed"):
        if kwargs[name] is None:
            raise click.UsageError(f"Missing option '--{name}' (required unless --resume names a run)")
    if not kwargs.get("dry_run"):
        writable(kwargs.get("outdir"), "--outdir")  # before any work
    opts = TrainOptions(**kwargs)
    try:
        train(opts)
    except OSError as e:  # a write the run does not handle itself
        raise click.ClickException(describe_os_error(e)) from None
    except TrainingError as e:
        raise click.ClickException(str(e)) from None
    except CheckpointError as e:
        raise click.UsageError(str(e)) from None
    except ValueError as e:  # OptionError, StructureError, DatasetError, EmbedderError, PresetError, …
        raise click.UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def recorded_run_options(resume: str | None) -> tuple[Path, dict] | None:
    """The training_options.json of the run that `--resume` names (a run directory or a state in one)."""
    if not resume or resume == "auto":
        return None
    run_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
    path = run_dir / "training_options.json"
    if not path.is_file():
        return None
    try:
        return path, TrainOptions.from_dict(load_json(path, OPTIONS_BYTES)).to_dict()
    except (OSError, ValueError, TypeError) as e:
        raise click.UsageError(f"--resume: cannot read {path} ({e})") from None


def with_recorded_options(kwargs: dict) -> dict:
    """`--resume DIR` continues that run with its recorded options. Flags given again override them,
    except those that define the model, which must agree (one line names the first that differs). The
    dataset is checked by content when the run starts, so `--path` may name it where it lies now."""
    recorded = recorded_run_options(kwargs.get("resume"))
    if recorded is None:
        return kwargs
    path, values = recorded
    ctx = click.get_current_context()
    given = {k for k in kwargs if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    for name in sorted(given & set(IDENTITY) - {"path"}):
        if kwargs[name] != values.get(name):
            raise click.UsageError(f"--{name} {_show(kwargs[name])} differs from the resumed run's "
                                   f"{_show(values.get(name))} (recorded in {path}); drop the flag or start a new run")
    if "path" not in given and not Path(str(values.get("path"))).exists():
        raise click.UsageError(f"--resume: the run's dataset {values.get('path')} (recorded in {path}) is not there; "
                               f"pass --path with where it lies now")
    # How this command runs; and --bf16, which the loop resolves (a resumed run keeps the precision it recorded).
    keep = {"resume", "dry_run", "device", "workers", "batch_gpu", "time_limit", "bf16"}
    return {k: (v if k in given or k in keep or k not in values else values[k]) for k, v in kwargs.items()}


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


command = _command
for _o in reversed(OPTIONS):
    command = _o(command)
command = click.command(name="train", context_settings={"help_option_names": ["-h", "--help"],
                                                        "max_content_width": 110})(command)
