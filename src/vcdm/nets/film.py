"""The original release's ``film-ddpmpp``: DDPM++ (EDM's SongUNet, unconditional) whose residual blocks are
modulated by FiLM parameters computed from the conditioning vector.

``get_gammas_betas`` (Linear, GroupNorm, SiLU, Linear, GroupNorm, SiLU, zero-initialised Linear) maps the
conditioning to one (gamma - 1, beta) pair per residual block, in encoder-then-decoder order; a block
applies ``x * gamma + beta`` after its first normalisation and before dropout and its second convolution.
As in the release, pairs are consumed from the end of that list and only the encoder's blocks apply
theirs (its decoder draws a pair and ignores it), so encoder block k gets the pair computed for block
N-1-k (the U-Net being symmetric, the channel counts agree). Parameter names are the release's.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vcdm.nets.layers import GroupNorm, Linear, UNetBlock
from vcdm.nets.songunet import SongUNet


class FilmSongUNet(SongUNet):
    """SongUNet (label_dim 0) plus ``get_gammas_betas`` over a ``cond_dim`` conditioning vector."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, cond_dim: int, **kwargs):
        if kwargs.pop("label_dim", 0):
            raise ValueError("FilmSongUNet: the conditioning enters through FiLM (cond_dim), not label_dim")
        if cond_dim <= 0:
            raise ValueError(f"FilmSongUNet: expected cond_dim > 0 (the release's FiLM net is conditional), "
                             f"got {cond_dim}")
        super().__init__(img_resolution, in_channels, out_channels, label_dim=0, **kwargs)
        self.label_dim = self.cond_dim = cond_dim  # what the Denoiser passes as y
        blocks = [b for b in (*self.enc.values(), *self.dec.values()) if isinstance(b, UNetBlock)]
        self.unet_channels = [b.out_channels for b in blocks]
        emb = self.map_layer0.out_features
        init, init_zero = dict(init_mode="xavier_uniform"), dict(init_mode="xavier_uniform", init_weight=1e-5)
        self.get_gammas_betas = nn.Sequential(
            Linear(cond_dim, emb, **init), GroupNorm(emb), nn.SiLU(), Linear(emb, emb, **init), GroupNorm(emb),
            nn.SiLU(), Linear(emb, 2 * sum(self.unet_channels), **init_zero))

    def film_pairs(self, cond: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(gamma - 1, beta) per residual block, encoder then decoder order, each (B, C, 1, 1)."""
        flat = self.get_gammas_betas(cond)[:, :, None, None]
        return [tuple(pair.chunk(2, dim=1)) for pair in flat.split([2 * n for n in self.unet_channels], dim=1)]

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        cond = class_labels if class_labels is not None else x.new_zeros(x.shape[0], self.cond_dim)
        pairs = self.film_pairs(cond.reshape(x.shape[0], -1).to(x.dtype))
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] → [sin, cos], as EDM
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips = []
        for name, layer in self.enc.items():
            if "aux" in name:
                raise ValueError("FilmSongUNet: only the standard encoder (DDPM++) is supported")
            x = film_block(layer, x, emb, pairs.pop()) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        out = None
        for name, layer in self.dec.items():
            if name.endswith("aux_norm"):
                out = layer(x)
            elif name.endswith("aux_conv"):
                out = layer(F.silu(out))
            else:
                if x.shape[1] != layer.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb)
        return out


def film_block(block: UNetBlock, x: Tensor, emb: Tensor, pair: tuple[Tensor, Tensor]) -> Tensor:
    """UNetBlock.forward with ``x * (1 + gamma_minus_1) + beta`` after its first normalisation."""
    return block.finish(x, block.conv0(F.silu(block.norm0(x))), emb, film=pair)


def film_preset(*, resolution: int, channels: int, cond_dim: int, augment_dim: int, cbase: int | None = None,
                cres: Sequence[int] | None = None, dropout: float = 0.13) -> dict:
    """The release's ``--arch film-ddpmpp`` constructor kwargs (DDPM++: cbase 128, cres 2,2,2)."""
    return dict(img_resolution=resolution, in_channels=channels, out_channels=channels, cond_dim=cond_dim,
                augment_dim=augment_dim, model_channels=128 if cbase is None else cbase,
                channel_mult=[2, 2, 2] if cres is None else list(cres), dropout=dropout,
                embedding_type="positional", channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                resample_filter=[1, 1])

