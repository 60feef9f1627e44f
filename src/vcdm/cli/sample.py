"""`vcdm sample`: both stages in one command — the prior's embeddings, then images given them."""
from __future__ import annotations

from typing import Any

import click

from vcdm.cli.errors import user_errors
from vcdm.cli.generate import (class_from_flag, class_option, inference_options, parse_seeds, pop_inference,
                               pop_run_options, pop_sampler_options, preset_option, sampler_flags)
from vcdm.diffusion.settings import RELEASE_DEFAULTS


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--prior", required=True, metavar="PATH", help="Checkpoint of the prior (a model of embeddings)")
@click.option("--image-model", "image_model", required=True, metavar="PATH",
              help="Checkpoint of the image model conditioned on those embeddings")
@click.option("--seeds", default="0-63", show_default=True, metavar="LIST", callback=parse_seeds,
              help="Random seeds, one embedding and one image each (e.g. 1,2,5-10)")
@click.option("--outdir", metavar="DIR", help="Write DIR/embeddings/<seed>.pt and DIR/images/<seed>.png  "
              "[default: the results layout of two `vcdm generate` runs]")
@click.option("--batch", "max_batch_size", type=click.IntRange(min=1), default=64, show_default=True, metavar="INT",
              help="Maximum batch size")
@class_option("Class label for class-conditional models: its index, or its name where the training data recorded "
              "class names  [default: random per seed]")
@click.option("--subdirs", is_flag=True, help="Create a subdirectory for every 1000 seeds")
@click.option("--increment_seeds", type=click.IntRange(min=0), default=0, show_default=True, metavar="INT",
              help="Add to every seed's noise seed (both stages)")
@sampler_flags("prior-", RELEASE_DEFAULTS, stage="Prior: ")
@sampler_flags("image-", RELEASE_DEFAULTS, stage="Image model: ")
@preset_option(both_stages=True)
@click.option("--device", metavar="DEV", help="torch device  [default: cuda if available, else cpu]")
@inference_options
@click.option("--grid", metavar="PNG", help="Also tile the images of the first 256 seeds into this PNG")
@click.option("--overwrite", is_flag=True, help="Replace samples in results folders made with other settings  "
              "[default: refuse]")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars")
def command(prior: str, image_model: str, seeds: list[int], **kwargs: Any) -> None:
    """Sample embeddings with a prior, then images conditioned on them with an image model: the same
    files as running `vcdm generate` on the prior and then on the image model with --load_obs_from.
    Refuses models trained with different embedders or embedding sizes. Each stage has its own sampler
    options (--prior-steps, --image-S_churn, …; defaults: the original release's 40 steps, S_churn 50,
    S_noise 1.007) and its own guidance (--prior-gnet/--prior-guidance, --image-gnet/--image-guidance:
    a guiding network such as an earlier snapshot; --*-guidance-interval). Runs under torchrun like
    `vcdm generate`.

    \b
    Example:
    vcdm sample --prior runs/prior/network-snapshot-002000.safetensors \\
        --image-model runs/image/network-snapshot-010000.safetensors --seeds 0-999 --grid grid.png
    """
    from vcdm import distributed
    from vcdm.generate import sample_two_stage
    from vcdm.generate.options import checkpoint_defaults

    with user_errors():
        preset = kwargs.pop("preset")
        prior_opts = pop_sampler_options(kwargs, "prior-", preset, checkpoint_defaults(prior))
        image_opts = pop_sampler_options(kwargs, "image-", preset, checkpoint_defaults(image_model))
        run, inference = pop_run_options(kwargs), pop_inference(kwargs)
        kwargs["class_idx"] = class_from_flag(kwargs["class_idx"], prior, image_model)
        with distributed.session(kwargs["device"]):
            result = sample_two_stage(prior, image_model, seeds, prior_opts=prior_opts, image_opts=image_opts,
                                      run=run, inference=inference, **kwargs)
            if distributed.rank() == 0:
                for stage in (result.embeddings, result.images):
                    click.echo(f"{stage.outdir}: {stage.generated} generated, {stage.skipped} already there "
                               f"(network: {stage.settings.name})")
