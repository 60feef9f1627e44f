"""`vcdm fid ref` and `vcdm fid calc`: EDM's fid.py, with KID, precision/recall and EDM2's FD-DINOv2,
offline-friendly."""
from __future__ import annotations

import json
import os

import click

from vcdm.cli.errors import user_errors, writable
from vcdm.workers import MAX_WORKERS, default_workers

METRIC_HELP = ("fid: Fréchet Inception Distance; kid: Kernel Inception Distance; pr: precision/recall (k=3); "
               "fd_dinov2: Fréchet distance in DINOv2 ViT-L/14 features (EDM2's second metric)")


def _parse_metrics(text: str) -> list[str]:
    from vcdm.metrics import METRICS

    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise click.BadParameter(f"expected a comma-separated subset of {','.join(METRICS)}, got '{text}'", param_hint="--metrics")
    return list(dict.fromkeys(names))


def _say(message: str) -> None:
    from vcdm.metrics.stats import rank_and_world

    if rank_and_world()[0] == 0:
        click.echo(message, err=True)


def _extractors(metrics: list[str], weights: str | None, dinov2_weights: str | None, device, progress: bool) -> dict:
    """The feature extractors the metrics need, keyed by feature space. Every rank loads them; rank 0 first,
    so only it ever downloads weights."""
    import torch.distributed as dist

    from vcdm.metrics import InceptionFeatures, spaces
    from vcdm.metrics.dinov2 import DINOv2Features
    from vcdm.metrics.stats import rank_and_world

    rank, world = rank_and_world()
    if rank != 0:
        dist.barrier()
    try:
        load = {"inception": lambda: InceptionFeatures(weights, progress=progress and rank == 0),
                "dinov2": lambda: DINOv2Features(dinov2_weights, progress=progress and rank == 0)}
        nets = {space: load[space]() for space in spaces(metrics)}
    finally:
        if rank == 0 and world > 1:
            dist.barrier()
    for space, net in nets.items():
        _say(f"{'Inception-v3' if space == 'inception' else 'DINOv2'} weights: {net.weights_path}")
    return {space: net.to(device) for space, net in nets.items()}


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
        click.option("--dinov2-weights", metavar="PTH", default=None,
                     help="dinov2_vitl14_pretrain.pth, for fd_dinov2 [default: $VCDM_DINOV2_WEIGHTS, else torch.hub's "
                          "or EDM2's cache, downloaded to torch.hub's if absent]."),
        click.option("--device", default=None, help="torch device [default: this rank's GPU if any, else cpu]."),
        click.option("--workers", type=click.IntRange(min=0), default=default_workers, show_default="the CPUs available "
                     f"per process, at most {MAX_WORKERS}", help="Image-decoding worker processes."),
        click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _guard(run, output: str | None = None):
    """Lower layers raise ValueError subclasses with a full message, writes OSError: show them as one line
    (naming ``output`` when the error names no file)."""
    with user_errors(path=output):
        return run()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def command() -> None:
    """Fréchet Inception Distance (and KID, precision/recall, FD-DINOv2), compatible with EDM's fid.py.

    FID's features are the 2048-d pool features of the TensorFlow Inception-v3 (torch-fidelity's port),
    so scores compare with EDM's and the literature's. FD-DINOv2 (--metrics fd_dinov2) is the same
    distance in DINOv2 ViT-L/14's 1024-d features, prepared as EDM2's calculate_metrics.py prepares them.
    Reference files are .npz with `mu` and `sigma` (float64), exactly like EDM's published fid-refs, which
    load as --ref unchanged; DINOv2's statistics sit beside them as `dinov2_mu`/`dinov2_sigma`, and EDM2's
    dataset-refs .pkl files load too (read safely, nothing in them runs). Runs on one process or under
    torchrun (each rank extracts a share of the images).

    \b
    Examples:
      vcdm fid ref --data datasets/ffhq-64x64.zip --dest fid-refs/ffhq-64x64.npz
      python fid.py calc --images=samples --ref=fid-refs/ffhq-64x64.npz --num 20000
      torchrun --standalone --nproc_per_node=2 fid.py calc --images=samples --ref=fid-refs/ffhq-64x64.npz --num-images 20000
      vcdm fid ref --data datasets/afhqv2-64x64.zip --dest refs/afhq.npz --metrics fid,kid,fd_dinov2
      vcdm fid calc --images samples --ref refs/afhq.npz --num 20000 --metrics fid,kid,fd_dinov2 --json scores.json
      vcdm fid calc --images samples --ref dataset-refs/img64.pkl --metrics fid,fd_dinov2

    Without network access, download the Inception weights
    (https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth)
    and pass --inception-weights PATH, set $VCDM_INCEPTION_WEIGHTS, or put the file in torch.hub's
    checkpoint cache ($TORCH_HOME/hub/checkpoints/, by default ~/.cache/torch/hub/checkpoints/); likewise
    DINOv2's (https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth) with
    --dinov2-weights or $VCDM_DINOV2_WEIGHTS.
    """


