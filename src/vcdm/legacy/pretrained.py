"""Initialising a training network from pretrained weights (--pretrained_weights / --transfer)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vcdm.checkpoints import (CheckpointError, load_tensors, read_checkpoint_config, state_dict_mismatch,
                              tensor_shapes)
from vcdm.data.structure import Structure
from vcdm.nets.control import class_columns
from vcdm.nets.precond import Denoiser
from vcdm.legacy.edm import _network_kwargs, legacy_network
from vcdm.legacy.edm2 import edm2_network, is_edm2
from vcdm.legacy.records import LegacyError
from vcdm.legacy.release_nets import is_release_net
from vcdm.legacy.unpickle import PathLike, read_pickle


@dataclass
class PretrainedReport:
    source: str
    copied: list[str]
    zero_init: list[str]              # tensors the source lacks (map_label): set to zero
    frozen: int = 0                   # number of parameter values with requires_grad False
    trainable: int = 0
    notes: list[str] = field(default_factory=list)  # widened map_label, control copies

    def __str__(self) -> str:
        s = f"loaded {len(self.copied)} tensors from {self.source}"
        if self.zero_init:
            s += f"; zero-initialised new {', '.join(self.zero_init)}"
        for note in self.notes:
            s += f"; {note}"
        if self.frozen:
            s += f"; froze {self.frozen:,} parameters, {self.trainable:,} trainable"
        return s


def _source_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            read_checkpoint_config(path)
            return load_tensors(path).get("net", {})
        except CheckpointError as e:
            raise LegacyError(str(e)) from None
    obj = read_pickle(path)
    if is_edm2(obj):
        return edm2_network(obj, path).state_dict
    record = legacy_network(obj, path)
    if not is_release_net(record.net_class):  # the release's concatunet/film/control map by name as they are
        _network_kwargs(record)  # refuses networks without a vcdm equivalent, with the reason
    return record.state_dict


def widen_map_label(path: Path, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                    structure: Structure | None) -> str:
    """The release's fine-tuning of a class-conditional ADM (WrappedDhariwalUNet.edit_pretrained_state_dict):
    a wider ``map_label`` gets the pretrained class columns in the label's slice, zeros elsewhere (the new
    conditioning starts ignored). Edits ``source`` in place; returns a description, "" if nothing to do."""
    key = "map_label.weight"
    if key not in source or key not in target or source[key].shape == target[key].shape:
        return ""
    old, shape = source[key], target[key].shape
    if old.ndim != 2 or old.shape[0] != shape[0] or structure is None:
        return ""  # a different network, or no structure to place the classes: reported by the shape check
    classes, columns = old.shape[1], class_columns(structure)
    if columns is None:
        raise LegacyError(f"{path}: the pickle is conditioned on {classes} classes but this model observes no "
                          f"class label (the structure must observe a label tensor, e.g. LabelledCLIPDataset's)")
    start, count = columns
    if count != classes:
        raise LegacyError(f"{path}: the pickle is conditioned on {classes} classes but the dataset has {count}")
    wide = torch.zeros(shape, dtype=old.dtype)
    wide[:, start:start + count] = old
    source[key] = wide
    return f"widened {key} from {classes} to {shape[1]} inputs (classes at columns {start}..{start + count - 1})"


def unconditional_noise_gain(label_balance: float) -> float:
    """The noise embedding's gain that makes mp_sum(gain * a, 0, t) = a: the inverse of mp_sum's weight of a."""
    t = label_balance
    return math.sqrt((1 - t) ** 2 + t ** 2) / (1 - t)


def edm2_gains(path: PathLike, label_dim: int, label_balance: float = 0.5) -> dict[str, float]:
    """EDM2UNet kwargs under which a network conditioned on ``label_dim`` values starts as the pretrained
    network of ``path`` (see :func:`widen_emb_label`); {} when the conditioning is the pretrained one.

    Why fixed gains: EDM2 scales its conditioning by sqrt(label_dim), which widening would change from
    sqrt(classes), and mp_sum(noise, label) divides a zero label branch's sum by mp_sum's norm. Keeping the
    pretrained sqrt(classes) also keeps the input's scale sensible for the new columns: a unit-norm embedding
    then enters at the magnitude the one-hot class has, so neither part dominates as the new columns grow.
    The gains are network kwargs, recorded in every checkpoint's config, so the model rebuilds as trained."""
    path = Path(path)
    if path.suffix == ".safetensors":  # the tensor table is enough
        try:
            shape = tensor_shapes(path).get("net.emb_label.weight")
        except CheckpointError as e:
            raise LegacyError(str(e)) from None
    else:
        old = _source_state(path).get("emb_label.weight")
        shape = None if old is None else tuple(old.shape)
    if shape is None:
        return {"noise_gain": unconditional_noise_gain(label_balance)} if label_dim else {}
    classes = int(shape[1])
    return {} if classes == label_dim else {"label_gain": math.sqrt(classes)}


