"""The Python API: sample in memory, score images, train — for notebooks and scripts.

``Pipeline`` (one checkpoint, as ``vcdm generate``) and ``TwoStagePipeline`` (prior → image model, as
``vcdm sample``) take the commands' options under their flag names (``steps=``, ``S_churn=``,
``prior_steps=``, ``image_disc=`` …) and give, for the same seeds and settings, byte for byte the
images the commands write: they run the commands' batch loop and batch sampler (``vcdm.generate.core``)
into memory instead of a results folder, and hand the prior's samples to the image model as float32, as
its files would.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch

from vcdm import perf
from vcdm.checkpoints import read_checkpoint_config
from vcdm.data.dataset import ImageDataset
from vcdm.diffusion.settings import RELEASE_DEFAULTS, SamplerOptionError
from vcdm.distributed import parse_device
from vcdm.generate.core import (BatchSampler, DatasetConditions, InMemory, LoadedModel, check_request, check_seeds,
                                load_guide, load_model, run_batches, split_batches)
from vcdm.generate.files import check_obs_files
from vcdm.generate.options import (FLAG_NAMES, FlagError, GenerateError, InferenceChoices, SamplerOptions,
                                   inference_settings, recorded_defaults)
from vcdm.generate.two_stage import chain_classes, check_chain

INFERENCE_OPTIONS = ("bf16", "channels_last", "compile")
FIELDS = {FLAG_NAMES.get(f.name, f.name): f.name for f in dataclasses.fields(SamplerOptions)}  # flag → field
ARGUMENTS = {field: flag for flag, field in FIELDS.items()}  # field → API argument


@dataclass
class PipelineOutput:
    """Samples of a list of seeds, in seed order. ``images``: (N, H, W, C) uint8, as the PNGs hold them;
    ``embeddings``: (N, D) float32, as the ``.pt`` files hold them; ``tensors``: every sampled or
    observed tensor by name (float32)."""
    seeds: list[int]
    images: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, seeds: list[int], samples: InMemory) -> "PipelineOutput":
        tensors = {k: torch.stack([samples.tensors[s][k] for s in seeds]).cpu().numpy()
                   for k in samples.tensors[seeds[0]]}
        images = np.stack([samples.images[s] for s in seeds]) if samples.images else None
        emb = tensors.get("embedding")
        return cls(seeds, images, None if emb is None else emb.reshape(len(emb), -1), tensors)

    def __len__(self) -> int:
        return len(self.seeds)

    def to_pil(self) -> list:
        """The images as PIL images (grayscale for one channel)."""
        if self.images is None:
            raise GenerateError("this model generates embeddings, not images")
        return [PIL.Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img) for img in self.images]


def pop_api_sampler_options(options: dict[str, Any], prefix: str = "", defaults: dict[str, Any] | None = None,
                            preset: str | None = None, recorded: dict[str, Any] | None = None) -> SamplerOptions:
    """Pop ``<prefix><flag>`` keys (``steps``, ``S_churn``, ``disc`` …; None: not given) from ``options`` →
    SamplerOptions, resolved as the commands resolve their flags (``SamplerOptions.resolve``); errors name
    ``<prefix><flag>``, or ``--<flag>`` for a single stage."""
    given = {FIELDS[k[len(prefix):]]: options.pop(k) for k in list(options)
             if k.startswith(prefix) and k[len(prefix):] in FIELDS}
    try:
        return SamplerOptions.resolve({k: v for k, v in given.items() if v is not None}, defaults, preset, recorded)
    except SamplerOptionError as e:
        kind = TypeError if isinstance(e, TypeError) else FlagError
        raise kind(e.named(lambda key: f"{prefix}{ARGUMENTS[key]}" if prefix and key in ARGUMENTS
                           else f"--{ARGUMENTS.get(key, key)}")) from None


def check_unknown(options: dict[str, Any], valid: Sequence[str]) -> None:
    if options:
        raise TypeError(f"unknown option(s) {', '.join(sorted(options))}; expected {', '.join(valid)}")


def default_device(device: str | torch.device | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or None (CUDA when available); one clear error naming ``device`` otherwise."""
    return parse_device(device, "device")


