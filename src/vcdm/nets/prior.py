"""DALL-E-2-style diffusion prior: a causal transformer that denoises one embedding vector.

The sequence is [condition, augmentation, noise level, noised embedding, learned query] (the first two
only when the model has them); the prediction is read from the query, which attends to every token.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vcdm.nets.layers import PositionalEmbedding, condition_input


def rotary(n: int, dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin (n, dim/2) of the rotary position embedding angles for positions 0..n-1."""
    freqs = 10000 ** -(torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    angles = torch.outer(torch.arange(n, dtype=torch.float32, device=device), freqs)
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + dim/2) of x (..., n, dim) by the position's angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class MultiHeadRotaryAttention(nn.Module):
    """Pre-norm causal multi-head self-attention with rotary position embedding."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(dim, bias=False)
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q, k, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """Pre-norm SwiGLU MLP."""

    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.norm = nn.LayerNorm(dim, bias=False)
        self.proj_in = nn.Linear(dim, 2 * mult * dim, bias=False)
        self.proj_out = nn.Linear(mult * dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj_in(self.norm(x)).chunk(2, dim=-1)
        return self.proj_out(F.dropout(a * F.silu(gate), self.dropout, self.training))


class TransformerBlock(nn.Module):
    """Pre-norm residual attention then feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int, dropout: float):
        super().__init__()
        self.attn = MultiHeadRotaryAttention(dim, heads, dim_head, dropout)
        self.ff = FeedForward(dim, ff_mult, dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(x, cos, sin)
        return x + self.ff(x)


class PriorTransformer(nn.Module):
    """Denoiser network for one embedding vector x (B, embed_dim).

    The conditioning vector enters as its own token ``map_label(labels * sqrt(label_dim))`` (scaled as
    in SongUNet, so a one-hot or unit-norm vector has unit RMS); None, or label dropout in training,
    gives zeros. Missing augment labels mean "not augmented" (zeros). The noise label gets a
    sinusoidal embedding and a 2-hidden-layer SiLU MLP. x always enters through a linear projection:
    with x as a raw token, pre-norm LayerNorms would make the output exactly invariant to adding a
    constant to every coordinate of x.
    """

    def __init__(self, embed_dim: int, label_dim: int = 0, augment_dim: int = 0, dim: int = 512, depth: int = 6,
                 heads: int = 8, dim_head: int = 64, ff_mult: int = 4, dropout: float = 0.0, label_dropout: float = 0):
        if dim_head % 2:
            raise ValueError(f"PriorTransformer: dim_head must be even for the rotary embedding, got {dim_head}")
        super().__init__()
        self.embed_dim, self.label_dim, self.augment_dim, self.label_dropout = embed_dim, label_dim, augment_dim, label_dropout
        self.dim_head = dim_head
        self.map_label = nn.Linear(label_dim, dim) if label_dim else None
        self.map_augment = nn.Linear(augment_dim, dim) if augment_dim else None
        self.map_noise = PositionalEmbedding(dim, endpoint=True)
        self.noise_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, 2 * dim), nn.SiLU(),
                                       nn.Linear(2 * dim, dim))
        self.proj_in = nn.Linear(embed_dim, dim)  # even when embed_dim == dim: see the class docstring
        self.query = nn.Parameter(torch.randn(dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, dim_head, ff_mult, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, bias=False)
        self.proj_out = nn.Linear(dim, embed_dim, bias=False)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        tokens = []
        if self.map_label is not None:
            labels = condition_input(class_labels, self.label_dim, self.label_dropout, self.training, x)
            tokens.append(self.map_label(labels * math.sqrt(self.label_dim)))
        if self.map_augment is not None:
            if augment_labels is None:
                augment_labels = torch.zeros(x.shape[0], self.augment_dim, device=x.device, dtype=x.dtype)
            tokens.append(self.map_augment(augment_labels))
        tokens += [self.noise_mlp(self.map_noise(noise_labels)), self.proj_in(x), self.query.expand(x.shape[0], -1)]
        h = torch.stack(tokens, dim=1)
        cos, sin = rotary(h.shape[1], self.dim_head, h.device)
        for block in self.blocks:
            h = block(h, cos, sin)
        return self.proj_out(self.norm(h[:, -1]))
