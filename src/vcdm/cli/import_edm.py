"""`vcdm import-edm SRC.pkl DEST.safetensors`: convert an EDM2, EDM or VCDM-release network pickle, safely."""
from __future__ import annotations

from pathlib import Path

import click


def _summary(kwargs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


def _found(record) -> str:
    from vcdm.legacy.edm2 import EDM2Network

    if not isinstance(record, EDM2Network):
        return (f"found: {record.precond_class} ({record.kind}) wrapping {record.net_class}, "
                f"{'VCDM release' if record.release == 'vcdm' else 'EDM'} pickle")
    when = f", {record.kimg} kimg, EMA std {record.std:.3f}" if record.kimg is not None else ""
    enc = record.encoder
    data = f"latents of {enc['vae_name']}" if record.is_latent else "pixels"
    return f"found: EDM2 Precond wrapping UNet{when}; {enc['class']} ({data})"


@click.command("import-edm", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace DEST if it exists.")
def command(src: Path, dest: Path, overwrite: bool) -> None:
    """Convert SRC, a network pickle of EDM2 (its post-hoc reconstructions, e.g. edm2-img64-s-1073741-0.075.pkl,
    and the raw snapshots of its training, network-snapshot-<kimg>-<std>.pkl), of EDM (e.g.
    edm-ffhq-64x64-uncond-vp.pkl) or of the original VCDM release, into DEST, a vcdm checkpoint
    (.safetensors + JSON config). An EDM2 raw snapshot keeps its EMA profile, so `vcdm phema` reads it.

    Nothing from SRC is executed: the pickle's embedded source code is ignored and only tensors,
    numbers, strings and the recorded constructor arguments are read; anything else is refused.
    """
    from vcdm.legacy import LegacyError
    from vcdm.legacy.edm2 import import_network_pickle

    if dest.suffix != ".safetensors":
        raise click.BadParameter(f"'{dest}': expected a .safetensors file name", param_hint="DEST")
    if dest.exists() and not overwrite:
        raise click.BadParameter(f"'{dest}' exists; pass --overwrite to replace it", param_hint="DEST")
    try:
        record, config = import_network_pickle(src, dest)
    except LegacyError as e:
        raise click.BadParameter(str(e), param_hint="SRC") from None
    except OSError as e:
        raise click.FileError(str(dest), hint=e.strerror or str(e)) from None
    click.echo(_found(record))
    click.echo(f"network: {config.network}({_summary(config.net_kwargs)})")
    click.echo(f"denoiser: {_summary(config.denoiser)}")
    click.echo(f"structure: {_summary(config.structure)}")
    click.echo(f"parameters: {record.num_parameters:,} ({len(record.state_dict)} tensors incl. buffers)")
    click.echo(f"wrote {dest}")
