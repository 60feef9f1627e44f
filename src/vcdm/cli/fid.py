"""`vcdm fid ref` and `vcdm fid calc`: EDM's fid.py, with KID and precision/recall, offline-friendly."""
from __future__ import annotations

import json
import os

import click

METRIC_HELP = "fid: Fréchet Inception Distance; kid: Kernel Inception Distance; pr: precision/recall (k=3)"


def _parse_metrics(text: str) -> list[str]:
    from vcdm.metrics import METRICS

    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise click.BadParameter(f"expected a comma-separated subset of {','.join(METRICS)}, got '{text}'", param_hint="--metrics")
    return list(dict.fromkeys(names))


def _needing(metrics: list[str]) -> str:
    """'kid needs features' / 'kid,pr need features': the metrics that compare feature sets (fid does not)."""
    names = [m for m in metrics if m != "fid"]
    return f"{','.join(names)} need{'s' if len(names) == 1 else ''} the features"


def default_workers() -> int:
    """Image-decoding workers: 3, or fewer on a machine (or CPU set) with fewer cores."""
    return min(3, len(os.sched_getaffinity(0)))


def _say(message: str) -> None:
    from vcdm.metrics.stats import rank_and_world

    if rank_and_world()[0] == 0:
        click.echo(message, err=True)


def _inception(weights: str | None, device, progress: bool):
    """Load Inception on every rank; rank 0 first, so only it ever downloads the weights."""
    import torch.distributed as dist

    from vcdm.metrics import InceptionFeatures
    from vcdm.metrics.stats import rank_and_world

    rank, world = rank_and_world()
    if rank != 0:
        dist.barrier()
    try:
        net = InceptionFeatures(weights, progress=progress and rank == 0)
    finally:
        if rank == 0 and world > 1:
            dist.barrier()
    _say(f"Inception-v3 weights: {net.weights_path}")
    return net.to(device)


def _open_images(path: str, num: int | None = None, seed: int = 0):
    from vcdm.data.dataset import ImageDataset

    dataset = ImageDataset(path, max_size=num, random_seed=seed)
    if num is not None and len(dataset) < num:
        raise click.ClickException(f"found {len(dataset)} images in {path}, but --num asks for {num}")
    return dataset


