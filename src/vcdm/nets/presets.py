"""Network presets for the release's ``--arch`` names and EDM2's, with the ``--cbase``/``--cres``/``--dropout`` overrides."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from vcdm.data.structure import Structure
from vcdm.nets import build_network
from vcdm.nets.control import class_columns
from vcdm.nets.film import film_preset
from vcdm.nets.layers import GroupNorm



@dataclass(frozen=True)
class EDM2Preset:
    """One of EDM2's configurations (its train_edm2.py ``--preset``): the network's width and dropout, and
    its recipe's numbers: ln(sigma) ~ N(P_mean, P_std^2), reference learning rate ``lr`` decaying after
    ``decay`` batches of ``batch`` images, training length ``duration`` in images."""
    channels: int
    dropout: float
    P_mean: float
    P_std: float
    lr: float
    decay: int
    batch: int = 2048
    duration: int = 1024 << 20


_IMG512 = dict(P_mean=-0.4, P_std=1.0, decay=70000)  # 64x64x4 latents of 512x512 images
_IMG64 = dict(P_mean=-0.8, P_std=1.6, decay=35000)  # 64x64 pixels
EDM2_PRESETS: dict[str, EDM2Preset] = {
    "edm2-img512-xxs": EDM2Preset(64, 0.00, lr=0.0170, duration=2048 << 20, **_IMG512),
    "edm2-img512-xs": EDM2Preset(128, 0.00, lr=0.0120, duration=2048 << 20, **_IMG512),
    "edm2-img512-s": EDM2Preset(192, 0.00, lr=0.0100, duration=2048 << 20, **_IMG512),
    "edm2-img512-m": EDM2Preset(256, 0.10, lr=0.0090, duration=2048 << 20, **_IMG512),
    "edm2-img512-l": EDM2Preset(320, 0.10, lr=0.0080, duration=1792 << 20, **_IMG512),
    "edm2-img512-xl": EDM2Preset(384, 0.10, lr=0.0070, duration=1280 << 20, **_IMG512),
    "edm2-img512-xxl": EDM2Preset(448, 0.10, lr=0.0065, duration=896 << 20, **_IMG512),
    "edm2-img64-xs": EDM2Preset(128, 0.00, lr=0.0120, duration=1024 << 20, **_IMG64),
    "edm2-img64-s": EDM2Preset(192, 0.00, lr=0.0100, duration=1024 << 20, **_IMG64),
    "edm2-img64-m": EDM2Preset(256, 0.10, lr=0.0090, duration=2048 << 20, **_IMG64),
    "edm2-img64-l": EDM2Preset(320, 0.10, lr=0.0080, duration=1024 << 20, **_IMG64),
    "edm2-img64-xl": EDM2Preset(384, 0.10, lr=0.0070, duration=640 << 20, **_IMG64),
}
EDM2_ARCHS = tuple(EDM2_PRESETS)
ARCHS = ("ddpmpp", "ncsnpp", "adm", "dalle2", "prior", "concatunet", "film-ddpmpp", "control-adm", *EDM2_ARCHS)
VECTOR_ARCHS = ("dalle2", "prior")  # transformers over embedding vectors
# The release's networks built from the whole structure (structure_preset): concatunet models every tensor
# (images and vectors) jointly; film-ddpmpp and control-adm are image U-Nets with their own conditioning.
STRUCTURE_ARCHS = ("concatunet", "film-ddpmpp", "control-adm")
JOINT_ARCHS = ("concatunet",)
DEFAULT_DROPOUT = 0.13  # train.py's --dropout default (EDM and the original release), applied to every U-Net

_SONG = {
    "ddpmpp": dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                   channel_mult_noise=1, resample_filter=[1, 1]),
    "ncsnpp": dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
}


class PresetError(ValueError):
    """An --arch / --cbase / --cres / resolution combination that cannot build a network."""


def preset(arch: str, *, resolution: int, channels: int, embed_dim: int, label_dim: int, augment_dim: int,
           cbase: int | None = None, cres: Sequence[int] | None = None,
           dropout: float | None = None) -> tuple[str, dict[str, Any]]:
    """(network class name, constructor kwargs) for `arch`.

    ddpmpp/ncsnpp: EDM's DDPM++/NCSN++ (cbase 128; cres 2,2,2 at every resolution, as the release's and
    EDM's train.py: their 64x64 models pass --cres=1,2,2,2 explicitly). adm: EDM's ADM (cbase 192, cres 1,2,3,4).
    dalle2: the original release's prior transformer over an `embed_dim` vector (dim 512, depth 6,
    8 heads x 64; it has no dropout, so --dropout is ignored with a warning, as the release ignores it).
    prior: vcdm's own prior transformer (same sizes; dropout 0 unless given). edm2-img64-* / edm2-img512-*:
    EDM2's U-Net with the width and dropout of EDM2's preset of that name (``EDM2_PRESETS``; cres 1,2,3,4,
    3 blocks per level, attention at 16x16 and 8x8), for pixels or latents alike. `label_dim` is the size
    of the conditioning vector (0: unconditional); `resolution`/`channels` are ignored for the priors
    and `embed_dim` for the U-Nets.
    """
    if arch not in ARCHS:
        raise PresetError(f"--arch: unknown architecture '{arch}' (expected one of {', '.join(ARCHS)})")
    if arch in STRUCTURE_ARCHS:
        raise PresetError(f"--arch={arch} is built from the whole structure: use structure_preset")
    if dropout is not None and not 0 <= dropout <= 1:
        raise PresetError(f"--dropout: expected a probability in [0, 1], got {dropout}")
    if label_dim < 0 or augment_dim < 0:
        raise PresetError(f"label_dim and augment_dim must be >= 0, got {label_dim} and {augment_dim}")
    if arch in VECTOR_ARCHS:
        if embed_dim <= 0:
            raise PresetError(f"--arch={arch} generates one embedding vector; expected its size > 0, got {embed_dim}")
        if cbase is not None or cres is not None:
            raise PresetError(f"--cbase/--cres apply to the U-Nets (ddpmpp, ncsnpp, adm), not to --arch={arch}")
        sizes = dict(embed_dim=embed_dim, augment_dim=augment_dim, dim=512, depth=6, heads=8, dim_head=64)
        if arch == "prior":
            return "PriorTransformer", dict(sizes, label_dim=label_dim, dropout=0.0 if dropout is None else dropout)
        if dropout:
            print(f"warning: --dropout={dropout} is ignored: --arch=dalle2 has no dropout (as in the original "
                  "release); use --arch=prior for a prior with dropout", file=sys.stderr)
        return "DALLE2Prior", dict(sizes, cond_dim=label_dim)
    if arch in EDM2_ARCHS:
        return edm2_preset(arch, resolution=resolution, channels=channels, label_dim=label_dim,
                           augment_dim=augment_dim, cbase=cbase, cres=cres, dropout=dropout)

    if arch == "adm":
        default_cbase, default_cres = 192, [1, 2, 3, 4]
    else:
        default_cbase, default_cres = 128, [2, 2, 2]
    cbase = default_cbase if cbase is None else cbase
    cres = default_cres if cres is None else list(cres)
    _check_unet(arch, resolution, channels, cbase, cres)
    kwargs = dict(img_resolution=resolution, in_channels=channels, out_channels=channels, label_dim=label_dim,
                  augment_dim=augment_dim, model_channels=cbase, channel_mult=cres,
                  dropout=DEFAULT_DROPOUT if dropout is None else dropout)
    name, kwargs = ("DhariwalUNet", kwargs) if arch == "adm" else ("SongUNet", {**kwargs, **_SONG[arch]})
    _check_group_norms(name, kwargs)
    return name, kwargs


def edm2_preset(arch: str, *, resolution: int, channels: int, label_dim: int, augment_dim: int,
                cbase: int | None = None, cres: Sequence[int] | None = None,
                dropout: float | None = None) -> tuple[str, dict[str, Any]]:
    """EDM2's U-Net as EDM2's train_edm2.py builds it for preset `arch`, at the data's resolution and channels."""
    if augment_dim:
        raise PresetError(f"--arch={arch}: EDM2's U-Net has no augmentation input (EDM2 trains without "
                          "augmentation); use --augment=0")
    config = EDM2_PRESETS[arch]
    cbase = config.channels if cbase is None else cbase
    cres = [1, 2, 3, 4] if cres is None else list(cres)
    _check_unet(arch, resolution, channels, cbase, cres)
    for level, mult in enumerate(cres):  # as EDM2: width // 64 heads (none below 64 channels), equal widths
        res, width = resolution >> level, cbase * mult
        if (res in (16, 8) or level == len(cres) - 1) and width >= 64 and width % (width // 64):
            raise PresetError(f"--cbase/--cres: EDM2's U-Net splits the {width} channels at {res}x{res} into "
                              f"{width // 64} attention heads, which does not divide them (use a multiple of 64)")
    return "EDM2UNet", dict(img_resolution=resolution, img_channels=channels, label_dim=label_dim, model_channels=cbase,
                            channel_mult=cres, dropout=config.dropout if dropout is None else dropout)


def structure_preset(arch: str, structure: Structure, *, augment_dim: int, cbase: int | None = None,
                     cres: Sequence[int] | None = None, dropout: float | None = None) -> tuple[str, dict[str, Any]]:
    """(network class name, constructor kwargs) of the release's concatunet, film-ddpmpp or control-adm."""
    if dropout is not None and not 0 <= dropout <= 1:
        raise PresetError(f"--dropout: expected a probability in [0, 1], got {dropout}")
    if arch == "concatunet":
        return concatunet_preset(structure, augment_dim=augment_dim, cbase=cbase, cres=cres, dropout=dropout)
    if structure.latent_names != ("image",) or not structure.observed_names or len(structure.shape("image")) != 3:
        raise PresetError(f"--arch={arch} generates the image given vectors, but the structure generates "
                          f"{list(structure.latent_names)} given {list(structure.observed_names)}")
    channels, resolution, _ = structure.shape("image")
    drop = DEFAULT_DROPOUT if dropout is None else dropout
    if arch == "film-ddpmpp":
        kwargs = film_preset(resolution=resolution, channels=channels, cond_dim=structure.observed_dim,
                             augment_dim=augment_dim, cbase=cbase, cres=cres, dropout=drop)
        name = "FilmSongUNet"
    elif arch == "control-adm":
        columns = class_columns(structure)
        if columns is None or columns[1] == structure.observed_dim:
            raise PresetError("--arch=control-adm conditions a class-conditional ADM on new tensors: observe the "
                              "label and at least one other tensor (e.g. LabelledCLIPDataset --observed 0,1,1)")
        kwargs = dict(img_resolution=resolution, in_channels=channels, out_channels=channels,
                      cond_dim=structure.observed_dim, class_columns=list(columns), augment_dim=augment_dim,
                      model_channels=192 if cbase is None else cbase,
                      channel_mult=[1, 2, 3, 4] if cres is None else list(cres), dropout=drop)
        name = "ControlDhariwalUNet"
    else:
        raise PresetError(f"--arch: unknown architecture '{arch}' (expected one of {', '.join(STRUCTURE_ARCHS)})")
    _check_unet(arch.split("-")[-1], resolution, channels, kwargs["model_channels"], kwargs["channel_mult"])
    _check_group_norms(name, kwargs)
    return name, kwargs


def concatunet_preset(structure: Structure, *, augment_dim: int, cbase: int | None = None,
                      cres: Sequence[int] | None = None, dropout: float | None = None) -> tuple[str, dict[str, Any]]:
    """The release's ``--arch concatunet`` over the structure's existing tensors: cbase 128, cres 2,2,2,
    embedding and noise-embedding multipliers 4, its 'shitty' embedding blocks."""
    names = [n for n, e in zip(structure.names, structure.exist) if e]
    shapes, observed = [structure.shape(n) for n in names], [n in structure.observed_names for n in names]
    images = [s for s in shapes if len(s) == 3]
    resolution, channels = (images[0][2], sum(s[0] for s in images)) if images else (32, 1)
    cbase, cres = 128 if cbase is None else cbase, [2, 2, 2] if cres is None else list(cres)
    if dropout is not None and not 0 <= dropout <= 1:
        raise PresetError(f"--dropout: expected a probability in [0, 1], got {dropout}")
    _check_unet("concatunet", resolution, channels, cbase, cres)
    kwargs = dict(shapes=[list(s) for s in shapes], observed=[bool(o) for o in observed], augment_dim=augment_dim,
                  model_channels=cbase, channel_mult=cres, channel_mult_emb=4, channel_mult_noise=4,
                  dropout=DEFAULT_DROPOUT if dropout is None else dropout, emb_layer_type="shitty")
    try:
        _check_group_norms("ConcatUNet", kwargs)
    except PresetError:
        raise
    except ValueError as e:  # tensors ConcatUNet cannot take (e.g. images of different sizes)
        raise PresetError(f"--arch=concatunet: {e}") from None
    return "ConcatUNet", kwargs


def _check_unet(arch: str, resolution: int, channels: int, cbase: int, cres: list[int]) -> None:
    if channels <= 0:
        raise PresetError(f"--arch={arch}: expected images with >= 1 channel, got {channels}")
    if cbase <= 0 or not cres or min(cres) <= 0:
        raise PresetError(f"--cbase/--cres: expected positive integers, got cbase={cbase}, cres={cres}")
    levels = len(cres)
    if resolution <= 0 or resolution % 2 ** (levels - 1):
        raise PresetError(f"--cres: {levels} levels halve the resolution {levels - 1} times, so it must be a "
                          f"multiple of {2 ** (levels - 1)}; got {resolution}x{resolution} (use fewer --cres entries)")
    if arch == "adm":
        for level, mult in enumerate(cres):
            res = resolution >> level
            if (res in (32, 16, 8) or level == levels - 1) and (cbase * mult) % 64:
                raise PresetError(f"--cbase/--cres: ADM attends with 64 channels per head, but {res}x{res} "
                                  f"has {cbase * mult} channels (use a multiple of 64)")


def _check_group_norms(name: str, kwargs: dict[str, Any]) -> None:
    """Every GroupNorm needs min(32, channels // 4) >= 1 groups dividing its channels (built on the meta device)."""
    with torch.device("meta"):
        net = build_network(name, kwargs)
    bad = sorted({m.weight.shape[0] for m in net.modules()
                  if isinstance(m, GroupNorm) and (m.num_groups == 0 or m.weight.shape[0] % m.num_groups)})
    if bad:
        raise PresetError(f"--cbase/--cres: GroupNorm cannot split {bad} channels into min(32, channels/4) "
                          f"equal groups; use a multiple of 32 for --cbase")
