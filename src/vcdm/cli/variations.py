"""`vcdm variations`: embed real images, sample images conditioned on each embedding, one grid per input."""
from __future__ import annotations

from typing import Any

import click

from vcdm.cli.errors import user_errors
from vcdm.cli.generate import (class_from_flag, class_option, inference_options, parse_seeds, pop_inference,
                               pop_sampler_options, sampler_flags)
from vcdm.diffusion.settings import RELEASE_DEFAULTS
from vcdm.fileio import IntRanges


def optional_seeds(ctx: click.Context, param: click.Parameter, value: str | None) -> IntRanges | None:
    return None if value is None else parse_seeds(ctx, param, value)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--image-model", "image_model", required=True, metavar="PATH",
              help="Checkpoint of an image model conditioned on embeddings")
@click.option("--images", required=True, multiple=True, metavar="PNG...",
              help="Input image(s); repeat the flag or list several after it")
@click.argument("more_images", nargs=-1, metavar="")
@click.option("--n", "n", type=click.IntRange(min=1), default=8, show_default=True, metavar="INT",
              help="Variations per input (seeds 0..n-1 unless --seeds is given)")
@click.option("--seeds", default=None, metavar="LIST", callback=optional_seeds,
              help="Seeds of the variations, one each (e.g. 0-7); its length must equal --n if both are given")
@click.option("--outdir", default="variations", show_default=True, metavar="DIR",
              help="Writes DIR/<input name>.png: the input (centre-cropped, resized), then its variations")
@class_option("Class label for class-conditional models: its index, or its name where the training data recorded "
              "class names  [default: random per seed]")
@click.option("--batch", "max_batch_size", type=click.IntRange(min=1), default=64, show_default=True, metavar="INT",
              help="Maximum batch size")
@sampler_flags("", RELEASE_DEFAULTS)
@click.option("--clip-weights", "--embedder-weights", "clip_weights", metavar="PATH",
              help="Local weights of the model's embedder (CLIP or DINOv2)  [default: $VCDM_CLIP_WEIGHTS or "
                   "$VCDM_DINOV2_VITB14_WEIGHTS, else the caches]")
@click.option("--device", metavar="DEV", help="torch device  [default: cuda if available, else cpu]")
@inference_options
def command(image_model: str, images: tuple[str, ...], more_images: tuple[str, ...], n: int, seeds: IntRanges | None,
            **kwargs: Any) -> None:
    """Image variations (unCLIP-style): embed each input with the image model's own embedder (as
    recorded in its checkpoint) and sample images conditioned on that embedding.

    \b
    Example:
    vcdm variations --image-model runs/image/network-snapshot-010000.safetensors \\
        --images cat.png dog.png --n 8 --clip-weights ViT-B-32.pt
    """
    import torch

    from vcdm.generate import Conditioning, variations
    from vcdm.generate.options import checkpoint_defaults

    ctx = click.get_current_context()
    if seeds is None:
        seeds = IntRanges([range(n)])
    elif ctx.get_parameter_source("n") != click.core.ParameterSource.DEFAULT and len(seeds) != n:
        raise click.BadParameter(f"{len(seeds)} seeds given but --n {n}", param_hint="'--seeds'")
    kwargs["device"] = kwargs["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    with user_errors():
        opts = pop_sampler_options(kwargs, recorded=checkpoint_defaults(image_model))
        cond = Conditioning(class_idx=class_from_flag(kwargs.pop("class_idx"), image_model),
                            clip_weights=kwargs.pop("clip_weights"))
        written = variations(image_model, [*images, *more_images], seeds, opts=opts, cond=cond,
                             inference=pop_inference(kwargs), **kwargs)
    for path in written:
        click.echo(path)
