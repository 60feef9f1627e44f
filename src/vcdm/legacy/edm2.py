"""EDM2's network pickles → vcdm checkpoints, read through the restricted unpickler.

What such a file holds (facts of EDM2's format, read off NVlabs/edm2): ``pickle.dump`` of a
``dnnlib.EasyDict`` with ``ema`` (a ``Precond``: ``unet``, the ``UNet``, plus the uncertainty head
``logvar_fourier``/``logvar_linear``; weights in float16), ``encoder`` (``StandardRGBEncoder`` for pixels,
``StabilityVAEEncoder`` for latents) and, in the raw snapshots its training loop writes, ``loss_fn``
(``EDM2Loss``) and ``dataset_kwargs``. The post-hoc reconstructions are copies of a snapshot's dict.
Both are named ``<prefix>-<kimg:07d>-<std:.3f>.pkl``: the training time in thousands of images and
the EMA profile's relative standard deviation. All classes are EDM's "persistent" ones: a record of
class name, state and constructor arguments (the embedded source is never run, see ``unpickle``).

vcdm's :class:`~vcdm.nets.edm2.EDM2UNet` keeps EDM2's parameter names, so ``unet.<name>`` becomes the
network's ``<name>``, and the head keeps its names on the network too (``Denoiser(logvar_channels=…)``).
"""
from __future__ import annotations

import inspect
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from vcdm.checkpoints import CheckpointConfig, CheckpointError, _TensorCap, save_checkpoint, state_dict_mismatch
from vcdm.data.structure import Structure
from vcdm.legacy import edm
from vcdm.legacy.edm import LegacyNetwork, _module_tensors
from vcdm.legacy.limits import check_sample_size
from vcdm.legacy.records import LegacyError, Record, _plain
from vcdm.legacy.unpickle import PathLike, read_pickle
from vcdm.nets import build_network, network_classes
from vcdm.nets.edm2 import Block, EDM2UNet
from vcdm.nets.precond import Denoiser

PICKLE_NAME = re.compile(r"(.*)-(\d+)-(\d+\.\d+)\.pkl")  # EDM2's <prefix>-<kimg>-<std>.pkl
# StabilityVAEEncoder's constructor defaults (EDM2's training/encoders.py), for arguments a pickle omits.
VAE_DEFAULTS = {"vae_name": "stabilityai/sd-vae-ft-mse", "raw_mean": [5.81, 3.25, 0.12, -2.15],
                "raw_std": [4.17, 4.62, 3.71, 3.28], "final_mean": 0, "final_std": 0.5}
PIXEL_ENCODER = {"class": "StandardRGBEncoder"}
_PRECOND_ONLY = ("use_fp16", "sigma_data", "logvar_channels")
MAX_NAME = 4096           # characters of a recorded name or path
MAX_KWARGS_JSON = 1 << 16  # the recorded constructor arguments as JSON (EDM2's are a few hundred bytes)


@dataclass
class EDM2Network:
    """What an EDM2 pickle records: the U-Net's constructor arguments, the Precond's settings, the weights
    under vcdm's names (``unet.`` dropped), the encoder's identity and the training provenance."""
    path: str
    net_kwargs: dict[str, Any]
    sigma_data: float
    use_fp16: bool
    logvar_channels: int
    state_dict: dict[str, torch.Tensor]
    parameter_names: frozenset
    encoder: dict[str, Any]
    data_path: str | None = None     # the training dataset's, from dataset_kwargs
    loss: dict | None = None
    kimg: int | None = None            # from the file name, as EDM2's reconstruct_phema reads it
    std: float | None = None

    @property
    def nimg(self) -> int | None:
        """Training images before this snapshot: EDM2 names files by nimg // 1000 of a multiple of 1024."""
        return None if self.kimg is None else (self.kimg * 1000 + 999) // 1024 * 1024

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for k, t in self.state_dict.items() if k in self.parameter_names)

    @property
    def is_latent(self) -> bool:
        return self.encoder["class"] != PIXEL_ENCODER["class"]


def is_edm2(obj: Any) -> bool:
    """Whether an unpickled file is EDM2's: a dict whose ``ema`` is a Precond with a ``unet``."""
    ema = obj.get("ema") if isinstance(obj, dict) else None
    modules = ema.state.get("_modules") if isinstance(ema, Record) else None
    return ema is not None and ema.class_name == "Precond" and isinstance(modules, dict) and "unet" in modules


