"""EDM's non-leaky augmentation: exact pixel blitting, geometric transforms that do what their labels say."""
from __future__ import annotations

import math

import pytest
import torch

from vcdm.diffusion.augment import AugmentPipe, edm_augment_pipe


def images(n: int = 8, c: int = 3, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1


def blob(cx: float, cy: float, sx: float, sy: float, size: int = 48) -> torch.Tensor:
    """A smooth Gaussian blob (1, 1, size, size); x = column, y = row."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    return torch.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))[None, None]


def moments(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid (x, y) and second-moment matrix of a non-negative image (H, W)."""
    img = img.clamp(min=0)
    H, W = img.shape
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    p = img.double() / img.sum()
    c = torch.stack([(p * x).sum(), (p * y).sum()])
    dx, dy = x - c[0], y - c[1]
    m = torch.stack([torch.stack([(p * dx * dx).sum(), (p * dx * dy).sum()]), torch.stack([(p * dx * dy).sum(), (p * dy * dy).sum()])])
    return c, m


def test_p0_is_identity_with_zero_labels():
    pipe = edm_augment_pipe(0.0)
    x = images()
    out, labels = pipe(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, x)
    assert labels.shape == (8, 9) and pipe.label_dim == 9 and not labels.any()


def test_edm_pipe_labels_layout():
    x = images(64)
    out, labels = edm_augment_pipe(1.0)(x, generator=torch.Generator().manual_seed(2))
    assert out.shape == x.shape and labels.shape == (64, 9) and labels.dtype == torch.float32
    xflip, yflip, scale, rot_c, rot_s = labels[:, 0], labels[:, 1], labels[:, 2], labels[:, 3], labels[:, 4]
    assert set(xflip.tolist()) == {0.0, 1.0} and set(yflip.tolist()) <= {0.0, 1.0}
    torch.testing.assert_close((rot_c + 1) ** 2 + rot_s ** 2, torch.ones(64))  # (cos - 1, sin) of one angle
    assert (scale != 0).float().mean() > 0.8  # p = 1: (almost) every sample scaled, N(0, 1) log2-factors / 0.2
    assert labels[:, 7:].abs().max() < 6


def test_xflip_only_is_exact_and_recorded():
    x = images(32)
    out, labels = AugmentPipe(p=1, xflip=1)(x, generator=torch.Generator().manual_seed(3))
    assert labels.shape == (32, 1)
    flipped = labels[:, 0] == 1
    assert 0 < flipped.sum() < 32  # half of them, at random
    assert torch.equal(out[flipped], x[flipped].flip(3)) and torch.equal(out[~flipped], x[~flipped])
    out, labels = AugmentPipe(p=1, yflip=1)(x, generator=torch.Generator().manual_seed(3))
    flipped = labels[:, 0] == 1
    assert torch.equal(out[flipped], x[flipped].flip(2)) and torch.equal(out[~flipped], x[~flipped])


def test_integer_translation_matches_labels():
    x = images(16, h=16, w=16)
    out, labels = AugmentPipe(p=1, translate_int=1)(x, generator=torch.Generator().manual_seed(4))
    shifts = (labels * 16 * 0.125).round().long()  # labels are shifts / (size * translate_int_max)
    assert shifts.abs().max() <= 2 and shifts.abs().sum() > 0
    for b, (tx, ty) in enumerate(shifts.tolist()):
        # content moves right by tx and up by ty; reflected at the borders, so compare the interior
        assert torch.equal(out[b, :, 2:-2, 2:-2], x[b, :, 2 + ty:14 + ty, 2 - tx:14 - tx])


def test_fractional_translation_moves_content_by_label():
    x = blob(24, 24, 3, 3)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        out, labels = AugmentPipe(p=1, translate_frac=1)(x, generator=gen)
        shift = labels[0].double() * 48 * 0.125  # pixels
        c_in, _ = moments(x[0, 0])
        c_out, _ = moments(out[0, 0])
        torch.testing.assert_close(c_out - c_in, shift, atol=0.05, rtol=0)


def test_isotropic_scaling_matches_label():
    x = blob(24, 24, 3, 3)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        out, labels = AugmentPipe(p=1, scale=1)(x, generator=gen)
        s = 2 ** (0.2 * labels[0, 0].item())
        _, m_in = moments(x[0, 0])
        _, m_out = moments(out[0, 0])
        assert m_out[0, 0].sqrt().item() / m_in[0, 0].sqrt().item() == pytest.approx(s, rel=0.02)
        assert m_out[1, 1].sqrt().item() / m_in[1, 1].sqrt().item() == pytest.approx(s, rel=0.02)


def test_rotation_matches_label():
    x = blob(24, 24, 5, 2)  # elongated along x
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        out, labels = AugmentPipe(p=1, rotate_frac=1)(x, generator=gen)
        angle = math.atan2(labels[0, 1].item(), labels[0, 0].item() + 1)
        _, m = moments(out[0, 0])
        axis = 0.5 * math.atan2(2 * m[0, 1].item(), (m[0, 0] - m[1, 1]).item())  # principal axis, image frame
        diff = (axis + angle + math.pi / 2) % math.pi - math.pi / 2  # the content turns by -angle (y down)
        assert abs(diff) < 0.02, (axis, angle)


@pytest.mark.determinism
def test_generator_determinism_and_global_rng():
    pipe, x = edm_augment_pipe(0.5), images(8)
    a = pipe(x, generator=torch.Generator().manual_seed(9))
    state = torch.get_rng_state()
    b = pipe(x, generator=torch.Generator().manual_seed(9))
    assert torch.equal(torch.get_rng_state(), state)  # an explicit generator leaves the global RNG alone
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = pipe(x, generator=torch.Generator().manual_seed(10))
    assert not torch.equal(a[1], c[1])
    torch.manual_seed(11)
    d = pipe(x)
    torch.manual_seed(11)
    e = pipe(x)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])
