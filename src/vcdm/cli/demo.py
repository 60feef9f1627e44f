"""`vcdm demo` (= `make demo`): the offline end-to-end demo on the UCI digits (see vcdm.demo)."""
from __future__ import annotations

import click


@click.command(name="demo", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--outdir", metavar="DIR", default="demo-runs", show_default=True,
              help="Where to make the run folder (a new numbered folder per run).")
@click.option("--minutes", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Wall-clock budget; training gets what the other stages leave.")
@click.option("--device", metavar="DEV", default=None, help="cpu | cuda | cuda:N  [default: cuda if available]")
@click.option("--seed", metavar="INT", type=click.IntRange(min=0), default=0, show_default=True,
              help="Training seed (the classifier that judges the samples always uses seed 0).")
@click.option("--smoke", is_flag=True, help="Tiny networks and a few steps: checks the pipeline in seconds.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars.")
def command(outdir: str, minutes: float, device: str | None, seed: int, smoke: bool, progress: bool) -> None:
    """Train a two-stage diffusion model on real handwritten digits and sample from it, offline.

    Builds the UCI digits bundled with scikit-learn as an EDM dataset, trains a prior over pixel-PCA
    embeddings and an image model conditioned on them (the real training loop), samples with the
    two-stage pipeline, and writes samples.png, real-vs-generated.png, loss-curves.png,
    metrics.json and summary.txt into one run folder. About 10 minutes on 2 CPU cores.
    """
    from vcdm.demo import run_demo

    try:
        run_demo(outdir, minutes=minutes, device=device, seed=seed, smoke=smoke, progress=progress)
    except KeyboardInterrupt:
        raise click.Abort() from None
    except ValueError as e:
        raise click.UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
