"""EDM's non-leaky geometric augmentation (Karras et al. 2022, App. F.2; built on ADA's pipeline).

Each enabled transform is applied to a sample with probability ``p * multiplier``; what was done is
returned as augment labels, which the network sees through ``map_augment`` and which are zero at
sampling time, so the augmentations do not leak into generated images. Labels follow EDM's layout:
one group per *enabled* transform, in this order: xflip (1), yflip (1), rotate_int (2), translate_int (2),
scale (1), rotate_frac (2), aniso (2), translate_frac (2). EDM's training setup (``edm_augment_pipe``)
enables xflip, yflip, scale, rotate_frac, aniso and translate_frac: 9 labels.

Random draws follow EDM's order and shapes, from ``generator`` (default: the global RNG, as EDM).
EDM's colour transforms are not included (EDM's training never enables them).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Low-pass filter of the Symlet-6 wavelet, used to resample at 2x while transforming.
SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
        0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
        0.0017677118642428036, -0.007800708325034148]


def _affine(a, b, c, d, e, f, *, n: int, device: torch.device) -> torch.Tensor:
    """(n, 3, 3) matrices [[a, b, c], [d, e, f], [0, 0, 1]] from per-sample tensors or scalars."""
    rows = [a, b, c, d, e, f, 0, 0, 1]
    elems = [v.to(torch.float32) if torch.is_tensor(v) else torch.full([n], float(v), device=device) for v in rows]
    return torch.stack(torch.broadcast_tensors(*elems), dim=-1).reshape(n, 3, 3)


def _translate(tx, ty, **kw):
    return _affine(1, 0, tx, 0, 1, ty, **kw)


def _scale(sx, sy, **kw):
    return _affine(sx, 0, 0, 0, sy, 0, **kw)


def _rotate(theta, **kw):
    return _affine(theta.cos(), -theta.sin(), 0, theta.sin(), theta.cos(), 0, **kw)


class AugmentPipe:
    def __init__(self, p: float = 1.0, xflip: float = 0, yflip: float = 0, rotate_int: float = 0,
                 translate_int: float = 0, translate_int_max: float = 0.125, scale: float = 0, rotate_frac: float = 0,
                 aniso: float = 0, translate_frac: float = 0, scale_std: float = 0.2, rotate_frac_max: float = 1,
                 aniso_std: float = 0.2, aniso_rotate_prob: float = 0.5, translate_frac_std: float = 0.125):
        """``p`` is the overall probability; the others are per-transform probability multipliers and
        ranges, with EDM's names and defaults (all transforms off by default)."""
        self.kwargs = dict(p=p, xflip=xflip, yflip=yflip, rotate_int=rotate_int, translate_int=translate_int,
                           translate_int_max=translate_int_max, scale=scale, rotate_frac=rotate_frac, aniso=aniso,
                           translate_frac=translate_frac, scale_std=scale_std, rotate_frac_max=rotate_frac_max,
                           aniso_std=aniso_std, aniso_rotate_prob=aniso_rotate_prob, translate_frac_std=translate_frac_std)
        for k, v in self.kwargs.items():
            setattr(self, k, float(v))

    @property
    def label_dim(self) -> int:
        """Number of augment labels per sample (the network's augment_dim)."""
        sizes = dict(xflip=1, yflip=1, rotate_int=2, translate_int=2, scale=1, rotate_frac=2, aniso=2, translate_frac=2)
        return sum(n for k, n in sizes.items() if getattr(self, k) > 0)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        N, C, H, W = images.shape
        dev = images.device
        kw = dict(n=N, device=dev)
        rand = lambda *size: torch.rand(size, device=dev, generator=generator)
        randn = lambda *size: torch.randn(size, device=dev, generator=generator)
        randint = lambda high, *size: torch.randint(high, size, device=dev, generator=generator)
        keep = lambda prob, w, u: torch.where(u < prob * self.p, w, torch.zeros_like(w))
        labels = [torch.zeros([N, 0], device=dev)]

        # Pixel blitting: exact, no resampling.
        if self.xflip > 0:
            w = randint(2, N, 1, 1, 1)
            w = keep(self.xflip, w, rand(N, 1, 1, 1))
            images = torch.where(w == 1, images.flip(3), images)
            labels.append(w)
        if self.yflip > 0:
            w = randint(2, N, 1, 1, 1)
            w = keep(self.yflip, w, rand(N, 1, 1, 1))
            images = torch.where(w == 1, images.flip(2), images)
            labels.append(w)
        if self.rotate_int > 0:
            w = randint(4, N, 1, 1, 1)
            w = keep(self.rotate_int, w, rand(N, 1, 1, 1))
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        if self.translate_int > 0:
            w = rand(2, N, 1, 1, 1) * 2 - 1
            w = keep(self.translate_int, w, rand(1, N, 1, 1, 1))
            tx = (w[0] * (W * self.translate_int_max)).round().to(torch.int64)
            ty = (w[1] * (H * self.translate_int_max)).round().to(torch.int64)
            b, c, y, x = torch.meshgrid(*(torch.arange(s, device=dev) for s in images.shape), indexing="ij")
            x = W - 1 - (W - 1 - (x - tx) % (W * 2 - 2)).abs()  # shift with mirror-reflection at the borders
            y = H - 1 - (H - 1 - (y + ty) % (H * 2 - 2)).abs()
            images = images.flatten()[((b * C + c) * H + y) * W + x]
            labels += [tx / (W * self.translate_int_max), ty / (H * self.translate_int_max)]

        # Geometric transformations, composed as one inverse matrix per sample.
        G_inv = torch.eye(3, device=dev).expand(N, 3, 3)
        applied = False
        if self.scale > 0:
            w = keep(self.scale, randn(N), rand(N))
            s = (w * self.scale_std).exp2()
            G_inv = G_inv @ _scale(1 / s, 1 / s, **kw)
            labels.append(w)
            applied |= bool(w.any())
        if self.rotate_frac > 0:
            w = (rand(N) * 2 - 1) * (math.pi * self.rotate_frac_max)
            w = keep(self.rotate_frac, w, rand(N))
            G_inv = G_inv @ _rotate(w, **kw)
            labels += [w.cos() - 1, w.sin()]
            applied |= bool(w.any())
        if self.aniso > 0:
            w, r = randn(N), (rand(N) * 2 - 1) * math.pi
            w = keep(self.aniso, w, rand(N))
            r = torch.where(rand(N) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = (w * self.aniso_std).exp2()
            # 1 / (1 / s) rather than s: inverting scale (s, 1/s) as EDM does keeps results bit-identical to EDM's.
            G_inv = G_inv @ _rotate(-r, **kw) @ _scale(1 / s, 1 / (1 / s), **kw) @ _rotate(r, **kw)
            labels += [w * r.cos(), w * r.sin()]
            applied |= bool(w.any())
        if self.translate_frac > 0:
            w = randn(2, N)
            w = keep(self.translate_frac, w, rand(1, N))
            G_inv = G_inv @ _translate(-w[0] * (W * self.translate_frac_std), -w[1] * (H * self.translate_frac_std), **kw)
            labels += [w[0], w[1]]
            applied |= bool(w.any())
        if applied:  # skipped when no sample was transformed, so that p = 0 is exactly the identity
            images = _transform(images, G_inv)

        return images, torch.cat([v.to(torch.float32).reshape(N, -1) for v in labels], dim=1)


def _transform(images: torch.Tensor, G_inv: torch.Tensor) -> torch.Tensor:
    """Resample images (N, C, H, W) through the inverse pixel-space transform G_inv (N, 3, 3), centred on
    the image: reflect-pad enough to cover the transformed corners, upsample 2x with the sym6 filter,
    bilinear-sample, low-pass and downsample 2x."""
    N, C, H, W = images.shape
    dev, kw = images.device, dict(n=N, device=images.device)
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device=dev)
    cp = G_inv @ corners.t()  # (N, 3, 4): where the output corners come from
    hz = torch.tensor(SYM6, dtype=images.dtype, device=dev)
    hz_pad = len(SYM6) // 4
    reach = cp[:, :2, :].permute(1, 0, 2).flatten(1)  # (2, N*4)
    margin = torch.cat([-reach, reach]).max(dim=1).values  # how far the corners reach past x0, y0, x1, y1
    margin = margin + torch.tensor([hz_pad * 2 - cx, hz_pad * 2 - cy] * 2, device=dev)
    margin = margin.clamp(min=0).minimum(torch.tensor([W - 1, H - 1] * 2, dtype=margin.dtype, device=dev))
    mx0, my0, mx1, my1 = margin.ceil().to(torch.int32).tolist()

    images = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")
    G_inv = _translate((mx0 - mx1) / 2, (my0 - my1) / 2, **kw) @ G_inv

    # Upsample 2x: interleave zeros, then filter along W and H.
    up = hz.flip(0).tile([C, 1, 1])
    images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
    images = F.conv2d(images, up.unsqueeze(2), groups=C, padding=[0, (len(SYM6) + 1) // 2])
    images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
    images = F.conv2d(images, up.unsqueeze(3), groups=C, padding=[(len(SYM6) + 1) // 2, 0])
    G_inv = _scale(2, 2, **kw) @ G_inv @ _scale(0.5, 0.5, **kw)
    G_inv = _translate(-0.5, -0.5, **kw) @ G_inv @ _translate(0.5, 0.5, **kw)

    # Sample on the 2x output grid (normalised coordinates for affine_grid).
    shape = [N, C, (H + hz_pad * 2) * 2, (W + hz_pad * 2) * 2]
    G_inv = _scale(2 / images.shape[3], 2 / images.shape[2], **kw) @ G_inv @ _scale(shape[3] / 2, shape[2] / 2, **kw)
    grid = F.affine_grid(G_inv[:, :2, :].to(images.dtype), shape, align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Low-pass, downsample 2x and crop the filter margin.
    down = hz.tile([C, 1, 1])
    pad = (len(SYM6) - 1) // 2
    images = F.conv2d(images, down.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, pad])[:, :, :, hz_pad:-hz_pad]
    images = F.conv2d(images, down.unsqueeze(3), groups=C, stride=[2, 1], padding=[pad, 0])[:, :, hz_pad:-hz_pad, :]
    return images


def edm_augment_pipe(p: float) -> AugmentPipe:
    """EDM's training augmentation (train.py --augment=p): 9 augment labels."""
    return AugmentPipe(p=p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