def _encoder(value: Any, path: str) -> dict[str, Any]:
    """The encoder's identity and constants; none recorded means pixels, as EDM2's generate_images assumes."""
    if value is None:
        return dict(PIXEL_ENCODER)
    if not isinstance(value, Record):
        raise LegacyError(f"{path}: 'encoder' is a {type(value).__name__}, expected EDM2's encoder object")
    name = value.class_name.rsplit(".", 1)[-1]
    if name == "StandardRGBEncoder":
        return dict(PIXEL_ENCODER)
    if name != "StabilityVAEEncoder":
        raise LegacyError(f"{path}: encoder '{name}' is not one of EDM2's (StandardRGBEncoder, StabilityVAEEncoder)")
    kwargs = {**VAE_DEFAULTS, **_plain(value.init_kwargs)}
    constants = {k: kwargs[k] for k in VAE_DEFAULTS if k != "vae_name"}
    constants.update(scale=_plain(value.state.get("scale")), bias=_plain(value.state.get("bias")))
    name_ok = isinstance(kwargs["vae_name"], str) and 0 < len(kwargs["vae_name"]) <= MAX_NAME
    if not name_ok or not all(_numbers(v) for v in constants.values()):
        raise LegacyError(f"{path}: StabilityVAEEncoder records no VAE name or no latent constants (expected a name "
                          f"and numbers or short lists of numbers for {', '.join(constants)})")
    return {"class": name, "vae_name": kwargs["vae_name"], **constants}


def _numbers(value: Any, most: int = 64) -> bool:
    """A number or a short list of numbers (the encoder's per-channel constants)."""
    values = value if isinstance(value, list) and len(value) <= most else [value]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _loss(value: Any) -> dict | None:
    if not isinstance(value, Record):
        return None
    state = _plain(value.state)
    return {"class": value.class_name.rsplit(".", 1)[-1],
            **{k: state[k] for k in ("P_mean", "P_std", "sigma_data") if isinstance(state.get(k), (int, float))}}


def _unet_arguments() -> set[str]:
    """Constructor arguments of EDM2's UNet and of its blocks (``**block_kwargs``), by vcdm's signatures."""
    unet = {n for n, p in inspect.signature(EDM2UNet).parameters.items() if p.kind is not p.VAR_KEYWORD}
    block = set(inspect.signature(Block).parameters) - {"in_channels", "out_channels", "emb_channels", "flavor",
                                                         "resample_mode", "attention"}
    return unet | block


def edm2_network(obj: Any, path: PathLike) -> EDM2Network:
    """Read an unpickled EDM2 file (see :func:`is_edm2`) into an :class:`EDM2Network`."""
    path = str(path)
    precond: Record = obj["ema"]
    modules = precond.state["_modules"]
    unet = modules.get("unet")
    if not isinstance(unet, Record):
        raise LegacyError(f"{path}: the Precond's 'unet' is not a recorded network")
    state: dict[str, torch.Tensor] = {}
    params: set[str] = set()
    _module_tensors(unet, "", state, params)
    for name in ("logvar_fourier", "logvar_linear"):
        if isinstance(modules.get(name), Record):
            _module_tensors(modules[name], f"{name}.", state, params)
    head = state.get("logvar_linear.weight")
    kwargs = {k: _plain(v) for k, v in (unet.init_kwargs or precond.init_kwargs).items() if k not in _PRECOND_ONLY}
    unknown = sorted(set(kwargs) - _unet_arguments())
    if unknown:
        raise LegacyError(f"{path}: EDM2's UNet records arguments vcdm's EDM2UNet does not take: {', '.join(unknown)}")
    if len(json.dumps(kwargs, default=str)) > MAX_KWARGS_JSON:
        raise LegacyError(f"{path}: EDM2's UNet records constructor arguments of more than {MAX_KWARGS_JSON:,} "
                          "characters (EDM2's take a few hundred): damaged or hostile")
    attrs = precond.state
    sigma_data = attrs.get("sigma_data", precond.init_kwargs.get("sigma_data", 0.5))
    if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not sigma_data > 0:
        raise LegacyError(f"{path}: the Precond's sigma_data is {sigma_data!r}, expected a positive number")
    channels, resolution = kwargs.get("img_channels"), kwargs.get("img_resolution")
    if isinstance(channels, int) and isinstance(resolution, int):
        check_sample_size([(channels, resolution, resolution)], path)
    match = PICKLE_NAME.fullmatch(Path(path).name)
    dataset = obj.get("dataset_kwargs")
    data_path = dataset.get("path") if isinstance(dataset, dict) else None
    return EDM2Network(
        path=path, net_kwargs=kwargs, sigma_data=float(sigma_data), use_fp16=bool(attrs.get("use_fp16", False)),
        logvar_channels=int(head.shape[1]) if head is not None and head.ndim == 2 else 0,
        state_dict=state, parameter_names=frozenset(params), encoder=_encoder(obj.get("encoder"), path),
        data_path=data_path if isinstance(data_path, str) and len(data_path) <= MAX_NAME else None,
        loss=_loss(obj.get("loss_fn")),
        kimg=int(match.group(2)) if match else None, std=float(match.group(3)) if match else None)


def load_edm2_pickle(path: PathLike) -> EDM2Network:
    """Read an EDM2 network pickle (a post-hoc reconstruction or a raw training snapshot), safely."""
    obj = read_pickle(path)
    if not is_edm2(obj):
        raise LegacyError(f"{path}: not an EDM2 network pickle (expected a dict whose 'ema' is EDM2's Precond)")
    return edm2_network(obj, path)


