"""Build what a training run needs from its options: dataset, embedder, Structure, network, denoiser,
loss, optimiser, augmentation, and the checkpoint config that records them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vcdm import distributed as dist
from vcdm.checkpoints import CheckpointConfig
from vcdm.data.dataset import ImageDataset
from vcdm.data.structure import Structure
from vcdm.diffusion.augment import edm_augment_pipe
from vcdm.diffusion.consistency import ECTLoss
from vcdm.diffusion.distillation import DistillLoss
from vcdm.diffusion.dmd import DMDLoss, sampler_levels
from vcdm.diffusion.loss import EDM2Loss, EDMLoss, VELoss, VPLoss
from vcdm.diffusion.settings import CONSISTENCY_DEFAULT_STEPS
from vcdm.embedders import PRETRAINED, FitOptions, PCAOptions, PostProcessOptions, build_embedder
from vcdm.embedders.base import default_cache_dir
from vcdm.nets import build_network
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import STRUCTURE_ARCHS, VECTOR_ARCHS, preset, structure_preset
from vcdm.train.finetune import pretrained_edm2_gains
from vcdm.train.options import OptionError, TrainOptions
from vcdm.train.recipe import resolve

FIT_SEED = 0  # embedder fits use a fixed seed, so a prior and an image model trained apart share them
LOGVAR_CHANNELS = 128  # --precond edm2: the learned uncertainty's Fourier features, as EDM2's Precond
ADAM_EPS = 1e-8


@dataclass
class Setup:
    dataset: Any
    embedder: Any
    structure: Structure
    denoiser: Any
    net_class: str
    net_kwargs: dict[str, Any]
    loss_fn: Any
    augment_pipe: Any
    cache_dir: Path
    data_key: str

    def config(self, training: dict[str, Any]) -> CheckpointConfig:
        """The checkpoint config of this run's snapshots (``training``: the options they record)."""
        d = self.dataset
        return CheckpointConfig(
            network=self.net_class, net_kwargs=self.net_kwargs, denoiser=self.denoiser.config(),
            structure=self.structure.to_dict(), embedder=None if self.embedder is None else self.embedder.identity(),
            data={"data_class": training["data_class"], "path": training["path"], "resolution": d.resolution,
                  "num_channels": d.num_channels, "label_dim": d.label_dim, "name": d.name,
                  "class_names": getattr(d, "class_names", None)},
            training=training, sampler=tuned_sampler(training, self.denoiser))


def tuned_sampler(training: dict[str, Any], denoiser: Denoiser) -> dict[str, Any] | None:
    """What a consistency-tuned model records as its default sampler (None for diffusion training): its steps, and the
    levels DMD trained where they are not Karras's (vcdm.diffusion.dmd.sampler_levels)."""
    if not training.get("tune"):
        return None
    if training["tune"] != "dmd":
        return {"name": "consistency", "num_steps": CONSISTENCY_DEFAULT_STEPS}
    steps = training.get("dmd_steps", CONSISTENCY_DEFAULT_STEPS)
    levels = sampler_levels(steps, denoiser, training.get("dmd_levels"))
    return {"name": "consistency", "num_steps": steps, **({"levels": list(levels)} if levels else {})}


def data_key(path: str | os.PathLike, dataset) -> str:
    """Names one version of a dataset for caches: path, size and modification time."""
    st = Path(path).stat()
    return f"{Path(path).resolve()}|{len(dataset)}|{st.st_size}|{st.st_mtime_ns}"


def open_dataset(opts: TrainOptions):
    names = opts.tensor_names
    exist = opts.exist_flags
    use_labels = "label" in names and len(exist) == len(names) and exist[names.index("label")] == 1
    if not Path(opts.path).exists():
        raise OptionError(f"--path: {opts.path} does not exist (expected a dataset zip or folder)")
    dataset = ImageDataset(opts.path, use_labels=use_labels, xflip=opts.xflip, cache=opts.cache)
    if use_labels and not dataset.has_labels:
        raise OptionError(f"--exist: the label tensor is used but {opts.path} has no labels in dataset.json")
    return dataset


