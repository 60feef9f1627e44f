"""The original release's diffusion prior (``--arch dalle2``): a DALL-E-2 DiffusionPriorNetwork.

A causal transformer over the tokens [augment, cond, time, x, query] (augment and cond only when the
model has them); the denoised embedding is read from the learned query. Every detail follows the
release, so its trained weights give the same function and import under the same parameter names:

- multi-query attention (8 query heads, one shared key/value head) with a learned null key/value
  prepended, cosine-similarity logits at a fixed scale of 16, a T5 relative position bias (32
  buckets), rotary embedding on the first 32 head channels (interleaved pairs), and a LayerNorm after
  the output projection; SwiGLU feed-forward; LayerNorms with a gain ``g`` and no bias;
- the noisy embedding is a raw token (projected in and out only when its size differs from ``dim``),
  so adding a constant to every coordinate of x does not change the output; the conditioning vector
  is a raw token when its size is ``dim``, else linearly projected, never rescaled;
- the noise label gets a sinusoidal embedding ([sin, cos]) and a 2-hidden-layer SiLU MLP;
- the final LayerNorm first divides by the per-token maximum ("stable"), then a bias-free projection.

``--arch prior`` (vcdm.nets.prior) is vcdm's own variant of this design.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vcdm.nets.layers import cpu_constant

COSINE_SCALE = 16.0  # fixed logit scale of the cosine-similarity attention
ROTARY_DIM = 32      # head channels that get the rotary embedding (min(32, dim_head))


class LayerNorm(nn.Module):
    """LayerNorm with a gain ``g`` and no bias; ``stable`` divides by the maximum first."""

    def __init__(self, dim: int, stable: bool = False):
        super().__init__()
        self.stable = stable
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        if self.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()
        var = torch.var(x, dim=-1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=-1, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.g


class Rotary(nn.Module):
    """Rotary position embedding of the first 2 * len(freqs) channels, rotating pairs (2i, 2i + 1).

    ``freqs`` is part of the state (as in the release, one module shared by every layer) but not trained.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", cpu_constant(lambda: 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, t: Tensor) -> Tensor:
        pos = torch.arange(t.shape[-2], device=t.device).to(self.freqs.dtype)
        angles = (pos[:, None] * self.freqs).repeat_interleave(2, dim=-1).to(t)
        r = angles.shape[-1]
        head, tail = t[..., :r], t[..., r:]
        even, odd = head.unflatten(-1, (-1, 2)).unbind(-1)
        swapped = torch.stack((-odd, even), dim=-1).flatten(-2)
        return torch.cat((head * angles.cos() + swapped * angles.sin(), tail), dim=-1)


class RelPosBias(nn.Module):
    """T5 relative position bias, (heads, n, n + 1) for n queries and the null key followed by n keys."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads, _weight=torch.randn(num_buckets, heads))  # its
        # own init, torch.nn.init.normal_, is out-of-place arithmetic on the meta device (layers.weight_init)

    def forward(self, n: int, device: torch.device) -> Tensor:
        dist = (torch.arange(n, device=device)[:, None] - torch.arange(n + 1, device=device)).clamp(min=0)
        exact = self.num_buckets // 2
        far = exact + (torch.log(dist.clamp(min=1).float() / exact) / math.log(self.max_distance / exact)
                       * (self.num_buckets - exact)).long()
        bucket = torch.where(dist < exact, dist, far.clamp(max=self.num_buckets - 1))
        return self.relative_attention_bias(bucket).permute(2, 0, 1)


class MultiQueryCosineAttention(nn.Module):
    """Causal multi-query cosine-similarity attention with a learned null key/value."""

    def __init__(self, dim: int, heads: int, dim_head: int, rotary_emb: Rotary):
        super().__init__()
        self.heads = heads
        self.norm = LayerNorm(dim)
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.rotary_emb = rotary_emb
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), LayerNorm(dim))

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)   # (b, h, n, d)
        k, v = self.to_kv(x).chunk(2, dim=-1)                               # (b, n, d), shared by the heads
        q, k = self.rotary_emb(q), self.rotary_emb(k)
        null_k, null_v = (t.expand(b, 1, -1) for t in self.null_kv.unbind(0))
        k, v = torch.cat((null_k, k), dim=1), torch.cat((null_v, v), dim=1)
        q, k = (F.normalize(t, dim=-1) * math.sqrt(COSINE_SCALE) for t in (q, k))
        sim = torch.einsum("bhid,bjd->bhij", q, k) + bias
        future = torch.ones(n, n + 1, dtype=torch.bool, device=x.device).triu(2)  # key j = token j - 1
        sim = sim.masked_fill(future, -torch.finfo(sim.dtype).max)
        attn = sim.softmax(dim=-1, dtype=torch.float32).to(sim.dtype)
        out = torch.einsum("bhij,bjd->bhid", attn, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.silu(gate)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """Pre-norm SwiGLU MLP; the placeholders keep the release's indices (.0 norm, .1 in, .5 out)."""
    inner = mult * dim
    return nn.Sequential(LayerNorm(dim), nn.Linear(dim, 2 * inner, bias=False), SwiGLU(), nn.Identity(),
                         nn.Identity(), nn.Linear(inner, dim, bias=False))


class CausalTransformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.rel_pos_bias = RelPosBias(heads)
        rotary = Rotary(min(ROTARY_DIM, dim_head))
        self.layers = nn.ModuleList(
            nn.ModuleList([MultiQueryCosineAttention(dim, heads, dim_head, rotary), feed_forward(dim, ff_mult)])
            for _ in range(depth))
        self.norm = LayerNorm(dim, stable=True)
        self.project_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """The last token's output for tokens x (B, n, dim)."""
        bias = self.rel_pos_bias(x.shape[1], x.device)
        for attn, ff in self.layers:
            x = attn(x, bias) + x
            x = ff(x) + x
        return self.project_out(self.norm(x[:, -1]))


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=t.dtype) * -(math.log(10000) / (half - 1)))
        angles = t[:, None] * freqs
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class TimeMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU()),
                                 nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.SiLU()), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float())


class DALLE2Prior(nn.Module):
    """Denoiser network for one embedding vector x (B, embed_dim), conditioned on a vector `cond` (B, cond_dim).

    Parameter names equal the release's ``DALLE2CLIPModel`` state dict. Missing augment labels give
    the augment projection's bias (the release's "not augmented" token).
    """

    def __init__(self, embed_dim: int, cond_dim: int = 0, augment_dim: int = 0, dim: int = 512, depth: int = 6,
                 heads: int = 8, dim_head: int = 64, ff_mult: int = 4):
        super().__init__()
        self.embed_dim, self.cond_dim, self.augment_dim = embed_dim, cond_dim, augment_dim
        self.to_cond_embeds = nn.Sequential(nn.Linear(cond_dim, dim)) if cond_dim and cond_dim != dim else None
        self.to_time_embeds = nn.Sequential(nn.Sequential(SinusoidalEmbedding(dim), TimeMLP(dim)))
        self.to_augment_embeds = nn.Sequential(nn.Linear(augment_dim, dim)) if augment_dim else None
        self.learned_query = nn.Parameter(torch.randn(dim))
        self.causal_transformer = CausalTransformer(dim, depth, heads, dim_head, ff_mult)
        self.in_proj = nn.Linear(embed_dim, dim) if embed_dim != dim else None
        self.out_proj = nn.Linear(dim, embed_dim) if embed_dim != dim else None

    @property
    def label_dim(self) -> int:
        """The conditioning size under the name the preconditioner reads."""
        return self.cond_dim

    def forward(self, x: Tensor, noise_labels: Tensor, cond: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        if x.shape[1:] != (self.embed_dim,):
            raise ValueError(f"DALLE2Prior: x has shape {tuple(x.shape)}, expected (B, {self.embed_dim})")
        if self.in_proj is not None:
            x = self.in_proj(x)
        tokens = []
        if self.augment_dim:
            aug = self.to_augment_embeds[0]
            tokens.append(aug(augment_labels) if augment_labels is not None else aug.bias.expand(b, -1))
        elif augment_labels is not None:
            raise ValueError("DALLE2Prior: augment labels given, but the network was built without augmentation")
        if self.cond_dim:
            if cond is None:
                raise ValueError(f"DALLE2Prior: the network is conditioned on {self.cond_dim} values; got none")
            cond = cond.reshape(b, -1)
            tokens.append(self.to_cond_embeds(cond) if self.to_cond_embeds is not None else cond)
        tokens.append(self.to_time_embeds(noise_labels.expand(b).to(x.dtype)))
        tokens += [x, self.learned_query.expand(b, -1)]
        out = self.causal_transformer(torch.stack(tokens, dim=1))
        return self.out_proj(out) if self.out_proj is not None else out
