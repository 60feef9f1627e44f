"""The original VCDM release's prior (``DALLE2CLIPModel`` under its ``EDMPrecond``) → vcdm's DALLE2Prior.

The release pickles the prior by class name (it is not one of EDM's persistent classes), so no
constructor arguments are recorded on it; its sizes are read off the tensors and cross-checked with the
arguments its preconditioner recorded. The parameter names are the same, so the state dict maps as is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from vcdm.checkpoints import CheckpointConfig, state_dict_mismatch
from vcdm.data.structure import DATA_CLASS_TENSORS, Structure
from vcdm.legacy.records import LegacyError
from vcdm.nets import build_network
from vcdm.nets.precond import Denoiser

RELEASE_PRIOR = "DALLE2CLIPModel"
_LAYER = "causal_transformer.layers.0."


def is_release_prior(net_class: str) -> bool:
    """Whether a recorded class name (qualified or not) is the release's prior."""
    return net_class.rsplit(".", 1)[-1] == RELEASE_PRIOR


def _shape(record, key: str) -> tuple[int, ...]:
    t = record.state_dict.get(key)
    if t is None:
        raise LegacyError(f"{record.path}: {RELEASE_PRIOR} without '{key}' (not the release's prior layout)")
    return tuple(t.shape)


def prior_kwargs(record, structure: Structure) -> dict:
    """DALLE2Prior constructor kwargs for the recorded network generating `structure`'s latent."""
    names = structure.latent_names
    if len(names) != 1 or len(structure.shape(names[0])) != 1:
        raise LegacyError(f"{record.path}: {RELEASE_PRIOR} generates one vector; the structure's latent tensors "
                          f"are {dict((n, structure.shape(n)) for n in names)}")
    dim, dim_head = _shape(record, "learned_query")[0], _shape(record, _LAYER + "0.null_kv")[1]
    layers = {k.split(".")[2] for k in record.state_dict if k.startswith("causal_transformer.layers.")}
    augment = record.state_dict.get("to_augment_embeds.0.weight")
    kwargs = dict(embed_dim=structure.latent_dim, cond_dim=structure.observed_dim,
                  augment_dim=0 if augment is None else int(augment.shape[1]), dim=dim, depth=len(layers),
                  heads=_shape(record, _LAYER + "0.to_q.weight")[0] // dim_head, dim_head=dim_head,
                  ff_mult=_shape(record, _LAYER + "1.5.weight")[1] // dim)
    for key in ("dim", "depth", "heads", "dim_head", "augment_dim"):
        recorded = record.precond_kwargs.get(key)
        if isinstance(recorded, int) and recorded > 0 and recorded != kwargs[key]:
            raise LegacyError(f"{record.path}: the preconditioner records {key}={recorded}, "
                              f"the weights have {key}={kwargs[key]}")
    return kwargs


def release_to_vcdm(record, structure: Structure | None, net_kwargs: Callable[[Any, Structure], tuple[str, dict]],
                    archs: dict[str, str]) -> tuple[CheckpointConfig, dict[str, torch.Tensor]]:
    """vcdm checkpoint config and network state dict for a network of the original release: ``net_kwargs``
    gives (vcdm class, constructor kwargs) for the record and the structure it generates; ``archs`` maps
    that class to the ``--arch`` name recorded."""
    from vcdm.legacy.edm import _denoiser_config, _release_structure  # here: edm imports this module

    denoiser_cfg = _denoiser_config(record)
    if structure is None:
        structure = _release_structure(record)
        release_exist = (record.structure or {}).get("exist") or []
        for name in ("noise_mult", "pred_x0"):  # the release indexes these over all data tensors
            values = denoiser_cfg.get(name)
            if values is not None and len(values) == len(release_exist) != len(structure.names):
                denoiser_cfg[name] = [v for v, e in zip(values, release_exist) if e]
    cls, kwargs = net_kwargs(record, structure)
    try:
        with torch.device("meta"):  # shapes only
            net = build_network(cls, kwargs)
        denoiser = Denoiser(net, structure, **denoiser_cfg)
    except (TypeError, ValueError) as e:
        raise LegacyError(f"{record.path}: recorded settings do not build a vcdm {cls}: {e}") from None
    state = {k: v.detach() for k, v in record.state_dict.items()}
    problem = state_dict_mismatch(denoiser.net.state_dict(), state)
    if problem:
        raise LegacyError(f"{record.path}: weights do not match vcdm's {cls}: {problem}")
    images = [structure.shape(n) for n, e in zip(structure.names, structure.exist) if e and len(structure.shape(n)) == 3]
    data_class = next((k for k, names in DATA_CLASS_TENSORS.items() if names == structure.names), None)
    config = CheckpointConfig(
        network=cls, net_kwargs=kwargs, denoiser=denoiser.config(), structure=structure.to_dict(),
        data={"data_class": data_class, "path": (record.dataset_kwargs or {}).get("path"),
              "resolution": images[0][2] if images else None,
              "label_dim": structure.numel("label") if "label" in structure.observed_names else 0},
        training={"arch": archs[cls]},
        imported_from={"file": Path(record.path).name, "release": record.release, "precond": record.precond_class,
                       "network": record.net_class, "use_fp16": bool(record.precond_kwargs.get("use_fp16", False))})
    return config, state


def prior_to_vcdm(record, structure: Structure | None = None) -> tuple[CheckpointConfig, dict[str, torch.Tensor]]:
    """vcdm checkpoint config and network state dict for the release's prior."""
    return release_to_vcdm(record, structure, lambda rec, st: ("DALLE2Prior", prior_kwargs(rec, st)),
                           {"DALLE2Prior": "dalle2"})
