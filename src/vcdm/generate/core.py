"""Batch generation for a list of seeds: the original release's generate.py, resumable and torchrun-aware.

One seed → one sample: latents, random class labels and dataset picks come from a per-seed generator
(EDM's StackedRandomGenerator), and the network is evaluated in calls of one fixed size (ChunkedDenoiser) so
kernels round alike: a seed's file does not depend on --batch or the number of processes.
The draws follow the original release: with --load_obs_from the latent noise uses seed+1 (so an image
is not drawn from the noise that drew its embedding); otherwise a seed draws its latent noise first,
then its class label (EDM's order), or its dataset pick for models conditioned on embeddings.
A results folder records what made it in a manifest and is shared safely by several runs
(``vcdm.generate.results``). ``run_batches`` is the one batch loop and ``BatchSampler`` the one way a batch is
sampled: ``vcdm.pipeline`` runs them into memory (``InMemory``) instead of a results folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from vcdm import perf
from vcdm.checkpoints import CheckpointConfig, load_checkpoint, read_checkpoint_config
from vcdm.data.dataset import ImageDataset, to_float
from vcdm.data.structure import Structure
from vcdm.diffusion.loss import guidance_warning
from vcdm import distributed
from vcdm.diffusion.rng import StackedRandomGenerator
from vcdm.diffusion.sampling import sample
from vcdm.embedders import load_embedder
from vcdm.generate.files import (check_obs_files, make_grid, obs_path, read_observed, read_png, to_uint8_hwc,
                                 write_png, write_tensors)
from vcdm.fileio import IntRanges, as_int
from vcdm.generate.guide import Unconditional, check_guide, guide_digest, read_guide_config
from vcdm.generate.options import (Conditioning, FlagError, GenerateError, InferenceChoices, RunOptions, SamplerOptions,
                                  flag_values, inference_settings, results_dir, seed_list, seed_path)
from vcdm.generate.results import (FolderLock, claim, claim_manifest, complete, manifest_digest, network_sha256,
                                   restored_on_failure)
from vcdm.paths import check_writable, describe_os_error

GRID_MAX = 256
CHUNK = 8  # samples per network call (ChunkedDenoiser); benchmarks/results/batch-invariance.md


@dataclass
class LoadedModel:
    """A loaded checkpoint: the denoiser (eval, on device), its config, and its other tensor groups."""
    path: Path
    denoiser: torch.nn.Module
    config: CheckpointConfig
    tensors: dict = field(default_factory=dict)

    @property
    def structure(self) -> Structure:
        return self.denoiser.structure

    @property
    def makes_images(self) -> bool:
        return "image" in self.structure.latent_names

    @property
    def ext(self) -> str:
        return "png" if self.makes_images else "pt"

    @property
    def joint(self) -> bool:
        """An image model that samples other tensors with the image (concatunet: image and embedding)."""
        return self.makes_images and len(self.structure.latent_names) > 1


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    check_pixel_model(path)
    denoiser, config, tensors = load_checkpoint(path, device)
    return LoadedModel(Path(path), denoiser, config, tensors)


def check_pixel_model(path: str | os.PathLike) -> None:
    """Refuse a model of EDM2's VAE latents (imported from an img512 pickle): vcdm cannot decode them yet."""
    config = read_checkpoint_config(path)
    if not config.makes_pixels:
        encoder = config.encoder
        vae = encoder.get("vae_name", "?")
        raise GenerateError(f"{path}: a model of {encoder['class']} latents, which decode to pixels through the VAE "
                            f"{vae}; vcdm does not run that VAE yet (512 px latent decoding comes in the next round, "
                            f"reading {vae}'s config.json and diffusion_pytorch_model.safetensors from a local folder)")


def model_embedder(model: LoadedModel, clip_weights: str | os.PathLike | None, device: torch.device):
    """The embedder a model was trained with, rebuilt from its config and ``embedder`` tensors."""
    identity = model.config.embedder
    if identity is None:
        raise GenerateError(f"{model.path}: the checkpoint records no embedder, so it cannot embed images")
    return load_embedder(identity, model.tensors.get("embedder"), clip_weights=clip_weights, device=device).eval()


