"""Training options: one flat, JSON-able record with the original release's names and defaults.

Defaults are EDM's / the original release's train.py: 200 Mimg, global batch 512, Adam lr 1e-3
(betas 0.9/0.999, eps 1e-8) ramped up linearly over 10 Mimg, EMA half-life 0.5 Mimg ramped up with
ratio 0.05, dropout 0.13, augmentation probability 0.12, a tick per 50 kimg, snapshots and training
states every 50 ticks (the release's value; EDM's state interval is 500).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from vcdm.data.structure import DATA_CLASS_TENSORS

ARCHS = ("ddpmpp", "ncsnpp", "adm", "dalle2", "prior", "concatunet")
PRECONDS = ("edm", "vp", "ve")
EMBEDDERS = ("clip-vit-b32", "pixel-pca")


class OptionError(ValueError):
    """Options that cannot work together; the message names the flag."""


def default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


@dataclass
class TrainOptions:
    # Data and structure.
    path: str = ""
    data_class: str = "CLIPDataset"
    exist: str | None = None
    observed: str = ""
    xflip: bool = False
    cache: bool = True
    # Embedder.
    embedder: str | None = None
    clip_weights: str | None = None
    n_comp: str = "0"
    n_clusters: str = "0"
    pca_dim: int = 64
    train_embedder: bool = False
    embed_cache: bool = True
    # Model.
    arch: str | None = None
    precond: str = "edm"
    pred_x0: str = "0"
    noise_mult: str = "1"
    equally_weight_tensors: bool = False
    cbase: int | None = None
    cres: str | None = None
    prior_dim: int | None = None
    prior_depth: int | None = None
    dropout: float | None = None  # None: 0.13 for the U-Nets (EDM), 0 for dalle2 (the release ignores it)
    augment: float = 0.12
    pretrained_weights: str | None = None
    freeze_pretrained: bool = False
    transfer: str | None = None
    # Optimisation.
    duration: float = 200.0
    batch: int = 512
    batch_gpu: int | None = None
    lr: float = 10e-4
    lr_rampup: float = 10000.0
    ema: float = 0.5
    ema_rampup: float = 0.05
    ls: float = 1.0
    fp16: bool = False
    bf16: bool = False
    bench: bool = True
    seed: int | None = None
    max_nonfinite: int = 10
    time_limit: float = 0.0  # seconds for this process (0: none); then stop as on SIGTERM
    # I/O.
    outdir: str = "training-runs"
    desc: str | None = None
    nosubdir: bool = False
    tick: float = 50
    snap: int = 50
    dump: int = 50
    sample: int = 50
    resume: str | None = None
    device: str | None = None
    workers: int = field(default_factory=default_workers)
    tensorboard: bool = False
    wandb_dir: str = "."
    resume_id: str | None = None
    dry_run: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return DATA_CLASS_TENSORS[self.data_class]

    @property
    def exist_flags(self) -> str:
        return self.exist if self.exist is not None else ",".join("1" * len(self.tensor_names))

    @property
    def uses_embedding(self) -> bool:
        names, bits = self.tensor_names, self.exist_flags.split(",")
        return "embedding" in names and len(bits) == len(names) and bits[names.index("embedding")].strip() == "1"

    @property
    def embedder_name(self) -> str | None:
        """The embedder actually used: none unless the embedding tensor exists."""
        if not self.uses_embedding:
            return None
        return self.embedder or "clip-vit-b32"

    def validate(self) -> None:
        """Checks that need neither the dataset nor the network; raise OptionError."""
        if not self.path:
            raise OptionError("--path: the dataset (zip or folder) is required")
        if self.data_class not in DATA_CLASS_TENSORS:
            raise OptionError(f"--data_class: expected one of {', '.join(DATA_CLASS_TENSORS)}, got '{self.data_class}'")
        if not self.observed:
            raise OptionError(f"--observed: required, one 0/1 per tensor of {self.data_class} {list(self.tensor_names)}")
        if self.arch is not None and self.arch not in ARCHS:
            raise OptionError(f"--arch: expected one of {', '.join(ARCHS)}, got '{self.arch}'")
        if self.precond not in PRECONDS:
            raise OptionError(f"--precond: expected one of {', '.join(PRECONDS)}, got '{self.precond}'")
        if self.embedder is not None and self.embedder not in EMBEDDERS:
            raise OptionError(f"--embedder: expected one of {', '.join(EMBEDDERS)}, got '{self.embedder}'")
        if self.fp16 and self.bf16:
            raise OptionError("--fp16 and --bf16: pick one")
        if self.transfer and self.resume:
            raise OptionError("--transfer and --resume cannot be specified at the same time")
        if self.transfer and self.pretrained_weights:
            raise OptionError("--transfer and --pretrained_weights cannot be specified at the same time")
        if self.freeze_pretrained and not self.pretrained_weights:
            raise OptionError("--freeze_pretrained needs --pretrained_weights")
        if self.batch_gpu is not None and self.batch_gpu > self.batch:
            raise OptionError(f"--batch-gpu {self.batch_gpu} is larger than --batch {self.batch}")
        if not self.tick > 0:
            raise OptionError(f"--tick: must be positive (kimg), got {self.tick}")
        if self.batch < 1:
            raise OptionError(f"--batch: must be at least 1, got {self.batch}")
        for name in ("snap", "dump", "sample"):
            if getattr(self, name) < 0:
                raise OptionError(f"--{name}: must be 0 (off) or a number of ticks, got {getattr(self, name)}")
        if not self.duration > 0:
            raise OptionError(f"--duration: must be positive (Mimg), got {self.duration}")
        if not (0 <= self.augment <= 1 and 0 <= (self.dropout or 0) <= 1):
            raise OptionError("--augment and --dropout: probabilities must lie in [0, 1]")
        if self.workers < 0 or self.max_nonfinite < 0 or self.time_limit < 0:
            raise OptionError("--workers, --max-nonfinite and --time-limit: must not be negative")
