"""Networks (EDM's and EDM2's parameter names) and the preconditioned denoiser that wraps them."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from vcdm.nets.adm import DhariwalUNet
from vcdm.nets.concatunet import ConcatUNet
from vcdm.nets.control import ControlDhariwalUNet
from vcdm.nets.dalle2 import DALLE2Prior
from vcdm.nets.edm2 import EDM2UNet
from vcdm.nets.film import FilmSongUNet
from vcdm.nets.prior import PriorTransformer
from vcdm.nets.songunet import SongUNet


def network_classes() -> dict[str, type[nn.Module]]:
    return {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet, "PriorTransformer": PriorTransformer,
            "DALLE2Prior": DALLE2Prior, "ConcatUNet": ConcatUNet,
            "FilmSongUNet": FilmSongUNet, "ControlDhariwalUNet": ControlDhariwalUNet, "EDM2UNet": EDM2UNet}


def build_network(class_name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    classes = network_classes()
    if class_name not in classes:
        raise ValueError(f"unknown network class '{class_name}' (known: {', '.join(classes)})")
    return classes[class_name](**kwargs)


def bottleneck(net: nn.Module) -> nn.Module:
    """The module whose output sums up the network's input at its coarsest: a U-Net's middle block (the end of its
    lowest-resolution ``in0``/``in1`` pair), a prior transformer's final norm (of its output token). DMD2's
    discriminator reads it."""
    if isinstance(net, PriorTransformer):
        return net.norm
    if isinstance(net, DALLE2Prior):
        return net.causal_transformer.norm
    middle = [block for name, block in getattr(net, "dec", {}).items() if "_in1" in name]
    if not middle:
        raise ValueError(f"{type(net).__name__}: no bottleneck known for a discriminator")
    return middle[0]
