"""EDM / VCDM-release network pickles → vcdm checkpoints: what the pickle records about its network
(:class:`LegacyNetwork`) and its mapping onto a vcdm network, denoiser and structure."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vcdm.checkpoints import CheckpointConfig, save_checkpoint, state_dict_mismatch
from vcdm.data.structure import DATA_CLASS_TENSORS, Structure
from vcdm.legacy.limits import check_sample_size
from vcdm.legacy.records import LegacyError, Record, _plain
from vcdm.legacy.release import is_release_prior, prior_to_vcdm
from vcdm.legacy.release_nets import is_release_net, release_net_to_vcdm
from vcdm.legacy.unpickle import PathLike, read_pickle
from vcdm.nets import build_network, network_classes
from vcdm.nets.precond import Denoiser


PRECOND_KINDS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
# Network classes of EDM and of the release, and the vcdm class with EDM's parameter layout.
NET_CLASSES = {"SongUNet": "SongUNet", "DhariwalUNet": "DhariwalUNet", "OriginalSongUNet": "SongUNet",
               "WrappedOriginalSongUNet": "SongUNet", "WrappedDhariwalUNet": "DhariwalUNet"}
# The release's dataset class names → vcdm's (DATA_CLASS_TENSORS); its labelled-CLIP class is built by a
# factory and pickled under the factory's local name.
_SEED_DATA_CLASSES = {"ImageFolderDataset": "ImageFolderDataset", "LabelledImageDataset": "ImageFolderDataset",
                      "CLIPDataset": "CLIPDataset", "LabelledCLIPDataset": "LabelledCLIPDataset",
                      "NewClass": "LabelledCLIPDataset"}
_IGNORED_KWARGS = {"softmax_onehot": False, "emb_layer_type": None}  # the release's, at their no-op values


@dataclass
class LegacyNetwork:
    """What an EDM/VCDM pickle records about its network: the preconditioner and the inner model."""
    path: str
    release: str                      # 'edm' or 'vcdm' (the original VCDM release)
    precond_class: str                # EDMPrecond | VPPrecond | VEPrecond | …
    precond_kwargs: dict              # recorded constructor kwargs (plain values)
    precond_attrs: dict               # plain attributes (sigma_min, sigma_max, sigma_data, …)
    net_class: str                    # SongUNet | DhariwalUNet | the release's wrappers | DALLE2CLIPModel …
    net_kwargs: dict                  # recorded constructor kwargs of the inner model (plain values)
    state_dict: dict[str, torch.Tensor]
    parameter_names: frozenset = field(default_factory=frozenset)
    dataset_kwargs: dict | None = None
    structure: dict | None = None     # the release's recorded Structure (names, shapes, exist, observed)

    @property
    def kind(self) -> str | None:
        return PRECOND_KINDS.get(self.precond_class)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for k, t in self.state_dict.items() if k in self.parameter_names)


def _module_tensors(rec: Record, prefix: str, out: dict, params: set) -> None:
    """Walk a recorded module tree into state-dict entries (persistent buffers only, as state_dict)."""
    state = rec.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if t is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(t, torch.Tensor):
                raise LegacyError(f"{prefix}{name} of {rec.class_name} is a {type(t).__name__}, expected a tensor")
            out[prefix + name] = t
            if group == "_parameters":
                params.add(prefix + name)
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, Record):
            raise LegacyError(f"submodule {prefix}{name} is a {type(child).__name__}, expected a module record")
        _module_tensors(child, f"{prefix}{name}.", out, params)


def _select_network(obj: Any) -> Record:
    if isinstance(obj, Record):
        return obj
    if isinstance(obj, dict):
        for key in ("ema", "net"):
            if isinstance(obj.get(key), Record):
                return obj[key]
        raise LegacyError(f"no network in the pickle (expected key 'ema' or 'net'; found {sorted(map(str, obj))})")
    raise LegacyError(f"the pickle holds a {type(obj).__name__}, expected EDM's dict with a network under 'ema'")


def load_legacy_pickle(path: PathLike) -> LegacyNetwork:
    """Read an EDM network pickle (``edm-*.pkl``) or a snapshot/training state of the VCDM release."""
    return legacy_network(read_pickle(path), path)


def legacy_network(obj: Any, path: PathLike) -> LegacyNetwork:
    """What an unpickled EDM/VCDM file records about its network (see :func:`load_legacy_pickle`), its
    sample size checked (:func:`vcdm.legacy.limits.check_sample_size`)."""
    precond = _select_network(obj)
    modules = precond.state.get("_modules")
    model = modules.get("model") if isinstance(modules, dict) else None
    if not isinstance(model, Record):
        edm2 = isinstance(modules, dict) and "unet" in modules  # EDM2's Precond: read by vcdm.legacy.edm2
        raise LegacyError(f"{path}: {precond.class_name} has no inner network 'model' " + (
            "(an EDM2 network: import it with `vcdm import-edm` or vcdm.legacy.edm2)" if edm2 else
            "(not an EDM preconditioner)"))
    state: dict[str, torch.Tensor] = {}
    params: set[str] = set()
    _module_tensors(model, "", state, params)
    kwargs = dict(precond.init_kwargs)
    release_structure = kwargs.get("structure")
    attrs = {k: _plain(v) for k, v in precond.state.items()
             if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, type(None)))}
    dataset_kwargs = obj.get("dataset_kwargs") if isinstance(obj, dict) else None
    record = LegacyNetwork(
        path=str(path), release="vcdm" if isinstance(release_structure, Record) else "edm",
        precond_class=precond.class_name, precond_kwargs={k: _plain(v) for k, v in kwargs.items() if k != "structure"},
        precond_attrs=attrs, net_class=model.class_name,
        net_kwargs={k: _plain(v) for k, v in model.init_kwargs.items() if k != "structure"},
        state_dict=state, parameter_names=frozenset(params),
        dataset_kwargs=_plain(dataset_kwargs) if isinstance(dataset_kwargs, dict) else None,
        structure=_plain(release_structure.state) if isinstance(release_structure, Record) else None)
    check_sample_size(_recorded_shapes(record), str(path))
    return record


def _recorded_shapes(record: LegacyNetwork) -> list[Any]:
    """The data tensor shapes a record implies: the release's structure, or EDM's image geometry."""
    if record.structure is not None:
        shapes = record.structure.get("shapes") if isinstance(record.structure, dict) else None
        return list(shapes) if isinstance(shapes, (list, tuple)) else []
    kw = record.net_kwargs
    if "img_resolution" not in kw:
        return []
    return [(kw.get("in_channels", 3), kw["img_resolution"], kw["img_resolution"])]


def _release_structure(record: LegacyNetwork) -> Structure:
    """The release's Structure (names/shapes/observed of *existing* tensors, exist over all) in vcdm's terms."""
    s = record.structure or {}
    try:
        exist = [int(e) for e in s["exist"]]
        names, shapes, observed = list(s["names"]), [tuple(sh) for sh in s["shapes"]], [int(o) for o in s["observed"]]
    except (KeyError, TypeError, ValueError):
        raise LegacyError(f"{record.path}: the release's recorded structure is incomplete") from None
    data_class = str((record.dataset_kwargs or {}).get("class_name", "")).rsplit(".", 1)[-1]
    all_names = DATA_CLASS_TENSORS.get(_SEED_DATA_CLASSES.get(data_class, ""), ())
    if len(all_names) != len(exist) or [n for n, e in zip(all_names, exist) if e] != names:
        all_names, exist = tuple(names), [1] * len(names)  # unknown data class: keep the existing tensors only
    known = dict(zip(names, zip(shapes, observed)))
    return Structure(tuple(all_names), tuple(known.get(n, ((0,), 0))[0] for n in all_names),
                     tuple(bool(e) for e in exist), tuple(bool(known.get(n, ((0,), 0))[1]) for n in all_names))


def _network_kwargs(record: LegacyNetwork) -> tuple[str, dict]:
    """vcdm network class and constructor kwargs (EDM's names) for the recorded inner model."""
    cls = NET_CLASSES.get(record.net_class)
    if cls is None:
        raise LegacyError(f"{record.path}: network class '{record.net_class}' has no vcdm equivalent "
                          f"(supported: {', '.join(sorted(NET_CLASSES))}, DALLE2CLIPModel)")
    kwargs = dict(record.net_kwargs)
    for key, default in _IGNORED_KWARGS.items():
        value = kwargs.pop(key, default)
        if value != default:
            raise LegacyError(f"{record.path}: {record.net_class} was built with {key}={value!r}, "
                              "which vcdm does not implement")
    if record.release == "vcdm":  # the release's wrappers derive the image geometry from the structure
        img = tuple((record.structure or {}).get("shapes", [()])[0])
        if len(img) != 3:
            raise LegacyError(f"{record.path}: first tensor of the recorded structure is not an image: {img}")
        label = record.state_dict.get("map_label.weight")
        kwargs.update(img_resolution=img[-1], in_channels=img[0], out_channels=img[0],
                      label_dim=0 if label is None else int(label.shape[1]))
    known = inspect.signature(network_classes()[cls]).parameters
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise LegacyError(f"{record.path}: {record.net_class} records constructor arguments vcdm's {cls} "
                          f"does not take: {', '.join(unknown)}")
    # EDM records only the arguments it was given; write the defaults out so the checkpoint is explicit.
    defaults = {k: _plain(p.default) for k, p in known.items() if p.default is not inspect.Parameter.empty}
    return cls, {**defaults, **kwargs}


def _denoiser_config(record: LegacyNetwork) -> dict:
    kind = record.kind
    if kind is None:
        raise LegacyError(f"{record.path}: preconditioner '{record.precond_class}' is not supported "
                          f"(supported: {', '.join(PRECOND_KINDS)})")
    a, kw = record.precond_attrs, record.precond_kwargs
    cfg: dict[str, Any] = {"kind": kind}
    if kind == "edm":
        cfg["sigma_data"] = float(a.get("sigma_data", kw.get("sigma_data", 0.5)))
        lo, hi = float(a.get("sigma_min", 0)), float(a.get("sigma_max", math.inf))
        cfg.update(sigma_min=lo if lo > 0 else None, sigma_max=hi if math.isfinite(hi) else None)
    elif kind == "ve":
        cfg.update(sigma_min=float(a.get("sigma_min", 0.02)), sigma_max=float(a.get("sigma_max", 100.0)))
    else:
        for name, default in (("beta_d", 19.9), ("beta_min", 0.1), ("M", 1000), ("epsilon_t", 1e-5)):
            cfg[name] = type(default)(a.get(name, kw.get(name, default)))
    for name in ("noise_mult", "pred_x0"):  # the release's per-tensor options, indexed by data tensor
        if kw.get(name) is not None:
            cfg[name] = kw[name] if isinstance(kw[name], list) else [kw[name]]
    return cfg


def _default_structure(record: LegacyNetwork, image: tuple[int, ...], label_dim: int) -> Structure:
    if record.release == "vcdm":
        return _release_structure(record)
    # An EDM network is an image model over ImageFolderDataset's (image, label); it observes the
    # label when it is class-conditional. An unconditional model records label_dim 0: shape (0,).
    shapes = {"image": image, "label": (label_dim,)}
    return Structure.from_flags(shapes, "1,1" if label_dim else "1,0", "0,1" if label_dim else "0,0")


def to_vcdm(record: LegacyNetwork, *, label_dim: int | None = None,
            structure: Structure | None = None) -> tuple[CheckpointConfig, dict[str, torch.Tensor]]:
    """vcdm checkpoint config and network state dict for a legacy network.

    ``structure`` records what the model generates/observes (default: EDM's image-only structure, or
    the release's recorded one); ``label_dim`` (default: the structure's observed dimension, else the
    recorded one) re-targets an unconditional network to a conditioning vector, adding ``map_label``
    initialised to zero so the imported network computes exactly what it did.
    """
    if is_release_prior(record.net_class):
        if label_dim is not None and label_dim != (structure or _release_structure(record)).observed_dim:
            raise LegacyError(f"{record.path}: re-targeting the release's prior to {label_dim}-d conditioning "
                              "is not supported")
        return prior_to_vcdm(record, structure)
    if is_release_net(record.net_class):  # the release's concatunet, film-ddpmpp, control-adm
        return release_net_to_vcdm(record, structure)
    cls, kwargs = _network_kwargs(record)
    denoiser_cfg = _denoiser_config(record)
    recorded = int(kwargs.get("label_dim", 0))
    if label_dim is None:
        label_dim = structure.observed_dim if structure is not None else recorded
    if label_dim != recorded:
        if recorded:
            raise LegacyError(f"{record.path}: the network is conditioned on {recorded}-d labels; re-targeting it "
                              f"to {label_dim}-d conditioning is not supported")
        kwargs["label_dim"] = label_dim
    image = (kwargs["in_channels"], kwargs["img_resolution"], kwargs["img_resolution"])
    if structure is None:
        structure = _default_structure(record, image, label_dim)
        release_exist = (record.structure or {}).get("exist") or []
        for name in ("noise_mult", "pred_x0"):  # the release indexes these over all data tensors
            values = denoiser_cfg.get(name)
            if values is not None and len(values) == len(release_exist) != len(structure.names):
                denoiser_cfg[name] = [v for v, e in zip(values, release_exist) if e]
    check_sample_size(structure.shapes, record.path)
    latent = [structure.shape(n) for n in structure.latent_names]
    if latent != [image] or structure.observed_dim != label_dim:
        raise LegacyError(f"{record.path}: the structure (latent {dict(zip(structure.latent_names, latent))}, observed "
                          f"dim {structure.observed_dim}) does not fit an image network of {image} with "
                          f"{label_dim}-d conditioning")
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            net = build_network(cls, kwargs)
        denoiser = Denoiser(net, structure, **denoiser_cfg)
    except (TypeError, ValueError) as e:
        raise LegacyError(f"{record.path}: recorded settings do not build a vcdm network: {e}") from None
    expected = denoiser.net.state_dict()
    state = {k: v.detach() for k, v in record.state_dict.items()}
    for key in expected:
        if key.startswith("map_label.") and key not in state and not recorded:
            state[key] = torch.zeros(expected[key].shape, dtype=torch.float32)
    problem = state_dict_mismatch(expected, state)
    if problem:
        raise LegacyError(f"{record.path}: weights do not match vcdm's {cls}: {problem}")
    data_class = next((k for k, names in DATA_CLASS_TENSORS.items() if names == structure.names), None)
    config = CheckpointConfig(
        network=cls, net_kwargs=kwargs, denoiser=denoiser.config(), structure=structure.to_dict(),
        data={"data_class": data_class, "path": (record.dataset_kwargs or {}).get("path"),
              "resolution": kwargs["img_resolution"], "label_dim": label_dim},
        imported_from={"file": Path(record.path).name, "release": record.release, "precond": record.precond_class,
                       "network": record.net_class, "use_fp16": bool(record.precond_kwargs.get("use_fp16", False))})
    return config, state


def import_edm(src: PathLike, dest: PathLike, *, label_dim: int | None = None,
               structure: Structure | None = None) -> tuple[Any, CheckpointConfig]:
    """Convert an EDM/VCDM pickle into a vcdm checkpoint (written atomically), or an EDM2 pickle as
    :func:`vcdm.legacy.edm2.import_network_pickle` does when neither ``label_dim`` nor ``structure`` is given.
    Returns what was read and the config written."""
    if label_dim is None and structure is None:
        from vcdm.legacy.edm2 import import_network_pickle  # here: edm2 imports this module

        return import_network_pickle(src, dest)
    record = load_legacy_pickle(src)
    config, state = to_vcdm(record, label_dim=label_dim, structure=structure)
    save_checkpoint(dest, {"net": state}, config)
    return record, config

