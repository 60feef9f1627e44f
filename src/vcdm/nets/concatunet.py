"""The original release's ``concatunet`` (its default ``--arch``): one DDPM++-style U-Net over every tensor
of a sample at once, so a single network can generate an image and its embedding jointly
(``--exist 1,1 --observed 0,0``) or condition on some tensors while generating others.

Image-shaped tensors (C, H, W) are concatenated along channels (observed ones as extra input channels;
without any, a constant 1x32x32 zero image stands in). Vector tensors are concatenated into one vector
that enters like EDM's class labels, ``map_label(v * sqrt(dim))``. When some vectors are generated, every
block also updates the embedding from its own activations (the release's ``UNetBlockShittyModifyEmb``,
here `EmbUNetBlock`) and ``label_out`` reads the generated vectors from the final embedding.
Parameter names are the release's (``enc.16x16_block0_unet.emb2int.weight``, ``label_out.weight``, …),
so the weights of its pickles load unchanged.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vcdm.nets.layers import (Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock, condition_input)

EMB_LAYER_TYPES = ("shitty", "shitty-skip")  # the release's names; its 'attn' variants are not implemented
NO_IMAGE_RESOLUTION = 32  # the release's stand-in image when no tensor is image-shaped


class EmbUNetBlock(UNetBlock):
    """A DDPM++ block that also carries the embedding: after the first convolution,
    ``emb <- skip(emb) + int2emb(silu(intnorm(emb2int(emb) + x2int(mean_hw(x)))))``, then the block
    proceeds as UNetBlock with the new embedding. Returns ``(x, emb)``. With ``emb_channels_in`` wider
    than ``emb_channels`` (decoder blocks of 'shitty-skip', fed the encoder's embedding too), ``emb_skip``
    projects the input embedding."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, emb_channels_in: int | None = None,
                 **kwargs):
        super().__init__(in_channels, out_channels, emb_channels, **kwargs)
        init, eps = kwargs.get("init") or {}, kwargs.get("eps", 1e-5)
        self.emb_channels_in = emb_channels if emb_channels_in is None else emb_channels_in
        self.emb2int = Linear(self.emb_channels_in, emb_channels, **init)
        self.x2int = Linear(out_channels, emb_channels, **init)
        self.intnorm = GroupNorm(emb_channels, eps=eps)
        self.int2emb = Linear(emb_channels, emb_channels, **(kwargs.get("init_zero") or dict(init_weight=0)))
        wide = self.emb_channels_in != emb_channels
        self.emb_skip = Linear(self.emb_channels_in, emb_channels, **init) if wide else None

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        h = self.conv0(F.silu(self.norm0(x)))
        skipped = emb if self.emb_skip is None else self.emb_skip(emb)
        emb = skipped + self.int2emb(F.silu(self.intnorm(self.emb2int(emb) + self.x2int(h.mean(dim=(2, 3))))))
        return self.finish(x, h, emb), emb