@command.command()
@click.option("--data", "data_path", required=True, metavar="PATH|ZIP", help="Dataset: EDM-format zip or a folder of images (recursive).")
@click.option("--dest", "dest_path", required=True, metavar="NPZ", help="Reference statistics to write (.npz).")
@click.option("--metrics", "metrics_text", default="fid", show_default=True, metavar="LIST",
              help="Metrics this reference will serve; kid and pr also store the features (N x 2048 float32). " + METRIC_HELP + ".")
@click.option("--overwrite", is_flag=True, help="Recompute even if --dest exists.")
@_common
def ref(data_path: str, dest_path: str, metrics_text: str, overwrite: bool, batch: int, weights: str | None,
        dinov2_weights: str | None, device: str | None, workers: int, progress: bool) -> None:
    """Compute a dataset's reference statistics for `calc`.

    An existing --dest that already serves --metrics is kept (the work is done); one that lacks what they
    need (DINOv2 statistics, or the features KID/precision-recall compare) is refused unless --overwrite.
    """
    metrics = _parse_metrics(metrics_text)
    writable(dest_path, "--dest", is_dir=False)

    def run() -> None:
        from vcdm import distributed
        from vcdm.metrics import SET_METRICS, SPACE, compute_references, load_references, missing, save_references
        from vcdm.metrics.stats import rank_and_world

        if os.path.exists(dest_path) and not overwrite:
            lack = missing(load_references(dest_path), metrics)
            if lack:
                raise click.UsageError(f"--dest {dest_path} holds {lack}; pass --overwrite to recompute it")
            _say(f"{dest_path} exists; skipping (pass --overwrite to recompute)")
            return
        with distributed.session(device) as torch_device:
            dataset = _open_images(data_path)
            nets = _extractors(metrics, weights, dinov2_weights, torch_device, progress)
            _say(f"Computing reference statistics of {len(dataset)} images from {data_path}...")
            references = compute_references(dataset, nets, batch=batch, device=torch_device,
                                            keep_features={SPACE[m] for m in metrics if m in SET_METRICS},
                                            num_workers=workers, progress=progress)
            if rank_and_world()[0] == 0:
                save_references(references, dest_path)
            _say(f"Saved {dest_path}")

    _guard(run, dest_path)


@command.command()
@click.option("--images", "image_path", required=True, metavar="PATH|ZIP", help="Images to score: a folder (recursive) or zip.")
@click.option("--ref", "ref_path", required=True, metavar="NPZ|PKL|URL",
              help="Reference statistics: from `vcdm fid ref`, EDM's fid-refs (file or URL) or EDM2's dataset-refs .pkl.")
@click.option("--num", "--num-images", "num", type=click.IntRange(min=2), default=50000, show_default=True,
              help="Number of images to use (a random subset if there are more); fewer is an error. Under "
                   "torchrun >= 2.9 spell it --num-images: torchrun rejects --num as ambiguous with its --numa-binding.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed for choosing the subset.")
@click.option("--metrics", "metrics_text", default="fid", show_default=True, metavar="LIST", help=METRIC_HELP + ".")
@click.option("--json", "json_path", default=None, metavar="PATH", help="Also write the results as JSON.")
@_common
def calc(image_path: str, ref_path: str, num: int, seed: int, metrics_text: str, json_path: str | None, batch: int,
         weights: str | None, dinov2_weights: str | None, device: str | None, workers: int, progress: bool) -> None:
    """Score images against reference statistics.

    Prints one `name value` line per number on stdout (e.g. `fid 2.3901`); progress goes to stderr.
    """
    metrics = _parse_metrics(metrics_text)
    writable(json_path, "--json", is_dir=False)

    def run() -> None:
        from vcdm import distributed
        from vcdm.metrics import SET_METRICS, SPACE, compute_references, load_reference, missing, scores
        from vcdm.metrics.stats import rank_and_world

        reference = load_reference(ref_path, progress=progress)
        lack = missing(reference, metrics)
        if lack:
            raise click.UsageError(f"--ref {ref_path} holds {lack}; make it with `vcdm fid ref --metrics "
                                   f"{','.join(metrics)}`")
        with distributed.session(device) as torch_device:
            dataset = _open_images(image_path, num, seed)
            nets = _extractors(metrics, weights, dinov2_weights, torch_device, progress)
            _say(f"Computing statistics of {len(dataset)} images from {image_path}...")
            stats = compute_references(dataset, nets, batch=batch, device=torch_device,
                                       keep_features={SPACE[m] for m in metrics if m in SET_METRICS},
                                       num_workers=workers, progress=progress)
            if rank_and_world()[0] != 0:
                return
            results = scores(stats, reference, metrics)
            for name, value in results.items():
                click.echo(f"{name} {value:g}")
            if json_path:
                from vcdm.fileio import atomic_write

                record = dict(images=image_path, ref=ref_path, num=len(dataset), seed=seed, metrics=results,
                              **{f"{space}_weights": str(net.weights_path) for space, net in nets.items()})
                with atomic_write(json_path, "w") as f:
                    json.dump(record, f, indent=2)

    _guard(run, json_path)