def embedding_option(values: list[int], flag: str, names: tuple[str, ...]) -> int:
    """The release gives --n_comp/--n_clusters per tensor; only the embedding's entry can be non-zero here."""
    vals = list(values)
    if len(vals) == 1:
        return vals[0]
    if len(vals) != len(names) or "embedding" not in names:
        raise OptionError(f"{flag}: expected one value or one per tensor {list(names)}, got '{','.join(map(str, vals))}'")
    if any(v for v, n in zip(vals, names) if n != "embedding"):
        raise OptionError(f"{flag}: post-processing applies to the embedding only, got '{','.join(map(str, vals))}'")
    return vals[names.index("embedding")]


def make_embedder(opts: TrainOptions, dataset, device: torch.device, cache_dir: Path, key: str):
    """Build the embedder; data-fitted ones are fitted once (process 0 first, the others read its cache)."""
    name = opts.embedder_name
    if name is None:
        return None
    post = PostProcessOptions(n_comp=embedding_option(opts.n_comp, "--n_comp", opts.tensor_names),
                              n_clusters=embedding_option(opts.n_clusters, "--n_clusters", opts.tensor_names))
    fit = FitOptions(seed=FIT_SEED, cache_dir=cache_dir if _writable(cache_dir) else None, data_key=key,
                     progress=dist.rank() == 0)
    kwargs = dict(clip_weights=opts.clip_weights, device=device, trainable=opts.train_embedder, data=dataset,
                  pca=PCAOptions(dim=opts.pca_dim), post=post, fit=fit)
    if dist.rank() != 0:
        dist.barrier()
    embedder = build_embedder(name, **kwargs)
    if dist.rank() == 0:
        dist.barrier()
    return embedder


def _writable(cache_dir: Path) -> bool:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        return os.access(cache_dir, os.W_OK)
    except OSError:
        return False


def embedding_dim(opts: TrainOptions) -> int:
    """The embedding size the options give, without building the embedder (0: no embedding)."""
    if opts.embedder_name is None:
        return 0
    names = opts.tensor_names
    base = PRETRAINED.get(opts.embedder_name, opts.pca_dim)
    return (embedding_option(opts.n_clusters, "--n_clusters", names)
            or embedding_option(opts.n_comp, "--n_comp", names) or base)


def make_structure(opts: TrainOptions, dataset, embed_dim: int) -> Structure:
    shapes = {"image": (dataset.num_channels, dataset.resolution, dataset.resolution),
              "embedding": (embed_dim,), "label": (dataset.label_dim,)}
    return Structure.from_flags({n: shapes[n] for n in opts.tensor_names}, opts.exist_flags, opts.observed)


def default_arch(structure: Structure) -> str:
    return "ddpmpp" if structure.latent_names == ("image",) else "dalle2"


def make_network(opts: TrainOptions, structure: Structure, augment_dim: int) -> tuple[str, dict[str, Any]]:
    arch = opts.arch or default_arch(structure)
    if arch in STRUCTURE_ARCHS:
        cres = list(opts.cres) if opts.cres else None
        return structure_preset(arch, structure, augment_dim=augment_dim, cbase=opts.cbase, cres=cres,
                                dropout=opts.dropout)
    image_latent = structure.latent_names == ("image",)
    if arch in VECTOR_ARCHS and "image" in structure.latent_names:
        raise OptionError(f"--arch={arch} models embedding vectors, but the image is generated; use "
                          "--arch=ddpmpp|ncsnpp|adm, or observe the image")
    if arch not in VECTOR_ARCHS and not image_latent:
        raise OptionError(f"--arch={arch} is an image U-Net, but the generated tensors are "
                          f"{list(structure.latent_names)}; use --arch=dalle2 (or prior) for embeddings")
    res = structure.shape("image")[1] if "image" in structure.names else 0
    chans = structure.shape("image")[0] if "image" in structure.names else 0
    cres = list(opts.cres) if opts.cres else None
    name, kwargs = preset(arch, resolution=res, channels=chans, embed_dim=0 if image_latent else structure.latent_dim,
                          label_dim=structure.observed_dim, augment_dim=augment_dim, cbase=opts.cbase, cres=cres,
                          dropout=opts.dropout)
    if arch in VECTOR_ARCHS:
        kwargs.update({k: v for k, v in (("dim", opts.prior_dim), ("depth", opts.prior_depth)) if v is not None})
    elif opts.prior_dim is not None or opts.prior_depth is not None:
        raise OptionError("--prior-dim/--prior-depth apply to --arch=dalle2|prior only")
    if name == "EDM2UNet" and opts.pretrained_weights:
        kwargs.update(pretrained_edm2_gains(opts.pretrained_weights, kwargs["label_dim"], kwargs.get("label_balance", 0.5)))
    return name, kwargs


