"""`vcdm import-edm SRC.pkl DEST.safetensors`: convert an EDM / VCDM-release network pickle, safely."""
from __future__ import annotations

from pathlib import Path

import click


def _summary(kwargs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


@click.command("import-edm", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace DEST if it exists.")
def command(src: Path, dest: Path, overwrite: bool) -> None:
    """Convert SRC, an EDM network pickle (e.g. edm-ffhq-64x64-uncond-vp.pkl) or a snapshot of the
    original VCDM release, into DEST, a vcdm checkpoint (.safetensors + JSON config).

    Nothing from SRC is executed: the pickle's embedded source code is ignored and only tensors,
    numbers, strings and the recorded constructor arguments are read; anything else is refused.
    """
    from vcdm.legacy import LegacyError, import_edm

    if dest.suffix != ".safetensors":
        raise click.BadParameter(f"'{dest}': expected a .safetensors file name", param_hint="DEST")
    if dest.exists() and not overwrite:
        raise click.BadParameter(f"'{dest}' exists; pass --overwrite to replace it", param_hint="DEST")
    try:
        record, config = import_edm(src, dest)
    except LegacyError as e:
        raise click.BadParameter(str(e), param_hint="SRC") from None
    except OSError as e:
        raise click.FileError(str(dest), hint=e.strerror or str(e)) from None
    click.echo(f"found: {record.precond_class} ({record.kind}) wrapping {record.net_class}, "
               f"{'VCDM release' if record.release == 'vcdm' else 'EDM'} pickle")
    click.echo(f"network: {config.network}({_summary(config.net_kwargs)})")
    click.echo(f"denoiser: {_summary(config.denoiser)}")
    click.echo(f"structure: {_summary(config.structure)}")
    click.echo(f"parameters: {record.num_parameters:,} ({len(record.state_dict)} tensors incl. buffers)")
    click.echo(f"wrote {dest}")
