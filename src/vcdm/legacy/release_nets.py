"""The original VCDM release's image networks with their own conditioning → vcdm's:
``ConcatUNet`` → ConcatUNet, ``FilmWrappedOriginalSongUNet`` → FilmSongUNet, ``ControlledDhariwalUNet`` →
ControlDhariwalUNet. Parameter names are the same, so the state dict maps as it is; the geometry comes
from the release's recorded Structure (its networks derive it from there too).
"""
from __future__ import annotations


import torch

from vcdm.checkpoints import CheckpointConfig
from vcdm.data.structure import Structure
from vcdm.legacy.records import LegacyError
from vcdm.legacy.release import release_to_vcdm
from vcdm.nets.control import class_columns

RELEASE_NETS = {"ConcatUNet": "ConcatUNet", "FilmWrappedOriginalSongUNet": "FilmSongUNet",
                "ControlledDhariwalUNet": "ControlDhariwalUNet"}
_SONG_TYPES = {"encoder_type": "standard", "decoder_type": "standard", "softmax_onehot": False}
_DROPPED = ("structure", "softmax_onehot", "encoder_type", "decoder_type", "label_dim")


def is_release_net(net_class: str) -> bool:
    return net_class.rsplit(".", 1)[-1] in RELEASE_NETS


def _existing(structure: Structure) -> tuple[list[tuple[int, ...]], list[bool]]:
    names = [n for n, e in zip(structure.names, structure.exist) if e]
    return [structure.shape(n) for n in names], [n in structure.observed_names for n in names]


def release_net_kwargs(record, structure: Structure) -> tuple[str, dict]:
    """(vcdm class, constructor kwargs) for a recorded release network generating `structure`."""
    name = record.net_class.rsplit(".", 1)[-1]
    recorded = dict(record.net_kwargs)
    for key, supported in _SONG_TYPES.items():
        if key in recorded and recorded[key] != supported:
            raise LegacyError(f"{record.path}: {name} was built with {key}={recorded[key]!r}, which vcdm does not "
                              f"implement (only {supported!r})")
    kwargs = {k: v for k, v in recorded.items() if k not in _DROPPED}
    shapes, observed = _existing(structure)
    if name == "ConcatUNet":
        return "ConcatUNet", dict(shapes=[list(s) for s in shapes], observed=observed, **kwargs)
    if len(shapes[0]) != 3 or structure.latent_names != ("image",):
        raise LegacyError(f"{record.path}: {name} generates the image; the recorded structure generates "
                          f"{list(structure.latent_names)}")
    geometry = dict(img_resolution=shapes[0][2], in_channels=shapes[0][0], out_channels=shapes[0][0])
    if name == "FilmWrappedOriginalSongUNet":
        return "FilmSongUNet", dict(geometry, cond_dim=structure.observed_dim, **kwargs)
    columns = class_columns(structure)
    if columns is None:
        raise LegacyError(f"{record.path}: {name} needs an observed class label in the structure")
    return "ControlDhariwalUNet", dict(geometry, cond_dim=structure.observed_dim, class_columns=list(columns), **kwargs)


def release_net_to_vcdm(record, structure: Structure | None = None) -> tuple[CheckpointConfig, dict[str, torch.Tensor]]:
    """vcdm checkpoint config and network state dict for one of the release's networks above."""
    archs = {"ConcatUNet": "concatunet", "FilmSongUNet": "film-ddpmpp", "ControlDhariwalUNet": "control-adm"}
    return release_to_vcdm(record, structure, release_net_kwargs, archs)
