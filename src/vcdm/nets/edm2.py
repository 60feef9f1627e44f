"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics
of Diffusion Models", config G), with EDM2's parameter names and shapes, so EDM2's state dicts load as
they are.

Every layer keeps the magnitude (RMS) of its activations at about 1: weights are normalised to unit
norm per output channel and scaled by 1/sqrt(fan_in), and sums, concatenations and the SiLU are
rescaled to unit variance for unit-variance inputs. There are no biases and no normalisation layers
except the pixel norm in the encoder blocks and in attention. In training mode each weight is also
normalised in place before use ("forced weight normalisation"), so the optimiser's step size is
relative to a unit-norm weight.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vcdm.nets.layers import condition_input

SILU_RMS = 0.596  # RMS of silu(x) for x ~ N(0, 1)


def normalize(x: Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> Tensor:
    """``x`` scaled to unit RMS over ``dim`` (default: all but the first dimension)."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def resample(x: Tensor, mode: str, taps: Sequence[float] = (1, 1)) -> Tensor:
    """2x down- or upsampling ('down', 'up') by a separable FIR filter, or ``x`` itself ('keep')."""
    if mode == "keep":
        return x
    f = torch.as_tensor(taps, dtype=torch.float32, device=x.device)
    f = (torch.outer(f, f) / f.sum().square()).to(x.dtype).tile(x.shape[1], 1, 1, 1)
    pad = (len(taps) - 1) // 2
    if mode == "down":
        return F.conv2d(x, f, groups=x.shape[1], stride=2, padding=pad)
    return F.conv_transpose2d(x, f * 4, groups=x.shape[1], stride=2, padding=pad)


def mp_silu(x: Tensor) -> Tensor:
    return F.silu(x) / SILU_RMS


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """(1 - t) a + t b, rescaled to unit magnitude for unit-magnitude, uncorrelated a and b."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Concatenation in which ``b`` contributes the share ``t`` of the magnitude, whatever the widths."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


class MPFourier(nn.Module):
    """Fourier features sqrt(2) cos(2 pi (f x + p)) with random frequencies f ~ N(0, bandwidth^2) and
    phases p ~ U[0, 1) (stored multiplied by 2 pi): unit RMS for any x."""

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels).mul_(2 * math.pi).mul_(bandwidth))  # in place: layers.weight_init
        self.register_buffer("phases", torch.rand(num_channels).mul_(2 * math.pi))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (``kernel=[kh, kw]``) or linear layer (``kernel=[]``), no bias.

    The weight used is normalize(weight) * gain / sqrt(fan_in); in training the stored weight is first
    normalised in place (forced weight normalisation), so it stays at unit norm per output channel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: Tensor, gain: float | Tensor = 1) -> Tensor:
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """EDM2's encoder ('enc') or decoder ('dec') block: optional resampling, a residual branch modulated
    by the embedding (scale 1 + emb_linear(emb) with a learned gain starting at 0), optional self-attention
    with pixel-normalised queries/keys/values, and activations clipped to +-clip_act.

    An encoder block projects its input to ``out_channels`` (``conv_skip``) and pixel-normalises it before
    the residual branch; a decoder block projects only the main branch, after the residual branch.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[float] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        if flavor not in ("enc", "dec") or resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"Block: flavor must be 'enc' or 'dec' and resample_mode 'keep', 'up' or 'down', "
                             f"got {flavor!r}, {resample_mode!r}")
        self.in_channels, self.out_channels, self.flavor = in_channels, out_channels, flavor
        self.resample_mode, self.resample_filter = resample_mode, tuple(resample_filter)
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = resample(x, self.resample_mode, self.resample_filter)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)

        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        y = self.conv_res1(F.dropout(y, p=self.dropout, training=self.training))

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self.attn_proj(self.attend(self.attn_qkv(x))), t=self.attn_balance)
        return x if self.clip_act is None else x.clamp(-self.clip_act, self.clip_act)

    def attend(self, qkv: Tensor) -> Tensor:
        """Multi-head self-attention over pixels; EDM2's channel layout (head, channel, {q, k, v})."""
        b, _, h, w = qkv.shape
        qkv = normalize(qkv.reshape(b, self.num_heads, -1, 3, h * w), dim=2)
        q, k, v = qkv.transpose(2, 4).unbind(3)  # each (b, heads, h*w, channels)
        return F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, -1, h, w)


class EDM2UNet(nn.Module):
    """EDM2's ``UNet`` (its ``training/networks_edm2.py``): same constructor, parameter names and function.

    The conditioning vector (one-hot class or any embedding) enters through ``emb_label`` scaled by
    ``label_gain`` (EDM2: sqrt(label_dim), so a one-hot or unit-norm vector has unit RMS); None means zeros
    (the null condition). EDM2 has no augmentation input: ``augment_labels`` must be None.

    ``label_gain`` and ``noise_gain`` (the noise embedding's gain, EDM2: 1) exist for fine-tuning a pretrained
    network on a wider conditioning, function-preserving at initialisation (``vcdm.legacy.pretrained``):
    a class-conditional network keeps its sqrt(classes) input gain when embedding columns join its classes;
    an unconditional one gets ``noise_gain`` = 1 / mp_sum's weight of the noise embedding, so adding the new
    (zero) label branch leaves the embedding as it was.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions: Sequence[int] = (16, 8),
                 label_balance: float = 0.5, concat_balance: float = 0.5, label_gain: float | None = None,
                 noise_gain: float = 1, **block_kwargs: Any):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.label_gain = math.sqrt(label_dim) if label_gain is None else float(label_gain)
        self.noise_gain = float(noise_gain)
        self.augment_dim = 0
        self.label_balance, self.concat_balance = label_balance, concat_balance
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.out_gain = nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = img_channels + 1  # the constant 'ones' channel lets the first convolution see the border
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="enc",
                                                            attention=res in attn_resolutions, **block_kwargs)

        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="dec",
                                                            attention=res in attn_resolutions, **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        if augment_labels is not None:
            raise ValueError("EDM2UNet has no augmentation input (train it with --augment=0)")
        emb = self.emb_noise(self.emb_fourier(noise_labels), gain=self.noise_gain)
        if self.emb_label is not None:
            labels = condition_input(class_labels, self.label_dim, 0, self.training, emb)
            emb = mp_sum(emb, self.emb_label(labels * self.label_gain), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for block in self.enc.values():
            x = block(x) if isinstance(block, MPConv) else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)
