"""A guiding network (``--gnet``) for generation: checked against the model it guides before any weights
load, named by its content in results folders, and called with the model's conditioning or, when it
is unconditional, with none."""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

from vcdm.checkpoints import CheckpointConfig, read_checkpoint_config
from vcdm.data.structure import Structure
from vcdm.embedders import compatible
from vcdm.generate.options import GenerateError
from vcdm.generate.results import network_sha256

DATA_FIELDS = ("resolution", "num_channels", "name")  # training data facts a guide must share, where both record them
LABEL_FIELDS = ("label_dim", "class_names")           # ... and these when it is conditional too


class IncompatibleGuide(GenerateError):
    """A guiding network that cannot guide the model: other tensors, noise, embedder or data."""


def read_guide_config(path: str | os.PathLike, flag: str = "--gnet") -> CheckpointConfig:
    try:
        return read_checkpoint_config(path)
    except ValueError as e:
        raise GenerateError(f"{flag}: {e}") from None


def check_guide(net: CheckpointConfig, guide: CheckpointConfig, *, net_name: str = "the model", guide_name: str = "the guide",
                flag: str = "--gnet") -> None:
    """Refuse a guide (by the checkpoints' configs) that does not model the same tensors under the
    same noise, embedder and data as the network. Its conditioning must be the network's, or none (an
    unconditional guide: classifier-free guidance by a second network)."""
    ns, gs = net.structure_object(), guide.structure_object()
    where = f"{flag} {guide_name}"
    if _shapes(gs, gs.latent_names) != _shapes(ns, ns.latent_names):
        raise IncompatibleGuide(f"{where} generates {_shapes(gs, gs.latent_names)}, but {net_name} generates "
                                f"{_shapes(ns, ns.latent_names)}")
    conditional = bool(gs.observed_names)
    if conditional and _shapes(gs, gs.observed_names) != _shapes(ns, ns.observed_names):
        raise IncompatibleGuide(f"{where} is conditioned on {_shapes(gs, gs.observed_names)}, {net_name} on "
                                f"{_shapes(ns, ns.observed_names)}; a guide takes the same conditioning or none")
    mult = [s.per_tensor(c.denoiser.get("noise_mult"), "--noise_mult", 1.0) for c, s in ((net, ns), (guide, gs))]
    if not torch.equal(*mult):
        raise IncompatibleGuide(f"{where} is trained with --noise_mult {guide.denoiser.get('noise_mult')}, "
                                f"{net_name} with {net.denoiser.get('noise_mult')}: their noise levels differ")
    if all("embedding" in s.latent_names + s.observed_names for s in (ns, gs)):
        try:
            compatible(net.embedder, guide.embedder)
        except ValueError as e:
            raise IncompatibleGuide(f"{where} cannot guide {net_name}: {e}") from None
    fields = DATA_FIELDS + (LABEL_FIELDS if conditional else ())
    for key in fields:
        a, b = net.data.get(key), guide.data.get(key)
        if a is not None and b is not None and a != b:
            raise IncompatibleGuide(f"{where} was trained on other data: its {key} is {b!r}, {net_name}'s {a!r}")


def _shapes(structure: Structure, names: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(structure.shape(n)) for n in names}


def guide_digest(path: str | os.PathLike, flag: str = "--gnet") -> str:
    """The guide's SHA-256 (what results folders and manifests record, so that two guides never share one)."""
    try:
        return network_sha256(path)
    except OSError as e:
        raise GenerateError(f"{flag} {path}: cannot read the file ({e.strerror or e})") from None


class Unconditional:
    """A guide without conditioning inputs, called as the guided network is: ``y`` is dropped."""

    def __init__(self, denoiser: Callable[..., torch.Tensor]):
        self.denoiser = denoiser

    def __call__(self, x: torch.Tensor, sigma: Any, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoiser(x, sigma, None)
