"""`vcdm phema`: post-hoc EMA, EDM2's reconstruct_phema.py for vcdm runs (flags under EDM2's names too)."""
from __future__ import annotations

from pathlib import Path

import click

from vcdm.cli.errors import user_errors, writable


def std_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    """'0.05,0.12' → [0.05, 0.12]; EDM2's 'a,b,...,c' adds the steps of b - a from b up to c."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    try:
        raw = [None if p == "..." else float(p) for p in parts]
    except ValueError:
        raise click.BadParameter(f"expected numbers like 0.05,0.1 or 0.01,0.02,...,0.25, got '{value}'") from None
    out: list[float] = []
    for i, v in enumerate(raw):
        if v is not None:
            out.append(v)
            continue
        if i < 2 or i + 1 >= len(raw) or None in (raw[i - 2], raw[i - 1], raw[i + 1]) or raw[i - 1] <= raw[i - 2]:
            raise click.BadParameter(f"'...' needs two increasing numbers before it and one after, got '{value}'")
        step, last = raw[i - 1] - raw[i - 2], raw[i + 1]
        n = round((last - raw[i - 1]) / step)
        if n < 1 or abs(raw[i - 1] + n * step - last) > 1e-6:
            raise click.BadParameter(f"'{value}': {last} is not a whole number of steps of {step:g} after {raw[i - 1]}")
        out.extend(round(raw[i - 1] + k * step, 9) for k in range(1, n))
    return sorted(set(out))


@click.command("phema", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("snapshots", nargs=-1, type=click.Path(path_type=Path))
@click.option("--run", "--indir", "run_dir", metavar="DIR", type=click.Path(path_type=Path), default=None,
              help="A run directory: its network-snapshot-<kimg>-<std>.safetensors are the inputs (or EDM2's raw "
                   "snapshots, <prefix>-<kimg>-<std>.pkl).")
@click.option("--std", "--outstd", "stds", metavar="LIST", required=True, callback=std_list,
              help="EMA lengths (relative standard deviations) to reconstruct: 0.05,0.12 or 0.01,0.02,...,0.25.")
@click.option("--kimg", "--outkimg", metavar="KIMG", type=click.IntRange(min=0), default=None,
              help="Reconstruct the EMA at the snapshots of this kimg  [default: the newest]")
@click.option("--in-std", "--instd", "in_stds", metavar="LIST", callback=std_list, default=None,
              help="Use only the input profiles of these lengths  [default: all]")
@click.option("--outdir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where to write phema-<kimg>-<std>.safetensors.")
@click.option("--batch", "group", metavar="INT", type=click.IntRange(min=1), default=8, show_default=True,
              help="Lengths reconstructed per pass over the inputs (memory: this many networks, plus one tensor).")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist.")
def command(snapshots: tuple[Path, ...], run_dir: Path | None, stds: list[float], kimg: int | None,
            in_stds: list[float] | None, outdir: Path, group: int, overwrite: bool) -> None:
    """Reconstruct the network's EMA of any length after training (post-hoc EMA, EDM2) from the power-function
    EMA snapshots of a run trained with --ema-std, or from SNAPSHOTS given as files. EDM2's raw snapshots
    (.pkl) are inputs too: read through vcdm's restricted unpickler, no code from them runs. Each output is a
    vcdm checkpoint that `vcdm generate` and `vcdm sample` use as any other.

    \b
    # Training keeps two profiles and writes both with each snapshot:
    vcdm train ... --ema-std 0.05,0.1 --snap 10
    # The EMA of length 0.15, and a sweep, at the last snapshot:
    vcdm phema --run training-runs/00000-run --std 0.15 --outdir phema
    vcdm phema --run training-runs/00000-run --std 0.02,0.04,...,0.20 --outdir phema
    # At the snapshots of 2000 kimg:
    vcdm phema --run training-runs/00000-run --std 0.1 --kimg 2000 --outdir phema
    # From EDM2's published raw snapshots:
    vcdm phema --run raw-snapshots/edm2-img512-xs --std 0.135 --outdir phema
    """
    from vcdm.train import phema as phema_io

    if run_dir is None and not snapshots:
        raise click.UsageError("give the inputs: --run DIR (a run trained with --ema-std) or snapshot files")
    with user_errors(usage=True):
        bad = [s for s in stds if not 0 < s < phema_io.MAX_STD]
        if bad:
            raise ValueError(f"--std: {bad[0]} is not a length in (0, {phema_io.MAX_STD:.3f})")
        paths = (phema_io.run_snapshots(run_dir) if run_dir is not None else []) + list(snapshots)
        if not paths:
            raise ValueError(f"--run: no network-snapshot-<kimg>-<std>.safetensors (nor EDM2 raw snapshots) in "
                             f"{run_dir} (was it trained with --ema-std?)")
        inputs = phema_io.open_inputs(paths, in_stds)
        plan = phema_io.plan(inputs, stds, kimg)
        targets = [outdir / phema_io.output_name(plan.nimg, s) for s in stds]
        if len(set(targets)) != len(targets):
            raise ValueError(f"--std: {stds} are not distinct to three decimals (the output names)")
        existing = [p for p in targets if p.exists()]
        if existing and not overwrite:
            raise ValueError(f"--outdir: {existing[0]} exists; pass --overwrite to replace it")
    writable(outdir, "--outdir")
    click.echo(f"{len(plan.snapshots)} snapshots, kimg {plan.snapshots[0].nimg // 1000} to {plan.nimg // 1000}, "
               f"lengths {', '.join(sorted({f'{s.std:g}' for s in plan.snapshots}))}")
    with user_errors(path=outdir):
        for path in phema_io.write(plan, stds, outdir, group=group):
            click.echo(f"wrote {path}")

