"""Initialising a training network from pretrained weights (--pretrained_weights / --transfer)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vcdm.checkpoints import state_dict_mismatch
from vcdm.data.structure import Structure
from vcdm.nets.control import class_columns
from vcdm.legacy.edm import _network_kwargs, load_legacy_pickle
from vcdm.legacy.records import LegacyError
from vcdm.legacy.release_nets import is_release_net
from vcdm.legacy.unpickle import PathLike


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
        from vcdm.checkpoints import CheckpointError, load_tensors, read_config

        try:
            read_config(path)
            return load_tensors(path).get("net", {})
        except CheckpointError as e:
            raise LegacyError(str(e)) from None
    record = load_legacy_pickle(path)
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
    from vcdm.nets.precond import Denoiser

    path = Path(path)
    if isinstance(target_net, Denoiser):
        net, structure = target_net.net, structure or target_net.structure
    else:
        net = target_net
    source = dict(_source_state(path))
    target = net.state_dict()
    widened = widen_map_label(path, source, target, structure)
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
    trainable = set(new) | set(added) | ({"map_label.weight"} if widened and not added else set())
    if freeze or getattr(net, "only_control_trains", False):
        for name, p in net.named_parameters():
            p.requires_grad_(name in trainable)
            if name in trainable:
                report.trainable += p.numel()
            else:
                report.frozen += p.numel()
    return report
