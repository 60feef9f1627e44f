"""The original release's ``control-adm``: a ControlNet-style ADM for fine-tuning EDM's class-conditional
ImageNet model on new conditioning (e.g. a CLIP embedding) while its own weights stay frozen.

The class label still enters through ``map_label``; the other observed tensors (``control``) enter a
trainable copy of the encoder (``control_enc``) and of the first two decoder blocks (``control_middle``)
through ``control_in``, added to the embedding. Each copied block's output reaches the frozen network
through a 1x1 convolution initialised near zero (``control_convs``: added to the encoder's skip
connections; ``control_convs_middle``: added after the first two decoder blocks), so training starts
from the pretrained model's function. Parameter names are the release's.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vcdm.data.structure import Structure
from vcdm.nets.adm import DhariwalUNet
from vcdm.nets.layers import Conv2d, Linear, UNetBlock, condition_input

INIT_ZERO = dict(init_mode="xavier_uniform", init_weight=1e-5)  # the release's control layers
MIDDLE = 2  # decoder blocks with a control copy


def class_columns(structure: Structure | None) -> tuple[int, int] | None:
    """(first column, number of classes) of the one-hot class label inside the conditioning vector
    (observed tensors in name order: LabelledCLIPDataset gives [embedding, label]); None without one."""
    if structure is None or "label" not in structure.observed_names:
        return None
    names = structure.observed_names
    return sum(structure.numel(n) for n in names[:names.index("label")]), structure.numel("label")


class ControlDhariwalUNet(DhariwalUNet):
    """ADM over a conditioning vector of ``cond_dim`` values whose ``class_columns`` = (start, count) slice is
    the class one-hot (``map_label``); the remaining columns, in order, are the control input.
    ``label_dim`` is the whole conditioning size (what the Denoiser passes); ``class_dim`` the class count."""

    only_control_trains = True  # the release freezes everything else, whatever --freeze_pretrained says

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, cond_dim: int,
                 class_columns: Sequence[int], **kwargs):
        start, count = (int(v) for v in class_columns)
        if count <= 0 or start < 0 or start + count > cond_dim or cond_dim == count:
            raise ValueError(f"ControlDhariwalUNet: class columns {start}..{start + count - 1} must lie inside the "
                             f"{cond_dim}-d conditioning and leave room for the control input")
        kwargs.pop("label_dim", None)
        super().__init__(img_resolution, in_channels, out_channels, label_dim=count, **kwargs)
        self.class_columns, self.class_dim, self.label_dim = (start, count), count, cond_dim
        self.control_enc = copy.deepcopy(self.enc)
        self.control_middle = nn.ModuleList(copy.deepcopy(b) for b in list(self.dec.values())[:MIDDLE])
        self.control_convs = nn.ModuleList(Conv2d(b.out_channels, b.out_channels, 1, **INIT_ZERO)
                                           for b in self.enc.values())
        self.control_convs_middle = nn.ModuleList(Conv2d(b.out_channels, b.out_channels, 1, **INIT_ZERO)
                                                  for b in list(self.dec.values())[:MIDDLE])
        self.control_in = Linear(cond_dim - count, self.map_label.out_features, **INIT_ZERO)

    def copied_from(self) -> dict[str, str]:
        """Control tensor name → the pretrained tensor it starts as (the release deep-copies after loading)."""
        pairs = {f"control_enc.{k}": f"enc.{k}" for k in self.enc.state_dict()}
        for i, name in enumerate(list(self.dec.keys())[:MIDDLE]):
            pairs.update({f"control_middle.{i}.{k}": f"dec.{name}.{k}" for k in self.dec[name].state_dict()})
        return pairs

    def pretrained_state(self, source: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Complete a class-conditional ADM's state dict with the control tensors: copies of the pretrained
        encoder/middle blocks, this network's own (near-zero) values for the new layers. Returns the state and
        the names added; a state that already has them (a control-adm checkpoint) is returned as it is."""
        own = self.state_dict()
        if any(k.startswith("control_") for k in source):
            return source, []
        added = {k: source[v] if v in source else own[k] for k, v in self.copied_from().items()}
        added.update({k: v for k, v in own.items() if k.startswith("control_") and k not in added})
        return {**source, **added}, sorted(added)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        y = x.new_zeros(x.shape[0], self.label_dim) if class_labels is None else class_labels.to(x.dtype)
        start, count = self.class_columns
        control = torch.cat([y[:, :start], y[:, start + count:]], dim=1)
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        labels = condition_input(y[:, start:start + count], count, self.label_dropout, self.training, x)
        emb = F.silu(emb + self.map_label(labels))
        control_emb = emb + self.control_in(control)

        skips, ctrl = [], x
        for layer, copy_, conv in zip(self.enc.values(), self.control_enc.values(), self.control_convs):
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            ctrl = copy_(ctrl, control_emb) if isinstance(copy_, UNetBlock) else copy_(ctrl)
            skips.append(x + conv(ctrl))
        for i, layer in enumerate(self.dec.values()):
            if x.shape[1] != layer.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
            if i < MIDDLE:
                ctrl = self.control_middle[i](ctrl, control_emb)
                x = x + self.control_convs_middle[i](ctrl)
        return self.out_conv(F.silu(self.out_norm(x)))
