"""Two-stage sampling: a prior samples embeddings, an image model samples images given them.

The result is byte-for-byte what running ``generate`` twice gives (the original release's README recipe): the prior
writes ``<seed>.pt`` files, and the image model reads them back as with ``--load_obs_from``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from vcdm import distributed, perf
from vcdm.checkpoints import CheckpointConfig, read_checkpoint_config
from vcdm.data.structure import Structure
from vcdm.embedders import compatible
from vcdm.generate.core import GenerateResult, check_gnet, check_seeds, generate
from vcdm.generate.options import (Conditioning, FlagError, GenerateError, InferenceChoices, RunOptions,
                                  SamplerOptions, results_dir)
from vcdm.paths import check_writable


class IncompatibleModels(GenerateError):
    """A prior and an image model that cannot be chained."""


def check_chain(prior: CheckpointConfig, image: CheckpointConfig, *, prior_name: str = "prior",
                image_name: str = "image model", class_idx: int | None = None) -> None:
    """Refuse a prior/image-model pair whose tensors, shapes or embedders do not line up (by their
    checkpoints' configs)."""
    ps, its = prior.structure_object(), image.structure_object()
    if "image" in ps.latent_names:
        raise IncompatibleModels(f"--prior {prior_name} generates images, not embeddings; pass it as --image-model")
    if "image" not in its.latent_names:
        raise IncompatibleModels(f"--image-model {image_name} does not generate images "
                                 f"(it generates {list(its.latent_names)})")
    produced = set(ps.latent_names) | set(ps.observed_names)
    for name in its.observed_names:
        if name not in produced:
            if name == "label" and class_idx is not None:
                continue
            hint = " (pass --class)" if name == "label" else ""
            raise IncompatibleModels(f"{image_name} is conditioned on '{name}', which {prior_name} does not "
                                     f"produce{hint}")
        if ps.shape(name) != its.shape(name):
            raise IncompatibleModels(f"dimension mismatch: {prior_name} produces '{name}' of shape {ps.shape(name)}, "
                                     f"{image_name} expects {its.shape(name)}")
    if "embedding" not in its.observed_names:
        return

    try:
        compatible(prior.embedder, image.embedder)
    except ValueError as e:
        raise IncompatibleModels(f"{prior_name} and {image_name} cannot be chained: {e}") from None


def stage_classes(structures: Sequence[Structure], class_idx: int | None, models: str) -> list[int | None]:
    """``class_idx`` for each stage conditioned on a label, else None; FlagError if no stage is (``models``:
    how the error names the pair)."""
    labelled = ["label" in s.observed_names for s in structures]
    if class_idx is not None and not any(labelled):
        raise FlagError(f"--class: {models} is conditioned on a class label")
    return [class_idx if has else None for has in labelled]


def chain_classes(prior: CheckpointConfig, image: CheckpointConfig, class_idx: int | None, *,
                  prior_name: str = "prior", image_name: str = "image model", models: str = "neither model") -> list[int | None]:
    """The checks of a two-stage chain (``check_chain``) and each stage's class (``stage_classes``): what
    `vcdm sample` and ``TwoStagePipeline`` decide before either stage samples."""
    check_chain(prior, image, prior_name=prior_name, image_name=image_name, class_idx=class_idx)
    return stage_classes([prior.structure_object(), image.structure_object()], class_idx, models)


@dataclass
class TwoStageResult:
    embeddings: GenerateResult
    images: GenerateResult


def sample_two_stage(prior: str | os.PathLike, image_model: str | os.PathLike, seeds: Sequence[int], *,
                     prior_opts: SamplerOptions = SamplerOptions(), image_opts: SamplerOptions = SamplerOptions(),
                     class_idx: int | None = None, increment_seeds: int = 0, run: RunOptions = RunOptions(),
                     device: str | torch.device | None = None,
                     inference: InferenceChoices | perf.InferenceSettings = InferenceChoices()) -> TwoStageResult:
    """Embeddings into ``<run.outdir>/embeddings`` and images into ``<run.outdir>/images`` — or, without
    ``run.outdir``, into the original release's results layout exactly as two ``generate`` runs would."""
    prior_cfg, image_cfg = read_checkpoint_config(prior), read_checkpoint_config(image_model)
    conditioned = chain_classes(prior_cfg, image_cfg, class_idx, prior_name=str(prior), image_name=str(image_model),
                                models=f"neither {prior} nor {image_model}")
    check_gnet(prior_cfg, prior, prior_opts, "--prior-gnet")  # both guides, before the first stage samples
    check_gnet(image_cfg, image_model, image_opts, "--image-gnet")
    seeds = check_seeds(seeds, run.max_batch_size)
    if run.outdir is not None:
        emb_dir, img_dir = Path(run.outdir) / "embeddings", Path(run.outdir) / "images"
    else:
        emb_dir = results_dir(prior, prior_opts, seeds, class_idx=conditioned[0], increment_seeds=increment_seeds)
        img_dir = results_dir(image_model, image_opts, seeds, class_idx=conditioned[1], load_obs_from=emb_dir,
                              increment_seeds=increment_seeds)
    for path in (emb_dir, img_dir):  # both stages' outputs, before the first one samples
        check_writable(path, "--outdir")
    if run.grid is not None:
        check_writable(run.grid, "--grid", is_dir=False)
    common = dict(increment_seeds=increment_seeds, device=device, inference=inference)
    with distributed.session(device):  # one process group for both stages
        emb = generate(prior, seeds, opts=prior_opts, cond=Conditioning(conditioned[0]),
                       run=replace(run, outdir=emb_dir, grid=None, flags="--prior-"), **common)
        img = generate(image_model, seeds, opts=image_opts,
                       cond=Conditioning(conditioned[1], load_obs_from=emb.outdir),
                       run=replace(run, outdir=img_dir, flags="--image-"), **common)
    return TwoStageResult(emb, img)
