"""Initialising a training network from pretrained weights (--pretrained_weights / --transfer)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vcdm.checkpoints import state_dict_mismatch
from vcdm.legacy.edm import _network_kwargs, load_legacy_pickle
from vcdm.legacy.records import LegacyError
from vcdm.legacy.unpickle import PathLike


@dataclass
class PretrainedReport:
    source: str
    copied: list[str]
    zero_init: list[str]              # tensors the source lacks (map_label): set to zero
    frozen: int = 0                   # number of parameter values with requires_grad False
    trainable: int = 0

    def __str__(self) -> str:
        s = f"loaded {len(self.copied)} tensors from {self.source}"
        if self.zero_init:
            s += f"; zero-initialised new {', '.join(self.zero_init)}"
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
    _network_kwargs(record)  # refuses networks without a vcdm equivalent, with the reason
    return record.state_dict


def load_pretrained(path: PathLike, target_net: nn.Module, *, freeze: bool = False) -> PretrainedReport:
    """Copy a pretrained network's weights (EDM/VCDM .pkl or vcdm .safetensors) into ``target_net``.

    Tensors must match by name and shape, except ``map_label.*`` which an unconditional source lacks:
    those start at zero, so the network initially ignores its new conditioning input. With
    ``freeze``, only those new parameters stay trainable (the release's --freeze_pretrained).
    """
    from vcdm.nets.precond import Denoiser

    path = Path(path)
    net = target_net.net if isinstance(target_net, Denoiser) else target_net
    source = _source_state(path)
    target = net.state_dict()
    new = sorted(k for k in target if k not in source and k.startswith("map_label."))
    new_state = {**source, **{k: torch.zeros_like(target[k]) for k in new}}
    problem = state_dict_mismatch(target, new_state)
    if problem:
        raise LegacyError(f"{path}: weights do not fit the network: {problem}")
    net.load_state_dict(new_state)
    report = PretrainedReport(str(path), sorted(source), new)
    if freeze:
        for name, p in net.named_parameters():
            p.requires_grad_(name in new)
            if name in new:
                report.trainable += p.numel()
            else:
                report.frozen += p.numel()
    return report