def _common(f):
    options = [
        click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Images per batch (per process)."),
        click.option("--inception-weights", "weights", metavar="PTH", default=None,
                     help="weights-inception-2015-12-05-6726825d.pth [default: $VCDM_INCEPTION_WEIGHTS, else torch.hub's "
                          "cache, downloaded there if absent]."),
        click.option("--device", default=None, help="torch device [default: this rank's GPU if any, else cpu]."),
        click.option("--workers", type=click.IntRange(min=0), default=default_workers, show_default="3 or the CPUs "
                     "available if fewer", help="Image-decoding worker processes."),
        click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _guard(run, output: str | None = None):
    """Lower layers raise ValueError subclasses with a full message, writes OSError: show them as one line
    (naming ``output`` when the error names no file)."""
    from vcdm.cli.errors import user_errors

    with user_errors(path=output):
        return run()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def command() -> None:
    """Fréchet Inception Distance (and KID, precision/recall), compatible with EDM's fid.py.

    Features are the 2048-d pool features of the TensorFlow Inception-v3 (torch-fidelity's port),
    so scores compare with EDM's and the literature's. Reference files are .npz with `mu` and `sigma`
    (float64), exactly like EDM's published fid-refs, which load as --ref unchanged. Runs on one
    process or under torchrun (each rank extracts a share of the images).

    \b
    Examples:
      vcdm fid ref --data datasets/ffhq-64x64.zip --dest fid-refs/ffhq-64x64.npz
      python fid.py calc --images=samples --ref=fid-refs/ffhq-64x64.npz --num 20000
      torchrun --standalone --nproc_per_node=2 fid.py calc --images=samples --ref=fid-refs/ffhq-64x64.npz --num-images 20000
      vcdm fid ref --data datasets/afhqv2-64x64.zip --dest refs/afhq.npz --metrics fid,kid
      vcdm fid calc --images samples --ref refs/afhq.npz --num 20000 --metrics fid,kid --json scores.json

    Without network access, download the Inception weights
    (https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth)
    and pass --inception-weights PATH, set $VCDM_INCEPTION_WEIGHTS, or put the file in torch.hub's
    checkpoint cache ($TORCH_HOME/hub/checkpoints/, by default ~/.cache/torch/hub/checkpoints/).
    """


@command.command()
@click.option("--data", "data_path", required=True, metavar="PATH|ZIP", help="Dataset: EDM-format zip or a folder of images (recursive).")
@click.option("--dest", "dest_path", required=True, metavar="NPZ", help="Reference statistics to write (.npz).")
@click.option("--metrics", "metrics_text", default="fid", show_default=True, metavar="LIST",
              help="Metrics this reference will serve; kid and pr also store the features (N x 2048 float32). " + METRIC_HELP + ".")
@click.option("--overwrite", is_flag=True, help="Recompute even if --dest exists.")
@_common
def ref(data_path: str, dest_path: str, metrics_text: str, overwrite: bool, batch: int, weights: str | None,
        device: str | None, workers: int, progress: bool) -> None:
    """Compute a dataset's reference statistics for `calc`.

    An existing --dest that already serves --metrics is kept (the work is done); one that lacks the
    features KID/precision-recall need is refused unless --overwrite.
    """
    from vcdm.cli.errors import writable

    metrics = _parse_metrics(metrics_text)
    keep = any(m != "fid" for m in metrics)
    writable(dest_path, "--dest", is_dir=False)

    def run() -> None:
        from vcdm import distributed
        from vcdm.metrics import FeatureStats, compute_stats
        from vcdm.metrics.stats import rank_and_world

        if os.path.exists(dest_path) and not overwrite:
            if keep and FeatureStats.load(dest_path).features is None:
                raise click.UsageError(f"--dest {dest_path} holds only mu/sigma, but {_needing(metrics)}; pass "
                                       "--overwrite to recompute it")
            _say(f"{dest_path} exists; skipping (pass --overwrite to recompute)")
            return
        with distributed.session(device) as torch_device:
            dataset = _open_images(data_path)
            net = _inception(weights, torch_device, progress)
            _say(f"Computing reference statistics of {len(dataset)} images from {data_path}...")
            stats = compute_stats(dataset, net, batch=batch, device=torch_device, keep_features=keep,
                                  num_workers=workers, progress=progress)
            if rank_and_world()[0] == 0:
                stats.save(dest_path)
            _say(f"Saved {dest_path}")

    _guard(run, dest_path)


@command.command()
@click.option("--images", "image_path", required=True, metavar="PATH|ZIP", help="Images to score: a folder (recursive) or zip.")
@click.option("--ref", "ref_path", required=True, metavar="NPZ|URL",
              help="Reference statistics: from `vcdm fid ref`, or EDM's fid-refs (file or URL).")
@click.option("--num", "--num-images", "num", type=click.IntRange(min=2), default=50000, show_default=True,
              help="Number of images to use (a random subset if there are more); fewer is an error. Under "
                   "torchrun >= 2.9 spell it --num-images: torchrun rejects --num as ambiguous with its --numa-binding.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed for choosing the subset.")
@click.option("--metrics", "metrics_text", default="fid", show_default=True, metavar="LIST", help=METRIC_HELP + ".")
@click.option("--json", "json_path", default=None, metavar="PATH", help="Also write the results as JSON.")
@_common
def calc(image_path: str, ref_path: str, num: int, seed: int, metrics_text: str, json_path: str | None, batch: int,
         weights: str | None, device: str | None, workers: int, progress: bool) -> None:
    """Score images against reference statistics.

    Prints one `name value` line per number on stdout (e.g. `fid 2.3901`); progress goes to stderr.
    """
    from vcdm.cli.errors import writable

    metrics = _parse_metrics(metrics_text)
    keep = any(m != "fid" for m in metrics)
    writable(json_path, "--json", is_dir=False)

    def run() -> None:
        from vcdm import distributed
        from vcdm.metrics import compute_stats, load_reference, scores
        from vcdm.metrics.stats import rank_and_world

        reference = load_reference(ref_path, progress=progress)
        if keep and reference.features is None:
            raise click.UsageError(f"--ref {ref_path} holds only mu/sigma, but {_needing(metrics)}; make it with "
                                   "`vcdm fid ref --metrics fid,kid,pr`")
        with distributed.session(device) as torch_device:
            dataset = _open_images(image_path, num, seed)
            net = _inception(weights, torch_device, progress)
            _say(f"Computing statistics of {len(dataset)} images from {image_path}...")
            stats = compute_stats(dataset, net, batch=batch, device=torch_device, keep_features=keep,
                                  num_workers=workers, progress=progress)
            if rank_and_world()[0] != 0:
                return
            results = scores(stats, reference, metrics)
            for name, value in results.items():
                click.echo(f"{name} {value:g}")
            if json_path:
                from vcdm.fileio import atomic_write

                record = dict(images=image_path, ref=ref_path, num=len(dataset), seed=seed,
                              inception_weights=str(net.weights_path), metrics=results)
                with atomic_write(json_path, "w") as f:
                    json.dump(record, f, indent=2)

    _guard(run, json_path)