def widen_emb_label(path: Path, source: dict[str, torch.Tensor], net: nn.Module, structure: Structure | None) -> str:
    """EDM2's ``emb_label`` for a wider conditioning, function-preserving at initialisation. Edits ``source`` in
    place; returns a description, "" if nothing to do.

    From a class-conditional source: the class columns go to the label's slice, the embedding columns are zero.
    MPConv normalises each output row (w / (eps sqrt(fan_in) + |w|)), so the class columns are scaled by
    sqrt(new fan_in / classes): the normalised row is then exactly the pretrained one, in eval and in training
    (whose forced weight normalisation uses that same row), given the pretrained input gain sqrt(classes).
    From an unconditional source (no ``emb_label``): a zero branch, whose mp_sum with the noise embedding is
    undone by ``noise_gain``. EDM2's weight normalisation has no small-weight regime: the first optimiser step
    gives that new row its full unit norm, so the unconditional network is preserved at initialisation only,
    while the class-conditional one moves as fast as its zero columns grow against its unit-norm row."""
    key = "emb_label.weight"
    target = net.state_dict().get(key)
    if target is None:
        return ""
    old = source.get(key)
    if old is None:
        want = unconditional_noise_gain(net.label_balance)
        if not math.isclose(net.noise_gain, want, rel_tol=1e-12):
            raise LegacyError(f"{path}: an unconditional EDM2 network gains a label branch function-preservingly only "
                              f"with noise_gain={want!r} (the network has {net.noise_gain!r})")
        source[key] = torch.zeros(target.shape)
        return f"new {key} ({target.shape[1]} inputs) at zero, noise_gain {want:.6g} keeps the pretrained embedding"
    if old.shape == target.shape or old.ndim != 2 or old.shape[0] != target.shape[0]:
        return ""  # the same conditioning, or a different network: reported by the shape check
    classes, columns = int(old.shape[1]), class_columns(structure)
    if columns is None or columns[1] != classes:
        raise LegacyError(f"{path}: the pickle is conditioned on {classes} classes but this model's class label has "
                          f"{columns[1] if columns else 'no'} columns (observe LabelledCLIPDataset's label)")
    if not math.isclose(net.label_gain, math.sqrt(classes), rel_tol=1e-12):
        raise LegacyError(f"{path}: widening a {classes}-class EDM2 network needs label_gain=sqrt({classes}) "
                          f"(the network has {net.label_gain!r})")
    start, width = columns[0], int(target.shape[1])
    wide = torch.zeros(target.shape)
    wide[:, start:start + classes] = old.float() * math.sqrt(width / classes)
    source[key] = wide
    return (f"widened {key} from {classes} to {width} inputs (classes at columns {start}..{start + classes - 1}, "
            "new columns at zero)")


def load_pretrained(path: PathLike, target_net: nn.Module, *, freeze: bool = False,
                    structure: Structure | None = None) -> PretrainedReport:
    """Copy a pretrained network's weights (EDM/VCDM .pkl or vcdm .safetensors) into ``target_net``.

    Tensors must match by name and shape, except ``map_label.*`` which an unconditional source lacks:
    those start at zero, so the network initially ignores its new conditioning input. A class-conditional
    source's ``map_label`` is widened to the target's conditioning (`widen_map_label`, located by
    ``structure``, by default a Denoiser's own). A network with ``pretrained_state`` (control-adm) completes
    the source with its control tensors, and then only those train. With ``freeze``, only the new or
    widened parameters stay trainable (the release's --freeze_pretrained).
    """
    path = Path(path)
    if isinstance(target_net, Denoiser):
        net, structure = target_net.net, structure or target_net.structure
    else:
        net = target_net
    source = dict(_source_state(path))
    target = net.state_dict()
    widened = widen_map_label(path, source, target, structure) or widen_emb_label(path, source, net, structure)
    if not any(k.startswith("logvar_") for k in target):  # EDM2's uncertainty head, unused by this recipe
        source = {k: v for k, v in source.items() if not k.startswith("logvar_")}
    added: list[str] = []
    if hasattr(net, "pretrained_state"):  # control-adm: control copies of the pretrained blocks
        source, added = net.pretrained_state(source)
    new = sorted(k for k in target if k not in source and k.startswith("map_label."))
    new_state = {**source, **{k: torch.zeros_like(target[k]) for k in new}}
    problem = state_dict_mismatch(target, new_state)
    if problem:
        raise LegacyError(f"{path}: weights do not fit the network: {problem}")
    net.load_state_dict(new_state)
    notes = [widened] if widened else []
    if added:
        notes.append(f"{len(added)} control tensors start from the pretrained blocks "
                     "(only they train, as in the release)")
    report = PretrainedReport(str(path), sorted(set(source) - set(added)), new, notes=notes)
    widened_key = "emb_label.weight" if "emb_label.weight" in target else "map_label.weight"
    trainable = set(new) | set(added) | ({widened_key} if widened and not added else set())
    if freeze or getattr(net, "only_control_trains", False):
        for name, p in net.named_parameters():
            p.requires_grad_(name in trainable)
            if name in trainable:
                report.trainable += p.numel()
            else:
                report.frozen += p.numel()
    return report