def make_loss(opts: TrainOptions):
    """The loss of resolved options: the diffusion loss, or with --tune the tuning method's (ect/ecd over the
    run's --duration; the teacher, for ecd, kd and dmd, is set once the weights are)."""
    if opts.tune == "dmd":  # the fake denoiser learns the sampler's outputs (their conditioning dropped already)
        return DMDLoss(diffusion_loss(opts, cond_drop=0.0), steps=opts.dmd_steps, fake_updates=opts.fake_updates,
                       fake_lr=opts.fake_lr, gan_weight=opts.gan_weight, gan_lr=opts.gan_lr,
                       cond_drop=opts.cond_drop, guidance=opts.guidance, levels=opts.dmd_levels)
    if opts.tune == "kd":
        return DistillLoss(P_mean=opts.P_mean, P_std=opts.P_std, cond_drop=opts.cond_drop, teacher_steps=opts.teacher_steps)
    if opts.tune is not None:
        return ECTLoss(round(opts.duration * 1e6), P_mean=opts.P_mean, P_std=opts.P_std, q=opts.ect_q, k=opts.ect_k,
                       b=opts.ect_b, stages=opts.ect_stages, cond_drop=opts.cond_drop)
    return diffusion_loss(opts)


def diffusion_loss(opts: TrainOptions, cond_drop: float | None = None):
    """EDM's loss, EDM2's (with P_mean/P_std), VP's or VE's; ``cond_drop``: instead of --cond-drop."""
    drop = opts.cond_drop if cond_drop is None else cond_drop
    if opts.precond in ("edm", "edm2"):
        loss = EDM2Loss if opts.precond == "edm2" else EDMLoss
        return loss(P_mean=opts.P_mean, P_std=opts.P_std, cond_drop=drop)
    return {"vp": VPLoss, "ve": VELoss}[opts.precond](cond_drop=drop)


def make_denoiser(opts: TrainOptions, net: torch.nn.Module, structure: Structure):
    """EDM2's preconditioning is EDM's plus the learned uncertainty head (--precond edm2)."""
    edm2 = opts.precond == "edm2"
    return Denoiser(net, structure, kind="edm" if edm2 else opts.precond, noise_mult=opts.noise_mult,
                    pred_x0=opts.pred_x0, logvar_channels=LOGVAR_CHANNELS if edm2 else 0)


def make_optimizer(params, opts: TrainOptions) -> torch.optim.Adam:
    """Adam with the resolved options' learning rate and betas (eps 1e-8, as EDM and EDM2)."""
    return torch.optim.Adam(params, lr=opts.lr, betas=tuple(opts.adam_betas), eps=ADAM_EPS)


def build(opts: TrainOptions, device: torch.device) -> Setup:
    opts = resolve(opts)
    dataset = open_dataset(opts)
    key = data_key(opts.path, dataset)
    cache_dir = default_cache_dir(opts.path)
    embedder = make_embedder(opts, dataset, device, cache_dir, key)
    structure = make_structure(opts, dataset, embedder.dim if embedder is not None else 0)
    augment_pipe = edm_augment_pipe(opts.augment) if opts.augment > 0 else None
    if augment_pipe is not None and "image" not in structure.names:
        raise OptionError("--augment: augmentation needs images")
    augment_dim = augment_pipe.label_dim if augment_pipe is not None else 0
    net_class, net_kwargs = make_network(opts, structure, augment_dim)
    net = build_network(net_class, net_kwargs)
    denoiser = make_denoiser(opts, net, structure)
    return Setup(dataset, embedder, structure, denoiser.to(device), net_class, net_kwargs, make_loss(opts),
                 augment_pipe, cache_dir, key)
