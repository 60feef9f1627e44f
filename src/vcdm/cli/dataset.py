"""`vcdm dataset`: build EDM-format datasets (`convert`, the default) and describe them (`info`)."""
from __future__ import annotations

import click

from vcdm.cli.errors import writable
from vcdm.data.archive import DatasetError
from vcdm.paths import describe_os_error
from vcdm.workers import default_workers

_FLAGS = {"without_labels": "--no-labels", "max_images": "--max-images", "skip_bad": "--skip-bad"}


def _message(e: DatasetError) -> str:
    """The error with convert_dataset's settings named as this command's flags."""
    return e.render(lambda setting: _FLAGS.get(setting, f"--{setting}"))


class _ConvertByDefault(click.Group):
    """`vcdm dataset --source X --dest Y` means `vcdm dataset convert --source X --dest Y`,
    so the original release's `python dataset_tool.py --source=… --dest=…` keeps working."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["convert", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_ConvertByDefault, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def command() -> None:
    """Build an EDM-format dataset (zip or folder) from images, or describe one.

    Without a subcommand, the options are those of `convert` (see `convert --help`), e.g.

    \b
      vcdm dataset --source=downloads/afhqv2 --dest=datasets/afhqv2-64x64.zip --resolution=64x64
    """


def _resolution(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    from vcdm.data.dataset_tool import parse_resolution
    try:
        return parse_resolution(value)
    except DatasetError as e:
        raise click.BadParameter(_message(e).split(": ", 1)[-1]) from None


@command.command()
@click.option("--source", required=True, metavar="PATH",
              help="Folder of images (recursive; PNG/JPEG/WebP/…), a zip of images, an EDM-format zip or folder, "
                   "or the CIFAR-10 python tarball (cifar-10-python.tar.gz).")
@click.option("--dest", required=True, metavar="PATH",
              help="Output: a zip if it ends in .zip, else a folder. Written atomically.")
@click.option("--resolution", metavar="WxH", callback=_resolution,
              help="Resize every image to WxH with Lanczos (default: keep the size; all images must then match).")
@click.option("--transform", type=click.Choice(["center-crop", "center-crop-wide"]),
              help="center-crop: largest centred square, then resize. center-crop-wide: crop to the WxH aspect, "
                   "resize, pad to WxW with black; drops images narrower than W. Needs --resolution.")
@click.option("--max-images", type=click.IntRange(min=1), metavar="INT", help="Stop after writing this many images.")
@click.option("--no-labels", is_flag=True, help="Write no labels (dataset.json has \"labels\": null).")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable/corrupt images (and report how many) instead of failing.")
@click.option("--overwrite", is_flag=True, help="Replace --dest if it exists (only once the new dataset is complete).")
@click.option("--workers", type=click.IntRange(min=1), metavar="INT",
              help="Processes decoding and resizing images  [default: the CPUs available, at most 8]. "
                   "The output does not depend on it.")
def convert(source: str, dest: str, resolution: tuple[int, int] | None, transform: str | None, max_images: int | None,
            no_labels: bool, skip_bad: bool, overwrite: bool, workers: int | None) -> None:
    """Convert images into an EDM-format dataset zip or folder.

    The output holds 00000/img00000000.png, 00000/img00000001.png, … (1000 per folder) and
    dataset.json, as written by EDM's dataset_tool.py.

    \b
    Labels come from a dataset.json in the source when there is one ({"labels": [[name, int], ...]}
    or null), else from top-level folder names when there are several (e.g. ImageNet's class
    folders, numbered in sorted order; the output's dataset.json records the folder names as
    "class_names"), else there are none. Labels must be class indices 0..N-1 or equal-length vectors.

    \b
    Pixels follow EDM's dataset_tool.py (same file order, crops and Pillow Lanczos resampling),
    stored as uncompressed RGB PNG. Grayscale, palette and 16-bit images become RGB uint8; alpha
    is composited onto white; EXIF orientation is ignored, as in EDM.
    """
    from vcdm.data.dataset_tool import convert_dataset

    if transform is not None and resolution is None:
        raise click.UsageError(f"--transform={transform} needs --resolution=WxH")
    writable(dest, "--dest", is_dir=not dest.endswith(".zip"))  # before any work
    try:
        s = convert_dataset(source, dest, resolution=resolution, transform=transform, max_images=max_images,
                            use_labels=not no_labels, skip_bad=skip_bad, overwrite=overwrite,
                            workers=workers or default_workers())
    except DatasetError as e:
        raise click.ClickException(_message(e)) from None
    except OSError as e:
        raise click.ClickException(describe_os_error(e)) from None
    labels = f"{s.num_classes} classes" if s.num_classes else "no labels"
    click.echo(f"Wrote {s.count} images ({s.resolution[0]}x{s.resolution[1]}, {labels}) to {s.dest}")
    if s.skipped_bad:
        click.echo(f"Skipped {len(s.skipped_bad)} unreadable images, e.g. {s.skipped_bad[0]}", err=True)
    if s.skipped_small:
        click.echo(f"Skipped {s.skipped_small} images narrower than the --resolution width (center-crop-wide)", err=True)


@command.command()
@click.argument("path", type=click.Path(exists=True))
def info(path: str) -> None:
    """Print image count, resolution, channels and label count of a dataset zip or folder."""
    from vcdm.data.dataset import ImageDataset

    try:
        ds = ImageDataset(path, use_labels=True)
    except DatasetError as e:
        raise click.ClickException(_message(e)) from None
    rows = {"path": path, "images": len(ds), "resolution": f"{ds.resolution}x{ds.resolution}",
            "channels": ds.num_channels, "labels": ds.label_dim if ds.has_labels else "none"}
    if ds.class_names:
        shown = ", ".join(ds.class_names[:8]) + (", …" if len(ds.class_names) > 8 else "")
        rows["classes"] = shown
    for key, value in rows.items():
        click.echo(f"{key:<11}{value}")