class Pipeline:
    """One checkpoint — a prior (→ embeddings) or an image model (→ images) — sampled as ``vcdm generate``.

    >>> pipe = vcdm.Pipeline.from_checkpoint("runs/uncond/network-snapshot-010000.safetensors")
    >>> out = pipe(seeds=range(16), steps=18, batch=8)
    >>> out.images.shape  # (16, H, W, C) uint8
    """

    def __init__(self, model: LoadedModel, device: torch.device, clip_weights: str | os.PathLike | None = None):
        self.model, self.device, self.clip_weights = model, device, clip_weights
        self.guides: dict[str, LoadedModel] = {}  # guiding networks by path, loaded once

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        clip_weights: str | os.PathLike | None = None) -> "Pipeline":
        device = default_device(device)
        return cls(load_model(path, device), device, clip_weights)

    @property
    def options(self) -> list[str]:
        return ["batch", "class_idx", "load_obs_from", "data_path", "increment_seeds", "preset", "progress", *FIELDS,
                *INFERENCE_OPTIONS]

    def __call__(self, seeds: str | Sequence[int], *, batch: int = 64, class_idx: int | None = None,
                 load_obs_from: str | os.PathLike | None = None, data_path: str | None = None,
                 increment_seeds: int = 0, preset: str | None = None, progress: bool = False,
                 **options: Any) -> PipelineOutput:
        """Sample ``seeds`` (as --seeds writes them, "0-15,20", or a range or sequence of ints); ``options``:
        ``vcdm generate``'s sampler options under their flag names (``steps``, ``sigma_min``, ``S_churn``,
        ``disc``, ``sampler``, ``guidance``, ``gnet``, ``guidance_interval=(lo, hi)``, ``levels=(80, 0.15)`` …) and
        ``bf16``, ``channels_last``, ``compile`` (None: vcdm.perf's choice)."""
        opts = pop_api_sampler_options(options, preset=preset, recorded=recorded_defaults(self.model.config))
        settings = self.prepare(options)
        seeds = list(check_seeds(seeds, batch, "seeds", "batch"))
        check_request(self.model, opts, class_idx, None)
        if load_obs_from is not None:
            check_obs_files(load_obs_from, seeds)
        dataset = None
        if load_obs_from is None and set(self.model.structure.observed_names) - {"label"}:
            dataset = DatasetConditions(self.model, data_path, self.clip_weights, self.device)
        sample = BatchSampler(self.model, opts, settings, self.device, self.guide(opts, settings), class_idx,
                              load_obs_from, dataset, increment_seeds=increment_seeds)
        return PipelineOutput.of(seeds, self.run(seeds, sample, batch, progress))

    def prepare(self, options: dict[str, Any]) -> perf.InferenceSettings:
        """Pop the inference options; evaluate the network as they (or vcdm.perf's defaults) say."""
        choices = InferenceChoices(**{k: options.pop(k, None) for k in INFERENCE_OPTIONS})
        check_unknown(options, self.options)
        settings = inference_settings(choices, self.device, self.model.denoiser)
        perf.prepare(self.model.denoiser, settings)
        return settings

    def guide(self, opts: SamplerOptions, settings: perf.InferenceSettings) -> LoadedModel | None:
        """The guiding network of ``opts.gnet`` (``gnet=``), loaded once and evaluated as the model is."""
        if opts.gnet is None:
            return None
        if opts.gnet not in self.guides:
            self.guides[opts.gnet] = load_guide(self.model, opts, settings)
        guide = self.guides[opts.gnet]
        perf.prepare(guide.denoiser, settings)
        return guide

    def run(self, seeds: list[int], sample: BatchSampler, batch: int, progress: bool) -> InMemory:
        """Sample ``seeds`` in batches of at most ``batch`` through the commands' batch loop, into memory."""
        samples = InMemory(self.model)
        run_batches(split_batches(seeds, batch), sample, samples, progress)
        return samples


class TwoStagePipeline:
    """A prior and an image model chained as ``vcdm sample``: embeddings, then images given them.

    >>> pipe = vcdm.TwoStagePipeline.from_checkpoints("prior.safetensors", "image.safetensors")
    >>> out = pipe(seeds=[0, 1, 2], prior_steps=40, image_steps=40, batch=64)
    >>> out.images, out.embeddings  # (3, H, W, C) uint8, (3, D) float32
    """

    def __init__(self, prior: Pipeline, image: Pipeline):
        check_chain(prior.model.config, image.model.config, prior_name=str(prior.model.path),
                    image_name=str(image.model.path), class_idx=0)  # the class is checked per call
        self.prior, self.image = prior, image

    @classmethod
    def from_checkpoints(cls, prior: str | os.PathLike, image_model: str | os.PathLike,
                         device: str | torch.device | None = None,
                         clip_weights: str | os.PathLike | None = None) -> "TwoStagePipeline":
        check_chain(read_checkpoint_config(prior), read_checkpoint_config(image_model), prior_name=str(prior),
                    image_name=str(image_model), class_idx=0)  # before loading any weights
        return cls(Pipeline.from_checkpoint(prior, device, clip_weights),
                   Pipeline.from_checkpoint(image_model, device, clip_weights))

    def __call__(self, seeds: str | Sequence[int], *, batch: int = 64, class_idx: int | None = None,
                 increment_seeds: int = 0, preset: str | None = None, progress: bool = False,
                 **options: Any) -> PipelineOutput:
        """Sample ``seeds``; ``options``: ``vcdm sample``'s under their flag names — ``prior_steps``,
        ``image_steps``, ``prior_S_churn``, ``image_sampler``, ``prior_gnet``, ``prior_levels`` … (defaults:
        the original release's 40 steps, S_churn 50, S_noise 1.007) — and ``bf16``, ``channels_last``,
        ``compile``."""
        prior_opts = pop_api_sampler_options(options, "prior_", RELEASE_DEFAULTS, preset,
                                             recorded_defaults(self.prior.model.config))
        image_opts = pop_api_sampler_options(options, "image_", RELEASE_DEFAULTS, preset,
                                             recorded_defaults(self.image.model.config))
        inference = {k: options.pop(k, None) for k in INFERENCE_OPTIONS}
        check_unknown(options, ["batch", "class_idx", "increment_seeds", "preset", "progress", *INFERENCE_OPTIONS,
                                *(f"{stage}_{flag}" for stage in ("prior", "image") for flag in FIELDS)])
        classes = chain_classes(self.prior.model.config, self.image.model.config, class_idx)
        seeds = list(check_seeds(seeds, batch, "seeds", "batch"))
        samplers = []
        for pipe, opts, conditioned, flags in ((self.prior, prior_opts, classes[0], "--prior-"),
                                               (self.image, image_opts, classes[1], "--image-")):
            check_request(pipe.model, opts, conditioned, None, flags)
            settings = pipe.prepare(dict(inference))
            samplers.append(BatchSampler(pipe.model, opts, settings, pipe.device, pipe.guide(opts, settings),
                                         conditioned, increment_seeds=increment_seeds))
        first = self.prior.run(seeds, samplers[0], batch, progress)
        wanted = [n for n in self.image.model.structure.observed_names if n in first.tensors[seeds[0]]]
        samplers[1].given = {s: {n: first.tensors[s][n] for n in wanted} for s in seeds}
        second = self.image.run(seeds, samplers[1], batch, progress)
        prior_out, image_out = PipelineOutput.of(seeds, first), PipelineOutput.of(seeds, second)
        return PipelineOutput(seeds, image_out.images, prior_out.embeddings, {**prior_out.tensors, **image_out.tensors})


