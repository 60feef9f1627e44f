"""Building blocks of EDM's U-Nets (DDPM++, NCSN++, ADM), with EDM's parameter names and init schemes.

Parameters are created in the same order and with the same random draws as EDM's
``training/networks.py``, so ``torch.manual_seed(s)`` before construction gives EDM's initial weights,
and the forward passes apply the same operations in the same order.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> Tensor:
    """EDM's initialisations. In-place arithmetic throughout: on the meta device (a checkpoint's shape check)
    out-of-place arithmetic runs torch's Python meta kernels, whose first use imports torch._dynamo (1.2 s)."""
    if mode == "xavier_uniform":
        return torch.rand(*shape).mul_(2).sub_(1).mul_(math.sqrt(6 / (fan_in + fan_out)))
    if mode == "xavier_normal":
        return torch.randn(*shape).mul_(math.sqrt(2 / (fan_in + fan_out)))
    if mode == "kaiming_uniform":
        return torch.rand(*shape).mul_(2).sub_(1).mul_(math.sqrt(3 / fan_in))
    if mode == "kaiming_normal":
        return torch.randn(*shape).mul_(math.sqrt(1 / fan_in))
    raise ValueError(f"unknown weight init mode '{mode}'")


def cpu_constant(make: Callable[[], Tensor]) -> Tensor:
    """A constant computed on the CPU, then placed on the default device (the meta device included: no
    arithmetic there, see weight_init)."""
    with torch.device("cpu"):
        value = make()
    return value.to(torch.get_default_device())


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **kw).mul_(init_weight))
        self.bias = nn.Parameter(weight_init([out_features], **kw).mul_(init_bias)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        x = x @ self.weight.to(x.dtype).t()
        return x if self.bias is None else x + self.bias.to(x.dtype)


class Conv2d(nn.Module):
    """Convolution with optional 2x up/downsampling by a separable FIR filter (the `resample_filter` buffer).

    `kernel=0` gives a pure resampling layer without weights. `fused_resample` convolves at the
    high resolution side (NCSN++'s residual encoder) instead of resampling first.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[int] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        kw = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(weight_init(shape, **kw).mul_(init_weight)) if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **kw).mul_(init_bias)) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32, device="cpu")
        self.register_buffer("resample_filter", cpu_constant(lambda: torch.outer(f, f)[None, None] / f.sum().square())
                             if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        fused = self.fused_resample and w is not None
        if self.up:
            pad = max(f_pad - w_pad, 0) if fused else f_pad
            x = F.conv_transpose2d(x, (f * 4).tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=pad)
        if self.down and not fused:
            x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=f_pad)
        if w is not None:
            pad = (max(w_pad - f_pad, 0) if self.up else w_pad + f_pad) if fused else w_pad
            x = F.conv2d(x, w, padding=pad)
        if self.down and fused:
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        return x if self.bias is None else x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)


class GroupNorm(nn.Module):
    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Self-attention over pixels. EDM's channel layout: qkv has (head, channel, {q, k, v}) channels."""
    b, _, h, w = qkv.shape
    q, k, v = qkv.reshape(b, num_heads, -1, 3, h * w).transpose(2, 4).unbind(3)  # each (b, heads, h*w, c)
    return F.scaled_dot_product_attention(q, k, v).transpose(2, 3).contiguous().reshape(b, -1, h, w)


class UNetBlock(nn.Module):
    """Residual block (GroupNorm, SiLU, 3x3 conv, embedding → bias or scale/shift, dropout, 3x3 conv),
    optionally resampling and followed by self-attention; the union of DDPM++, NCSN++ and ADM blocks."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5, resample_filter: Sequence[int] = (1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True, init: dict | None = None,
                 init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = init or {}
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.finish(x, self.conv0(F.silu(self.norm0(x))), emb)

    def finish(self, orig: Tensor, x: Tensor, emb: Tensor, film: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The block after its first convolution ``x`` of the input ``orig``: modulation by ``emb`` (then
        ``x * (1 + gamma_minus_1) + beta`` for ``film = (gamma_minus_1, beta)``), the second convolution,
        the skip connection and attention."""
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        if film is not None:
            x = x * (film[0] + 1) + film[1]
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (orig if self.skip is None else self.skip(orig))) * self.skip_scale
        if self.num_heads:
            x = (self.proj(attention(self.qkv(self.norm2(x)), self.num_heads)) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal noise-level embedding [cos, sin] (DDPM++, ADM); `endpoint` makes the lowest frequency
    exactly 1/max_positions."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        x = torch.outer(x, ((1 / self.max_positions) ** freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos, sin] of the noise level (NCSN++); frequencies are a buffer."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2).mul_(scale))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def condition_input(labels: Tensor | None, label_dim: int, dropout: float, training: bool, like: Tensor) -> Tensor:
    """The conditioning vector a network feeds to `map_label`.

    None means "no condition" and becomes zeros: the unconditional branch of classifier-free guidance,
    the same input that label dropout gives. In training, each sample's whole vector is zeroed with
    probability `dropout`, as EDM does.
    """
    batch = like.shape[0]
    if labels is None:
        return torch.zeros(batch, label_dim, device=like.device, dtype=like.dtype)
    if labels.shape != (batch, label_dim):
        raise ValueError(f"class_labels: expected shape ({batch}, {label_dim}), got {tuple(labels.shape)}")
    if training and dropout:
        labels = labels * (torch.rand([batch, 1], device=labels.device) >= dropout).to(labels.dtype)
    return labels