@dataclass
class GenerateResult:
    outdir: Path
    written: list[int]  # seeds this process wrote
    generated: int      # seeds all ranks of this run wrote (other runs on the folder may have written more)
    skipped: int        # seeds whose files were complete at the start
    settings: perf.InferenceSettings = perf.FP32  # how the network was evaluated


def dataset_path(model: LoadedModel, data_path: str | None) -> str:
    """The dataset a conditional model draws its conditioning from without --load_obs_from."""
    path = data_path or model.config.data_path
    if not path or not Path(path).exists():
        raise GenerateError(f"{model.path} is conditioned on {list(model.structure.observed_names)}: pass "
                            f"--load_obs_from DIR (samples of a prior) or --data_path to draw them from data "
                            f"(training data {path!r} not found)")
    return path


class DatasetConditions:
    """Observed tensors of random training items, for a conditional model run without --load_obs_from
    (the original release's behaviour): the item's label and its image's embedding."""

    def __init__(self, model: LoadedModel, data_path: str | None, clip_weights: str | None, device: torch.device):
        self.names = model.structure.observed_names
        self.data = ImageDataset(dataset_path(model, data_path), use_labels="label" in self.names)
        self.to_float, self.device = to_float, device
        self.embedder = model_embedder(model, clip_weights, device) if "embedding" in self.names else None

    def __len__(self) -> int:
        return len(self.data)

    @torch.no_grad()
    def observed(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        items = [self.data[int(i)] for i in indices]
        images = self.to_float(torch.stack([img for img, _ in items])).to(self.device)
        out = {"image": images, "label": torch.stack([label for _, label in items]).to(self.device)}
        if self.embedder is not None:
            out["embedding"] = self.embedder.embed(images).float()
        return {k: out[k] for k in self.names}


def check_class(structure: Structure, class_idx: int | None) -> None:
    if class_idx is None:
        return
    class_idx = as_int(class_idx, "--class")
    if "label" not in structure.observed_names:
        raise FlagError("--class: the model is not conditioned on a class label")
    label_dim = structure.shape("label")[0]
    if not 0 <= class_idx < label_dim:
        raise FlagError(f"--class: expected 0..{label_dim - 1}, got {class_idx}")


def check_recorded_class(load_obs_from: str | os.PathLike, seeds: Sequence[int], labels: Sequence[torch.Tensor | None],
                         class_idx: int) -> None:
    """Refuse --class for samples whose files record another label: their embeddings were sampled for
    that label, so replacing it would condition the image on an embedding of another class."""
    for seed, label in zip(seeds, labels):
        if label is not None and not torch.equal(label, torch.eye(len(label))[class_idx]):
            recorded = int(label.argmax()) if label.max() == 1 and label.sum() == 1 else label.tolist()
            raise FlagError(f"--class {class_idx}: {obs_path(load_obs_from, seed)} records label {recorded}, which "
                            "its embedding was sampled for; drop --class to use the recorded labels")


def draw(model: LoadedModel, seeds: Sequence[int], device: torch.device, *, class_idx: int | None = None,
         load_obs_from: str | os.PathLike | None = None, dataset: DatasetConditions | None = None,
         observed: dict[str, torch.Tensor] | None = None, given: dict[str, torch.Tensor] | None = None,
         increment_seeds: int = 0):
    """Per-seed latent noise and conditioning for one batch → ``(latents, observed dict, rnd)``.

    ``observed``: fixed conditioning; ``given``: per-seed observations sampled by a prior (float32, as
    read back from its files), which like ``load_obs_from`` moves the latent noise to seed + 1."""
    s, n = model.structure, len(seeds)
    obs = dict(observed or {})
    if load_obs_from is not None:
        optional = ("label",) if class_idx is not None else ()
        per_seed = [read_observed(load_obs_from, seed, s, optional) for seed in seeds]
        if class_idx is not None:
            check_recorded_class(load_obs_from, seeds, [p.get("label") for p in per_seed], class_idx)
        given = {k: torch.stack([p[k] for p in per_seed]) for k in per_seed[0]}
    if given is not None:
        obs.update({k: v.to(device, torch.float32) for k, v in given.items()})
        offset = 1
    elif dataset is not None:
        picks = StackedRandomGenerator(device, list(seeds)).randint(len(dataset), size=[n], device=device)
        obs.update(dataset.observed(picks))
        offset = 0
    else:
        offset = 0
    rnd = StackedRandomGenerator(device, [seed + offset + increment_seeds for seed in seeds])
    latents = rnd.randn([n, s.latent_dim], device=device)
    if "label" in s.observed_names and (class_idx is not None or "label" not in obs):
        label_dim = s.shape("label")[0]
        labels = torch.full([n], class_idx, device=device) if class_idx is not None else \
            rnd.randint(label_dim, size=[n], device=device)
        obs["label"] = torch.eye(label_dim, device=device)[labels]
    return latents, obs, rnd


class ChunkedDenoiser:
    """The denoiser evaluated in calls of exactly ``chunk`` samples, the last call filled up by repeating its
    last sample. Every call then has one shape, so the kernels (and their rounding) a sample meets do not
    depend on the batch it is in: one seed gives the same bits at any --batch and number of processes.
    Calls of varying size do not: a 32x32 DDPM++ gives other bits for a sample evaluated among 8 or 16
    (benchmarks/results/batch-invariance.md). Other attributes pass through."""

    def __init__(self, denoiser: torch.nn.Module, chunk: int = CHUNK):
        self.denoiser, self.chunk = denoiser, chunk

    def __getattr__(self, name: str):
        return getattr(self.denoiser, name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        n, sigma = x.shape[0], torch.as_tensor(sigma)
        outs = []
        for start in range(0, n, self.chunk):
            rows = torch.arange(start, start + self.chunk, device=x.device).clamp_(max=n - 1)
            part = [t if t is None or t.ndim == 0 or t.shape[0] != n else t[rows] for t in (x, sigma, y)]
            outs.append(self.denoiser(*part)[:n - start])  # shared sigma (0-d): nothing to pick
        return torch.cat(outs)


def denoise(model: LoadedModel, latents: torch.Tensor, obs: dict[str, torch.Tensor], rnd, opts: SamplerOptions,
            settings: perf.InferenceSettings = perf.FP32, guide: LoadedModel | None = None) -> torch.Tensor:
    """Run the sampler; returns the flat latent samples (B, N) in float64. The network (and the guiding
    network ``guide``, loaded by ``load_guide`` for ``opts.gnet``) is evaluated with ``settings`` (apply
    ``perf.prepare`` to the model first); the sampler state stays float64."""
    if (guide is None) != (opts.gnet is None):
        raise ValueError(f"denoise: pass the guide loaded by load_guide for --gnet {opts.gnet} (and only then)")
    gnet = None
    if guide is not None:
        gnet = ChunkedDenoiser(guide.denoiser)
        gnet = gnet if guide.structure.observed_names else Unconditional(gnet)
    y = model.structure.flatten_observed({k: v.float() for k, v in obs.items()})
    with torch.no_grad(), perf.autocast(settings, latents.device):
        return sample(ChunkedDenoiser(model.denoiser), latents, y, options=opts, randn_like=rnd.randn_like, gnet=gnet)


def check_gnet(config: CheckpointConfig, name: str | os.PathLike, opts: SamplerOptions, flag: str = "--gnet") -> None:
    """Refuse ``opts.gnet`` (one line) when it cannot guide the model with this ``config`` (before loading either)."""
    if opts.gnet is not None:
        check_guide(config, read_guide_config(opts.gnet, flag), net_name=str(name), guide_name=opts.gnet, flag=flag)


def load_guide(model: LoadedModel, opts: SamplerOptions, settings: perf.InferenceSettings) -> LoadedModel | None:
    """The guiding network of ``opts.gnet`` (None without one), checked against ``model`` and loaded as it
    was: the same loader, device and inference settings."""
    if opts.gnet is None:
        return None
    check_gnet(model.config, model.path, opts)
    guide = load_model(opts.gnet, next(model.denoiser.parameters()).device)
    perf.prepare(guide.denoiser, settings)
    return guide


def save_samples(model: LoadedModel, x: torch.Tensor, obs: dict[str, torch.Tensor], paths: Sequence[Path]) -> None:
    """PNG per seed for image models; otherwise a ``.pt`` of latents + observed in the release's list form.
    A joint model (``LoadedModel.joint``) writes both: the ``.pt`` (its other tensors, as a prior's, so the folder
    serves --load_obs_from) before the PNG. A non-finite sample stops the run before any of its batch is written (it
    would be a black image that counts as done). Samples are not fsynced (``atomic_write``'s ``durable``): a file a
    power cut tore fails ``complete``, and the next run redoes its seed."""
    finite = torch.isfinite(x).all(dim=1)
    if not finite.all():
        bad = [path for path, ok in zip(paths, finite.tolist()) if not ok]
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise GenerateError(f"{bad[0].name}{more}: the sampler returned NaN/inf, so nothing of this batch was "
                            "written; the network or its conditioning gives non-finite values")
    for folder in {path.parent for path in paths}:
        if folder.is_symlink():
            raise GenerateError(f"{folder}: a link inside the results folder; samples are written only into "
                                "real folders")
    images, rest = kept(model, x, obs)
    if images is None or model.joint:
        for i, path in enumerate(paths):
            write_tensors(path.with_suffix(".pt"), {k: v[i] for k, v in rest.items()}, model.structure.names,
                          durable=False)
    if images is not None:
        for path, image in zip(paths, images):
            write_png(path, image, durable=False)


def kept(model: LoadedModel, x: torch.Tensor, obs: dict[str, torch.Tensor]) -> tuple[np.ndarray | None, dict]:
    """A batch's samples as the results keep them: the images as uint8 (B, H, W, C) (None for a model without
    images) and every other tensor, sampled or observed, as float32 (what the ``.pt`` files hold)."""
    tensors = model.structure.unflatten_latent(x)
    images = to_uint8_hwc(tensors.pop("image")) if model.makes_images else None
    return images, {k: v.to(torch.float32) for k, v in {**obs, **tensors}.items()}


def check_seeds(seeds: "str | Sequence[int] | IntRanges", max_batch_size: int, name: str = "--seeds",
                batch_name: str = "--batch") -> IntRanges:
    """The seeds without repeats, in order (``seed_list``); GenerateError for a bad batch size."""
    seeds = seed_list(seeds, name)
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise GenerateError(f"{batch_name}: expected a positive batch size, got {max_batch_size!r}")
    return seeds


def split_batches(seeds: Sequence[int], max_batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This rank's batches: the seeds cut into a multiple of ``world`` near-equal batches, every
    ``world``-th one (what a seed's file does not depend on, thanks to ChunkedDenoiser)."""
    if not seeds:
        return []
    num_batches = ((len(seeds) - 1) // (max_batch_size * world) + 1) * world
    return [b.tolist() for b in torch.as_tensor(list(seeds)).tensor_split(num_batches)][rank::world]


def check_request(model: LoadedModel, opts: SamplerOptions, class_idx: int | None, grid: object,
                  flags: str = "--") -> None:
    """Refuse what the model cannot do; warn about guidance it was not trained for. ``flags``: how the
    messages spell this stage's sampler flags (``--image-`` → ``--image-guidance``)."""
    check_class(model.structure, class_idx)
    if opts.gnet is None:  # classifier-free guidance
        if opts.guidance != 1.0 and not model.structure.observed_names:
            raise FlagError(f"{flags}guidance: the model is unconditional; guidance needs a conditional model, or "
                            f"a guiding network ({flags}gnet)")
        warning = guidance_warning(model.config.training, opts.guidance, f"{flags}guidance")
        if warning:
            print(warning, file=sys.stderr)
    if grid is not None and not model.makes_images:
        raise FlagError("--grid: the model generates embeddings, not images")


def conditioning_source(model: LoadedModel, load_obs_from: str | os.PathLike | None, data_path: str | None) -> str | None:
    """Where the observed tensors other than a class label come from, for the manifest and the user."""
    if load_obs_from is not None:
        digest = manifest_digest(load_obs_from)
        return f"--load_obs_from samples {digest}" if digest else f"--load_obs_from {Path(load_obs_from).resolve()}"
    if set(model.structure.observed_names) - {"label"}:
        path = data_path or model.config.data_path
        return f"random items of {Path(path).resolve() if path else None}"
    return None


def manifest_settings(model: LoadedModel, opts: SamplerOptions, settings: perf.InferenceSettings, *,
                      class_idx: int | None, increment_seeds: int, conditioning: str | None) -> dict:
    """What made a results folder's files, flag name → value (JSON-normalised)."""
    record = {"network": f"sha256:{network_sha256(model.path)}", **flag_values(opts),
              "precision": "bf16" if settings.autocast_dtype is not None else "fp32", "--class": class_idx,
              "--increment_seeds": increment_seeds, "conditioning": conditioning}
    if opts.gnet is not None:
        record["--gnet"] = f"sha256:{guide_digest(opts.gnet)}"
    return json.loads(json.dumps(record))


def open_folder(outdir: Path, record: dict, overwrite: bool) -> FolderLock:
    """Check and write the folder's manifest (rank 0), then lock the folder for writing (every rank)."""
    problem = None
    if distributed.rank() == 0:
        try:
            claim_manifest(outdir, record, overwrite)
        except GenerateError as e:
            problem = str(e)
        except OSError as e:  # every rank stops with the message instead of waiting for rank 0
            problem = describe_os_error(e)
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise GenerateError(problem)
    if distributed.rank() == 0:
        lock = FolderLock(outdir)  # removes temp files of killed runs if no other run holds the folder
    distributed.barrier()
    return lock if distributed.rank() == 0 else FolderLock(outdir, clean=False)


@dataclass
class BatchSampler:
    """Samples a batch of seeds: their draws (``draw``) and the sampler run (``denoise``) under one run's
    settings. The one way `vcdm generate`, `vcdm sample` and the Python API turn seeds into samples.

    ``given``: per-seed observations sampled by a prior (float32), as ``draw`` takes them."""
    model: LoadedModel
    opts: SamplerOptions
    settings: perf.InferenceSettings
    device: torch.device
    guide: LoadedModel | None = None
    class_idx: int | None = None
    load_obs_from: str | os.PathLike | None = None
    dataset: DatasetConditions | None = None
    given: Mapping[int, dict[str, torch.Tensor]] | None = None
    increment_seeds: int = 0

    def __call__(self, seeds: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        given = None if self.given is None else {k: torch.stack([self.given[s][k] for s in seeds])
                                                 for k in self.given[seeds[0]]}
        latents, obs, rnd = draw(self.model, seeds, self.device, class_idx=self.class_idx,
                                 load_obs_from=self.load_obs_from, dataset=self.dataset, given=given,
                                 increment_seeds=self.increment_seeds)
        return denoise(self.model, latents, obs, rnd, self.opts, self.settings, self.guide), obs


@dataclass
class Plan:
    """One process's share of a generate run: the batches it samples into the results folder."""
    model: LoadedModel
    outdir: Path
    todo: list[int]
    batches: list[list[int]]
    subdirs: bool

    def path(self, seed: int, ext: str | None = None) -> Path:
        return seed_path(self.outdir, seed, ext or self.model.ext, self.subdirs)

    def missing(self, batch: Sequence[int]) -> list[int]:
        return [seed for seed in batch if not complete(self.path(seed))
                or self.model.joint and not complete(self.path(seed, "pt"))]

    def claim(self, batch: list[int], wait: bool) -> ContextManager[bool]:
        return claim(self.outdir, batch[0], wait)

    def save(self, seeds: list[int], x: torch.Tensor, obs: dict[str, torch.Tensor]) -> None:
        save_samples(self.model, x, obs, [self.path(seed) for seed in seeds])


class InMemory:
    """Samples kept in memory, by seed, as a results folder keeps them (``kept``): the Python API's target.
    The tensors stay on the sampling device until ``output`` gathers them."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self.images: dict[int, np.ndarray] = {}
        self.tensors: dict[int, dict[str, torch.Tensor]] = {}

    def claim(self, batch: list[int], wait: bool) -> ContextManager[bool]:
        return contextlib.nullcontext(True)

    def missing(self, batch: list[int]) -> list[int]:
        return batch

    def save(self, seeds: list[int], x: torch.Tensor, obs: dict[str, torch.Tensor]) -> None:
        images, tensors = kept(self.model, x, obs)
        for i, seed in enumerate(seeds):
            if images is not None:
                self.images[seed] = images[i]
            self.tensors[seed] = {k: v[i] for k, v in tensors.items()}


def run_batches(batches: list[list[int]], sample: BatchSampler, target: Plan | InMemory, progress: bool) -> list[int]:
    """The batch loop: sample and save each batch this process can claim; then wait for batches other
    processes hold, and do any a dead process left. Returns the seeds written."""
    written: list[int] = []
    skipped: list[list[int]] = []
    with tqdm(total=len(batches), unit="batch", disable=not progress) as bar:
        for wait, todo_batches in ((False, batches), (True, skipped)):
            for batch in todo_batches:
                with target.claim(batch, wait) as mine:
                    todo = target.missing(batch) if mine else []
                    if todo:
                        x, obs = sample(todo)
                        target.save(todo, x, obs)
                        written += todo
                if not mine:
                    skipped.append(batch)
                else:
                    bar.update(1)
    return written


def generate(network: str | os.PathLike | LoadedModel, seeds: Sequence[int], *, opts: SamplerOptions = SamplerOptions(),
             cond: Conditioning = Conditioning(), increment_seeds: int = 0, run: RunOptions = RunOptions(),
             device: str | torch.device | None = None,
             inference: InferenceChoices | perf.InferenceSettings = InferenceChoices()) -> GenerateResult:
    """Sample one file per seed into ``run.outdir`` (default: the original release's results layout), skipping seeds
    whose file is complete. Under torchrun each rank takes every world-size-th batch of the missing seeds;
    other processes on the same folder share the batches through claims.

    ``inference``: how the network is evaluated. It changes the samples only by floating-point rounding,
    so it does not enter the results directory name (as the device does not); the precision enters the
    folder's manifest. ``run.overwrite``: replace samples of other settings."""
    seeds = check_seeds(seeds, run.max_batch_size)
    class_idx, load_obs_from, data_path = cond.class_idx, cond.load_obs_from, cond.data_path
    path = network.path if isinstance(network, LoadedModel) else Path(network)
    outdir = run.outdir
    if outdir is None:
        outdir = results_dir(path, opts, seeds, class_idx=class_idx, load_obs_from=load_obs_from,
                             increment_seeds=increment_seeds)
    outdir = Path(outdir)
    check_writable(outdir, "--outdir")
    if run.grid is not None:
        check_writable(run.grid, "--grid", is_dir=False)
    if isinstance(network, LoadedModel) and device is None:
        device = next(network.denoiser.parameters()).device
    with distributed.session(device) as device:
        model = network if isinstance(network, LoadedModel) else load_model(network, device)
        settings = inference_settings(inference, device, model.denoiser)
        perf.prepare(model.denoiser, settings)
        check_request(model, opts, class_idx, run.grid, run.flags)
        guide = load_guide(model, opts, settings)
        if load_obs_from is not None:
            check_obs_files(load_obs_from, seeds)
        source = conditioning_source(model, load_obs_from, data_path)
        needs_data = load_obs_from is None and bool(set(model.structure.observed_names) - {"label"})
        if needs_data:
            data_path = dataset_path(model, data_path)
        record = manifest_settings(model, opts, settings, class_idx=class_idx, increment_seeds=increment_seeds,
                                   conditioning=source)
        rank, world = distributed.rank(), distributed.world_size()
        with restored_on_failure(outdir, rank == 0), open_folder(outdir, record, run.overwrite):
            plan = Plan(model, outdir, [], [], run.subdirs)
            plan.todo = plan.missing(seeds)
            distributed.barrier()  # every rank has listed what exists before anyone writes
            plan.batches = split_batches(plan.todo, run.max_batch_size, rank, world)
            show = run.progress and rank == 0
            if show:
                print(f'Generating {len(plan.todo)} of {len(seeds)} seeds ({len(seeds) - len(plan.todo)} already there) '
                      f'into "{outdir}"', file=sys.stderr)
            dataset = None
            if plan.todo and needs_data:
                dataset = DatasetConditions(model, data_path, cond.clip_weights, device)
                if rank == 0:
                    print(f"Conditioning on {list(dataset.names)} of random items of {data_path} (pass --load_obs_from "
                          "DIR to condition on a prior's samples instead)", file=sys.stderr)
            sample = BatchSampler(model, opts, settings, device, guide, class_idx, load_obs_from, dataset,
                                  increment_seeds=increment_seeds)
            written = run_batches(plan.batches, sample, plan, show)
            distributed.barrier()
        if run.grid is not None and rank == 0:
            shown = seeds[:GRID_MAX]
            write_png(run.grid, make_grid([read_png(plan.path(seed, "png")) for seed in shown]))
        generated = int(distributed.all_sum([len(written)], device)[0])
        return GenerateResult(outdir, written, generated, len(seeds) - len(plan.todo), settings)