def _image_dataset(images: Any, num: int | None, seed: int):
    """A folder/zip path → vcdm's ImageDataset; uint8 images in memory (N×H×W×C array, N×C×H×W tensor,
    PIL images or a PipelineOutput) → a list of C×H×W uint8 tensors."""
    if isinstance(images, (str, os.PathLike)):
        dataset = ImageDataset(str(images), max_size=num, random_seed=seed)
        if num is not None and len(dataset) < num:
            raise GenerateError(f"found {len(dataset)} images in {images}, but num asks for {num}")
        return dataset
    if isinstance(images, PipelineOutput):
        images = images.images
    if isinstance(images, (list, tuple)) and images and not isinstance(images[0], (np.ndarray, torch.Tensor)):
        images = [np.asarray(img) for img in images]  # PIL images
        images = np.stack([img[:, :, None] if img.ndim == 2 else img for img in images])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise TypeError("images: expected a folder or zip path, PIL images, a PipelineOutput, or uint8 images "
                        "(N, H, W, C) as an array or (N, C, H, W) as a tensor")
    if num is not None:
        if len(images) < num:
            raise GenerateError(f"got {len(images)} images, but num asks for {num}")
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num]]
    return list(images)


def fid(images: Any, ref: Any, *, metrics: str | Sequence[str] = ("fid",), num: int | None = None, seed: int = 0,
        batch: int = 64, inception_weights: str | os.PathLike | None = None,
        dinov2_weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
        progress: bool = False) -> dict[str, float]:
    """Score images against reference statistics, as ``vcdm fid calc`` → ``{"fid": …, "kid": …, …}``.

    ``images``: a folder or zip, or images in memory (see ``_image_dataset``); ``ref``: an .npz path or
    URL (``vcdm fid ref``, EDM's fid-refs), EDM2's dataset-refs .pkl, a ``vcdm.metrics.FeatureStats``
    (Inception's) or a dict of them by feature space; ``metrics``: any of fid, kid, pr, fd_dinov2, as a
    list or as --metrics writes them ("fid,kid"; kid and pr need a reference with features);
    ``num``: a random subset of this size."""
    from vcdm.metrics import (METRICS, SET_METRICS, SPACE, FeatureStats, InceptionFeatures, compute_references,
                              load_reference, missing, scores, spaces)
    from vcdm.metrics.dinov2 import DINOv2Features  # here: the metrics load scipy, only fid() needs them

    if isinstance(metrics, str):  # --metrics' syntax, "fid,kid"
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics: expected a subset of {', '.join(METRICS)} (a list, or text like 'fid,kid'), "
                         f"got {list(metrics)}")
    if isinstance(ref, FeatureStats):
        reference = {"inception": ref}
    elif isinstance(ref, dict):
        reference = ref
    else:
        reference = load_reference(str(ref), progress=progress)
    lack = missing(reference, metrics)
    if lack:
        raise ValueError(f"ref holds {lack}")
    device = default_device(device)
    load = {"inception": lambda: InceptionFeatures(inception_weights, progress=progress),
            "dinov2": lambda: DINOv2Features(dinov2_weights, progress=progress)}
    nets = {space: load[space]().to(device) for space in spaces(metrics)}
    stats = compute_references(_image_dataset(images, num, seed), nets, batch=batch, device=device,
                               keep_features={SPACE[m] for m in metrics if m in SET_METRICS}, progress=progress)
    return scores(stats, reference, metrics)