def _geometry(record: EDM2Network) -> tuple[int, int, int]:
    kw = record.net_kwargs
    values = [kw.get(k) for k in ("img_channels", "img_resolution", "label_dim")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values) or not all(values[:2]):
        raise LegacyError(f"{record.path}: the UNet records img_channels, img_resolution, label_dim = {values}, "
                          "expected positive integers (label_dim >= 0)")
    channels, resolution, label_dim = values
    check_sample_size([(channels, resolution, resolution), (label_dim,)], record.path)
    return channels, resolution, label_dim


def to_vcdm(record: EDM2Network) -> tuple[CheckpointConfig, dict[str, torch.Tensor]]:
    """vcdm checkpoint config and network state dict of an EDM2 network.

    The structure is EDM2's: an image (or latent) generated, conditioned on a one-hot class label when the
    network is class-conditional. The denoiser is EDM's preconditioning with the pickle's sigma_data and the
    learned uncertainty head. A raw snapshot also records its EMA profile, so `vcdm phema` takes it as input.
    """
    channels, resolution, label_dim = _geometry(record)
    shapes = {"image": (channels, resolution, resolution), "label": (label_dim,)}
    structure = Structure.from_flags(shapes, "1,1" if label_dim else "1,0", "0,1" if label_dim else "0,0")
    denoiser_cfg = {"kind": "edm", "sigma_data": record.sigma_data, "logvar_channels": record.logvar_channels}
    signature = inspect.signature(network_classes()["EDM2UNet"]).parameters.items()
    defaults = {k: _plain(p.default) for k, p in signature if p.default is not inspect.Parameter.empty}
    kwargs = {**defaults, **record.net_kwargs}
    try:
        with _TensorCap(2 * len(record.state_dict) + 64):  # shapes only, as many tensors as the file has
            with torch.device("meta"):
                net = build_network("EDM2UNet", kwargs)
            denoiser = Denoiser(net, structure, **denoiser_cfg)
    except (CheckpointError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise LegacyError(f"{record.path}: recorded settings do not build EDM2's network: {e}") from None
    problem = state_dict_mismatch(denoiser.net.state_dict(), record.state_dict)
    if problem:
        raise LegacyError(f"{record.path}: weights do not match EDM2's UNet as recorded: {problem}")
    training: dict[str, Any] = {}
    if record.loss:
        training["loss"] = record.loss
    if record.nimg is not None:
        training.update(nimg=record.nimg, ema_profile={"std": record.std})
    config = CheckpointConfig(
        network="EDM2UNet", net_kwargs=kwargs, denoiser=denoiser.config(), structure=structure.to_dict(),
        data={"data_class": "ImageFolderDataset", "path": record.data_path,
              "resolution": resolution, "label_dim": label_dim, "encoder": record.encoder},
        training=training,
        imported_from={"file": Path(record.path).name, "release": "edm2", "precond": "Precond", "network": "UNet",
                       "use_fp16": record.use_fp16, "kimg": record.kimg, "ema_std": record.std})
    return config, {k: v.detach() for k, v in record.state_dict.items()}


def import_edm2(src: PathLike, dest: PathLike) -> tuple[EDM2Network, CheckpointConfig]:
    """Convert an EDM2 pickle into a vcdm checkpoint (written atomically)."""
    record = load_edm2_pickle(src)
    config, state = to_vcdm(record)
    save_checkpoint(dest, {"net": state}, config)
    return record, config


def import_network_pickle(src: PathLike, dest: PathLike) -> tuple[EDM2Network | LegacyNetwork, CheckpointConfig]:
    """Convert any network pickle vcdm reads (EDM2's, EDM's, the original VCDM release's) into a vcdm
    checkpoint, reading the file once. Returns what was read and the config written."""
    obj = read_pickle(src)
    if is_edm2(obj):
        record: EDM2Network | LegacyNetwork = edm2_network(obj, src)
        config, state = to_vcdm(record)
    else:
        record = edm.legacy_network(obj, src)
        config, state = edm.to_vcdm(record)
    del obj
    save_checkpoint(dest, {"net": state}, config)
    return record, config


def phema_input(path: PathLike):
    """An EDM2 raw snapshot (``network-snapshot-<kimg>-<std>.pkl``) as an input of vcdm's post-hoc EMA
    (:class:`vcdm.train.phema.Input`): its time and profile length from the name, its config as imported,
    and its tensors read again on each pass, so a reconstruction holds one snapshot at a time."""
    from vcdm.train.phema import Input, PhemaError, Snapshot  # here: the training package imports the importers

    record = load_edm2_pickle(path)
    if record.nimg is None:
        raise PhemaError(f"{path}: not named as EDM2's snapshots are (<prefix>-<kimg>-<std>.pkl), so its EMA "
                         "profile is unknown")
    config, _ = to_vcdm(record)
    del record

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        yield from load_edm2_pickle(path).state_dict.items()

    def extra() -> dict[str, dict[str, torch.Tensor]]:
        return {}

    snapshot = Snapshot(str(path), config.training["nimg"], float(config.training["ema_profile"]["std"]), tensors)
    return Input(snapshot, config, Path(path), extra)