class ConcatUNet(nn.Module):
    """The release's ConcatUNet over the existing tensors of a Structure, in its order.

    ``shapes``/``observed`` describe those tensors (C, H, W for images, (D,) for vectors). The network
    reads the flat latent (B, latent_dim) and flat conditioning (B, label_dim = observed size), and
    returns the flat denoised latent; ``flat_latent`` tells the Denoiser so. Defaults are the release's
    ``--arch concatunet`` preset except the U-Net's channel multipliers (``channel_mult``).
    """

    flat_latent = True

    def __init__(self, shapes: Sequence[Sequence[int]], observed: Sequence[bool], augment_dim: int = 0,
                 model_channels: int = 128, channel_mult: Sequence[int] = (2, 2, 2), channel_mult_emb: int = 4,
                 channel_mult_noise: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0, embedding_type: str = "positional",
                 resample_filter: Sequence[int] = (1, 1), emb_layer_type: str = "shitty"):
        super().__init__()
        self.shapes = [tuple(int(v) for v in s) for s in shapes]
        self.observed = [bool(o) for o in observed]
        _check_tensors(self.shapes, self.observed)
        images = [(s, o) for s, o in zip(self.shapes, self.observed) if len(s) == 3]
        vectors = [(s, o) for s, o in zip(self.shapes, self.observed) if len(s) == 1]
        self.img_resolution = images[0][0][2] if images else NO_IMAGE_RESOLUTION
        self.in_channels = sum(s[0] for s, _ in images) if images else 1
        self.out_channels = sum(s[0] for s, o in images if not o) if images else 1
        self.label_in_dim = sum(s[0] for s, _ in vectors)
        self.label_out_dim = sum(s[0] for s, o in vectors if not o)
        self.label_dim = sum(math.prod(s) for s, o in zip(self.shapes, self.observed) if o)  # the Denoiser's y
        self.augment_dim, self.label_dropout = augment_dim, label_dropout
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"ConcatUNet: embedding_type must be positional or fourier, got '{embedding_type}'")
        if self.label_out_dim and emb_layer_type not in EMB_LAYER_TYPES:
            raise ValueError(f"ConcatUNet: emb_layer_type '{emb_layer_type}' is not implemented "
                             f"(supported: {', '.join(EMB_LAYER_TYPES)})")
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=init,
                     init_zero=init_zero, init_attn=dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2)))
        self.joint = self.label_out_dim > 0
        Block = EmbUNetBlock if self.joint else UNetBlock
        dec_emb_in = dict(emb_channels_in=emb_channels * (2 if "skip" in emb_layer_type else 1)) if self.joint else {}

        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(self.label_in_dim, noise_channels, **init) if self.label_in_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.label_out = Linear(emb_channels, self.label_out_dim, **init_zero) if self.joint else None

        self.enc = nn.ModuleDict()
        cout = self.in_channels
        for level, mult in enumerate(channel_mult):
            res = self.img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down_unet"] = Block(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}_unet"] = Block(cin, cout, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for b in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = self.img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0_unet"] = Block(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1_unet"] = Block(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up_unet"] = Block(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}_unet"] = Block(cin, cout, attention=attn, **block, **dec_emb_in)
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, self.out_channels, kernel=3, **init_zero)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        """Flat latent (B, latent_dim) and conditioning (B, label_dim) → flat output (B, latent_dim)."""
        tensors = self._unflatten(x, class_labels)
        images = [t for t, s in zip(tensors, self.shapes) if len(s) == 3]
        vectors = [t for t, s in zip(tensors, self.shapes) if len(s) == 1]
        res = self.img_resolution
        img = torch.cat(images, dim=1) if images else x.new_zeros(x.shape[0], 1, res, res)
        vec = torch.cat(vectors, dim=1) if vectors else None
        img, vec = self.unet(img, vec, noise_labels, augment_labels)
        if not images and vec is not None:
            vec = vec + 0 * img.sum()  # keep the image path in the graph (DDP), as the release does
        out = []
        for s, o in zip(self.shapes, self.observed):
            if o:
                continue
            if len(s) == 3:
                part, img = img[:, :s[0]], img[:, s[0]:]
            else:
                part, vec = vec[:, :s[0]], vec[:, s[0]:]
            out.append(part.reshape(x.shape[0], -1))
        return torch.cat(out, dim=1)

    def _unflatten(self, x: Tensor, y: Tensor | None) -> list[Tensor]:
        B, lat, obs = x.shape[0], iter(x.reshape(x.shape[0], -1).split(self._sizes(False), dim=1)), None
        if self.label_dim:
            y = x.new_zeros(B, self.label_dim) if y is None else y.reshape(B, -1).to(x.dtype)
            obs = iter(y.split(self._sizes(True), dim=1))
        return [next(obs if o else lat).reshape(B, *s) for s, o in zip(self.shapes, self.observed)]

    def _sizes(self, observed: bool) -> list[int]:
        return [math.prod(s) for s, o in zip(self.shapes, self.observed) if o == observed]

    def unet(self, img: Tensor, vec: Tensor | None, noise_labels: Tensor,
             augment_labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The release's SongUNet with vector input and output:
        (image, vector) → (latent image channels, latent vectors)."""
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] → [sin, cos], as EDM
        if self.map_label is not None:
            labels = condition_input(vec, self.label_in_dim, self.label_dropout, self.training, img)
            emb = emb + self.map_label(labels * math.sqrt(self.label_in_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips, emb_skips = [], []
        for layer in self.enc.values():
            img, emb = self._block(layer, img, emb) if isinstance(layer, UNetBlock) else (layer(img), emb)
            skips.append(img)
            emb_skips.append(emb)
        out = None
        for name, layer in self.dec.items():
            if name.endswith("aux_norm"):
                out = layer(img)
            elif name.endswith("aux_conv"):
                out = layer(F.silu(out))
            else:
                if img.shape[1] != layer.in_channels:
                    img = torch.cat([img, skips.pop()], dim=1)
                if self.joint and emb.shape[1] != layer.emb_channels_in:
                    emb = torch.cat([emb, emb_skips.pop()], dim=1)
                img, emb = self._block(layer, img, emb)
        return out, (self.label_out(emb) if self.label_out is not None else None)

    def _block(self, layer: UNetBlock, img: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        return layer(img, emb) if self.joint else (layer(img, emb), emb)


def _check_tensors(shapes: list[tuple[int, ...]], observed: list[bool]) -> None:
    if len(shapes) != len(observed) or not shapes:
        raise ValueError(f"ConcatUNet: expected one observed flag per tensor, got {len(shapes)} shapes and "
                         f"{len(observed)} flags")
    if any(len(s) not in (1, 3) for s in shapes):
        raise ValueError(f"ConcatUNet: every tensor must be an image (C, H, W) or a vector (D,), got {shapes}")
    sizes = {s[1:] for s in shapes if len(s) == 3}
    if len(sizes) > 1 or any(h != w for h, w in sizes):
        raise ValueError(f"ConcatUNet: image tensors must share one square size, got {sorted(sizes)}")
    if all(observed):
        raise ValueError("ConcatUNet: every tensor is observed; nothing to generate")
