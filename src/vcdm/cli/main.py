"""The `vcdm` console script. Subcommands live in their own modules and are imported on use, so
`vcdm --help` is instant and one command's heavy imports never slow another."""
from __future__ import annotations

import importlib

import click

COMMANDS: dict[str, tuple[str, str]] = {
    "dataset": ("vcdm.cli.dataset", "Build an EDM-format dataset (zip or folder) from images; `dataset info`."),
    "train": ("vcdm.cli.train", "Train a prior (embeddings) or an image model, EDM-style; torchrun-aware."),
    "tune": ("vcdm.cli.tune", "Tune a trained model of either stage into a 1-4 step sampler (ECT, ECD or KD)."),
    "generate": ("vcdm.cli.generate", "Sample one model for a list of seeds (the original release's generate.py)."),
    "sample": ("vcdm.cli.sample", "Two-stage sampling: prior → embeddings → image model → images."),
    "variations": ("vcdm.cli.variations", "Embed real images and sample variations conditioned on them."),
    "fid": ("vcdm.cli.fid", "FID/KID: reference statistics (`fid ref`) and scores (`fid calc`)."),
    "phema": ("vcdm.cli.phema", "Post-hoc EMA: reconstruct any EMA length from a run's --ema-std snapshots (EDM2)."),
    "import-edm": ("vcdm.cli.import_edm", "Convert an EDM/VCDM network pickle to a vcdm checkpoint, safely."),
    "demo": ("vcdm.cli.demo", "Offline end-to-end demo on bundled real images (CPU, minutes)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return importlib.import_module(COMMANDS[name][0]).command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="vcdm")
def cli() -> None:
    """vcdm: visual chain-of-thought diffusion models.

    Sample a semantic embedding of an image with an auxiliary diffusion model (the prior), then the
    image conditioned on it with an EDM U-Net. Start with `vcdm demo`.
    """


def run_click(command: click.Command, prog_name: str) -> None:
    """Entry point of the release-compatible root scripts (train.py, generate.py, …)."""
    command.main(prog_name=prog_name)
