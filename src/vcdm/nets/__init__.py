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


