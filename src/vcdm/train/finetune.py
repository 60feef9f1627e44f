"""Initialising a training network from other weights.

--pretrained_weights (the original release): every tensor must fit, except the new conditioning
input ``map_label`` which starts at zero, or, from a class-conditional network, is widened with the
class columns copied into the label's slice; --freeze_pretrained trains only that (vcdm.legacy does it).
EDM2's networks widen ``emb_label`` the same way, under gains fixed when the network is built
(`pretrained_edm2_gains`) so that the widened network starts as the pretrained one.
--transfer (EDM's): copy whatever tensors match by name and shape, leave the rest as initialised, and
run the EMA without ramp-up.
--init (vcdm tune): start from every network tensor of a vcdm checkpoint of the same network.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from vcdm import distributed as dist
from vcdm.checkpoints import load_tensors, read_checkpoint_config
from vcdm.data.structure import Structure
from vcdm.generate.core import load_model
from vcdm.generate.guide import Unconditional, check_guide, read_guide_config
from vcdm.legacy import pretrained as legacy_pretrained
from vcdm.legacy.edm import legacy_network
from vcdm.legacy.edm2 import edm2_network, is_edm2
from vcdm.legacy.records import LegacyError
from vcdm.legacy.unpickle import read_pickle
from vcdm.train.options import OptionError


def apply_pretrained_weights(path: str, net: nn.Module, *, freeze: bool, structure: Structure | None = None) -> None:
    """`structure` locates the class label in the conditioning, for widening a class-conditional
    ``map_label`` (EDM's ImageNet ADM fine-tuned on [embedding, label], as the release does)."""
    if not Path(path).is_file():
        raise OptionError(f"--pretrained_weights: {path} does not exist")
    try:
        report = legacy_pretrained.load_pretrained(path, net, freeze=freeze, structure=structure)
    except (LegacyError, ValueError) as e:
        raise OptionError(f"--pretrained_weights: {e}") from None
    dist.print0(f"Pretrained weights: {report}")


def pretrained_edm2_gains(path: str, label_dim: int, label_balance: float) -> dict[str, float]:
    """The EDM2UNet gains that make --pretrained_weights function-preserving (vcdm.legacy.pretrained.edm2_gains)."""
    if not Path(path).is_file():
        raise OptionError(f"--pretrained_weights: {path} does not exist")
    try:
        return legacy_pretrained.edm2_gains(path, label_dim, label_balance)
    except (LegacyError, ValueError) as e:
        raise OptionError(f"--pretrained_weights: {e}") from None


def source_tensors(path: str, flag: str = "--transfer") -> dict[str, torch.Tensor]:
    """The network tensors of a vcdm .safetensors checkpoint or an EDM/VCDM pickle (read safely)."""
    if not Path(path).is_file():
        raise OptionError(f"{flag}: {path} does not exist")
    try:
        if Path(path).suffix == ".safetensors":
            read_checkpoint_config(path)
            return load_tensors(path).get("net", {})
        obj = read_pickle(path)
        return (edm2_network(obj, path) if is_edm2(obj) else legacy_network(obj, path)).state_dict
    except ValueError as e:
        raise OptionError(f"{flag}: {e}") from None


def transfer(path: str, net: nn.Module) -> None:
    source = source_tensors(path)
    target = net.state_dict()
    copied = {k: v for k, v in source.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
    if not copied:
        raise OptionError(f"--transfer: no tensor of {path} matches this network by name and shape")
    net.load_state_dict(copied, strict=False)
    dist.print0(f"Transferred {len(copied)} of {len(target)} tensors from {path} "
                f"({len(target) - len(copied)} keep their initialisation)")


def initialise(path: str, net: nn.Module, role: str = "Initialised", flag: str = "--init") -> None:
    """Load every tensor of the checkpoint's network into ``net``, which must have exactly those (errors name ``flag``)."""
    source = source_tensors(path, flag)
    target = net.state_dict()
    wrong = sorted(k for k in target if k not in source or tuple(source[k].shape) != tuple(target[k].shape))
    extra = sorted(set(source) - set(target))
    if wrong or extra:
        name = (wrong or extra)[0]
        raise OptionError(f"{flag}: {path} is not this network ({len(wrong) + len(extra)} tensors differ, e.g. {name})")
    net.load_state_dict(source)
    dist.print0(f"{role} all {len(target)} tensors from {path}")


def frozen_guide(path: str, teacher: str, device: torch.device) -> Callable[..., torch.Tensor]:
    """--guide's network, frozen, refused (one line) as `vcdm generate --gnet` refuses a guide that cannot guide the
    teacher; an unconditional guide is called without the conditioning."""
    try:
        check_guide(read_checkpoint_config(teacher), read_guide_config(path, "--guide"), net_name=teacher,
                    guide_name=path, flag="--guide")
        guide = load_model(path, device)
    except ValueError as e:
        raise OptionError(str(e) if str(e).startswith("--guide") else f"--guide {path}: {e}") from None
    denoiser = guide.denoiser.eval().requires_grad_(False)
    dist.print0(f"Guide: loaded {path}")
    return denoiser if guide.structure.observed_names else Unconditional(denoiser)


def frozen_teacher(path: str, denoiser: nn.Module) -> nn.Module:
    """A frozen copy of ``denoiser`` holding the checkpoint's network: consistency distillation's teacher."""
    teacher = copy.deepcopy(denoiser)
    initialise(path, teacher.net, role="Teacher: loaded", flag="--teacher")
    return teacher.eval().requires_grad_(False)
