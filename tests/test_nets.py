"""Networks: EDM parameter names/shapes/counts, EDM's outputs, conditioning, the prior transformer, presets."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vcdm.nets import build_network
from vcdm.nets.adm import DhariwalUNet
from vcdm.nets.layers import Conv2d, PositionalEmbedding
from vcdm.nets.presets import PresetError, preset
from vcdm.nets.prior import MultiHeadRotaryAttention, PriorTransformer, rotary, rotate
from vcdm.nets.songunet import SongUNet

REFERENCE = Path(__file__).parent / "data" / "edm-networks-state-dict.json"  # copy of shared/reference

TINY_SONG = dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2, 2],
                 num_blocks=2, attn_resolutions=[8], label_dim=10, augment_dim=9)
TINY_NCSN = dict(TINY_SONG, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
                 resample_filter=[1, 3, 3, 1])
TINY_ADM = dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=64, channel_mult=[1, 2],
                num_blocks=2, attn_resolutions=[8], label_dim=10, augment_dim=9)
SMALL_SONG = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[4], label_dim=10, augment_dim=9)
SMALL_NCSN = dict(SMALL_SONG, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
                  resample_filter=[1, 3, 3, 1])
SMALL_ADM = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=64, channel_mult=[1, 1],
                 num_blocks=1, attn_resolutions=[4], label_dim=10, augment_dim=9)
TINY_PRIOR = dict(embed_dim=32, label_dim=10, augment_dim=9, dim=64, depth=2, heads=4, dim_head=16)


def meta_network(arch, **kwargs):
    name, kw = preset(arch, channels=3, embed_dim=0, **kwargs)
    with torch.device("meta"):
        return build_network(name, kw)


def perturbed(net, generator=None):
    """Random weights everywhere (EDM zero-initialises output layers, which would hide most of the net)."""
    g = torch.Generator().manual_seed(1) if generator is None else generator
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def unet_inputs(batch=4, label_dim=10, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=g)
    noise = torch.randn(batch, generator=g)
    labels = F.one_hot(torch.randint(0, label_dim, (batch,), generator=g), label_dim).float()
    return x, noise, labels, torch.randn(batch, 9, generator=g)


# --- EDM compatibility -------------------------------------------------------------------------------

@pytest.mark.parametrize("entry, arch, resolution, label_dim, augment_dim", [
    ("SongUNet ddpmpp 64x64 cres=1,2,2,2 label_dim=0 augment_dim=9 (EDM FFHQ/AFHQv2 uncond)", "ddpmpp", 64, 0, 9),
    ("SongUNet ddpmpp 64x64 cres=1,2,2,2 label_dim=512 augment_dim=9 (VCDM image model)", "ddpmpp", 64, 512, 9),
    ("SongUNet ncsnpp 32x32 cres=2,2,2 label_dim=10 augment_dim=9 (EDM CIFAR-10 cond ve)", "ncsnpp", 32, 10, 9),
    ("DhariwalUNet adm 64x64 label_dim=1000 (EDM ImageNet-64 cond)", "adm", 64, 1000, 0),
])
def test_state_dict_keys_and_shapes_match_edm(entry, arch, resolution, label_dim, augment_dim):
    expected = json.loads(REFERENCE.read_text())[entry]
    cres = dict(cres=[1, 2, 2, 2]) if "cres=1,2,2,2" in entry else {}
    net = meta_network(arch, resolution=resolution, label_dim=label_dim, augment_dim=augment_dim, **cres)
    got = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert sorted(set(got) ^ set(expected)) == []
    assert {k: v for k, v in got.items() if v != expected[k]} == {}


@pytest.mark.parametrize("label_dim, augment_dim, count", [
    (0, 0, 61_804_419), (0, 9, 61_805_571), (512, 0, 61_870_083), (512, 9, 61_871_235)])
def test_ddpmpp_64_parameter_counts(label_dim, augment_dim, count):
    net = meta_network("ddpmpp", resolution=64, label_dim=label_dim, augment_dim=augment_dim, cres=[1, 2, 2, 2])
    assert sum(p.numel() for p in net.parameters()) == count


# Outputs of EDM's own SongUNet/DhariwalUNet (NVlabs/edm training/networks.py) for the same seeds and inputs:
# torch.manual_seed(0) before construction (vcdm draws initial weights in EDM's order), then `perturbed`.
EDM_OUTPUTS = {
    "ddpmpp": (SongUNet, TINY_SONG, [0.25747892, 0.44998181, 0.31897926, 0.29388279, 0.23446484, -0.11006234,
                                      -0.31458867, -0.59619081], 0.2164238138),
    "ncsnpp": (SongUNet, TINY_NCSN, [0.09354330, 0.25884292, 0.26381630, 0.24473199, 0.01297108, 0.78630942,
                                      0.40805507, -0.15197276], 0.1712048322),
    "adm": (DhariwalUNet, TINY_ADM, [0.46639088, 0.22911318, -0.95116049, 0.68579727, 0.48824546, 0.34302458,
                                      1.19862986, 0.29398724], 0.7336504496),
}


@pytest.mark.parametrize("arch", list(EDM_OUTPUTS))
@pytest.mark.determinism
def test_matches_edm_outputs(arch):
    cls, kwargs, values, mean_square = EDM_OUTPUTS[arch]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    net = perturbed(cls(**kwargs), g)
    with torch.no_grad():
        x, noise, aug = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, generator=g), torch.randn(2, 9, generator=g)
        out = net(x, noise, F.one_hot(torch.tensor([3, 7]), 10).float(), aug)
    assert out.flatten()[::97][:8].tolist() == pytest.approx(values, abs=2e-5)
    assert out.double().square().mean().item() == pytest.approx(mean_square, rel=1e-5)


def test_resample_filters_and_positional_embedding():
    assert torch.equal(Conv2d(2, 2, 3, down=True).resample_filter, torch.full((1, 1, 2, 2), 0.25))
    f = Conv2d(2, 2, 0, up=True, resample_filter=[1, 3, 3, 1]).resample_filter[0, 0]
    assert torch.allclose(f, torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])) / 64)
    assert Conv2d(2, 2, 3).resample_filter is None
    emb = PositionalEmbedding(4, endpoint=True)(torch.tensor([2.0]))  # frequencies 1 and 1/10000
    assert emb[0].tolist() == pytest.approx([math.cos(2), math.cos(2e-4), math.sin(2), math.sin(2e-4)])


# --- forward and conditioning ------------------------------------------------------------------------

@pytest.mark.parametrize("cls, kwargs", [(SongUNet, SMALL_SONG), (SongUNet, SMALL_NCSN), (DhariwalUNet, SMALL_ADM),
                                         (SongUNet, dict(SMALL_SONG, label_dim=0, augment_dim=0)),
                                         (SongUNet, dict(SMALL_SONG, encoder_type="skip", decoder_type="skip"))])
def test_unet_forward_shape_and_batch_independence(cls, kwargs):
    torch.manual_seed(0)
    net = perturbed(cls(**kwargs))
    x, noise, labels, aug = unet_inputs()
    labels = labels if kwargs["label_dim"] else None
    aug = aug if kwargs["augment_dim"] else None
    with torch.no_grad():
        out = net(x, noise, labels, aug)
        one = net(x[1:2], noise[1:2], None if labels is None else labels[1:2], None if aug is None else aug[1:2])
    assert out.shape == x.shape and out.isfinite().all()
    assert torch.allclose(out[1:2], one, atol=1e-5)


@pytest.mark.parametrize("cls, kwargs", [(SongUNet, SMALL_SONG), (DhariwalUNet, SMALL_ADM), (PriorTransformer, TINY_PRIOR)])
def test_conditioning_and_label_dropout(cls, kwargs):
    torch.manual_seed(0)
    net = perturbed(cls(**dict(kwargs, dropout=0, label_dropout=0.5)))
    if cls is PriorTransformer:
        g = torch.Generator().manual_seed(2)
        x, noise = torch.randn(12, 32, generator=g), torch.randn(12, generator=g)
        labels, aug = F.one_hot(torch.arange(12) % 10, 10).float(), torch.randn(12, 9, generator=g)
    else:
        x, noise, labels, aug = unet_inputs(batch=12)
    with torch.no_grad():
        cond = net(x, noise, labels, aug)
        uncond = net(x, noise, None, aug)
        assert torch.equal(uncond, net(x, noise, torch.zeros_like(labels), aug))  # None = zeros (CFG's uncond branch)
        assert (cond - uncond).flatten(1).abs().amax(1).min() > 1e-3  # the condition matters for every sample
        torch.manual_seed(3)
        dropped = net.train()(x, noise, labels, aug)
    per_sample = [torch.allclose(d, c, atol=1e-5) for d, c in zip(dropped, cond)]
    assert all(p or torch.allclose(d, u, atol=1e-5) for p, d, u in zip(per_sample, dropped, uncond))
    assert 0 < sum(per_sample) < 12  # whole vectors dropped for some samples, kept for others


def test_wrong_label_shape_is_a_clear_error():
    net = SongUNet(**SMALL_SONG)
    x, noise, labels, _ = unet_inputs()
    with pytest.raises(ValueError, match=r"class_labels: expected shape \(4, 10\), got \(4, 5\)"):
        net(x, noise, labels[:, :5])


def test_augment_labels_enter_the_network():
    torch.manual_seed(0)
    for net in [perturbed(SongUNet(**SMALL_SONG)), perturbed(DhariwalUNet(**SMALL_ADM))]:
        x, noise, labels, aug = unet_inputs()
        with torch.no_grad():
            assert not torch.allclose(net(x, noise, labels, aug), net(x, noise, labels, None), atol=1e-4)
            assert torch.allclose(net(x, noise, labels, None), net(x, noise, labels, torch.zeros_like(aug)), atol=1e-6)


def test_mixed_precision_and_channels_last():
    torch.manual_seed(0)
    net = perturbed(SongUNet(**SMALL_SONG))
    x, noise, labels, aug = unet_inputs()
    with torch.no_grad():
        ref = net(x, noise, labels, aug)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, noise, labels, aug)
        cl = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), noise, labels, aug)
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()
    assert torch.allclose(cl, ref, atol=1e-5)


# --- prior transformer -------------------------------------------------------------------------------

def prior_inputs(batch=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 32, generator=g), torch.randn(batch, generator=g),
            F.one_hot(torch.arange(batch) % 10, 10).float(), torch.randn(batch, 9, generator=g))


@pytest.mark.parametrize("kwargs", [TINY_PRIOR, dict(TINY_PRIOR, label_dim=0, augment_dim=0),
                                    dict(TINY_PRIOR, embed_dim=64)])
def test_prior_forward_shape_and_inputs_matter(kwargs):
    torch.manual_seed(0)
    net = PriorTransformer(**kwargs).eval()
    x, noise, labels, aug = prior_inputs()
    x = torch.randn(3, kwargs["embed_dim"])
    labels = labels if kwargs["label_dim"] else None
    aug = aug if kwargs["augment_dim"] else None
    with torch.no_grad():
        out = net(x, noise, labels, aug)
        assert out.shape == x.shape and out.isfinite().all()
        assert torch.allclose(net(x[:1], noise[:1], None if labels is None else labels[:1], None if aug is None else aug[:1]),
                              out[:1], atol=1e-5)
        assert not torch.allclose(net(x + 0.5, noise, labels, aug), out, atol=1e-4)
        assert not torch.allclose(net(x, noise + 0.5, labels, aug), out, atol=1e-4)
        if labels is not None:
            assert not torch.allclose(net(x, noise, labels.roll(1, 1), aug), out, atol=1e-4)
        if aug is not None:
            assert not torch.allclose(net(x, noise, labels, None), out, atol=1e-4)


def test_prior_attention_is_causal():
    torch.manual_seed(0)
    attn = MultiHeadRotaryAttention(dim=16, heads=2, dim_head=8, dropout=0).eval()
    x = torch.randn(2, 5, 16)
    cos, sin = rotary(5, 8, x.device)
    changed = x.clone()
    changed[:, 3] += torch.randn(2, 16)
    with torch.no_grad():
        a, b = attn(x, cos, sin), attn(changed, cos, sin)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)  # earlier tokens cannot see token 3
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-3)


def test_rotary_scores_depend_on_relative_position():
    q, k = torch.randn(8), torch.randn(8)
    cos, sin = rotary(12, 8, q.device)
    score = lambda m, n: (rotate(q, cos[m], sin[m]) @ rotate(k, cos[n], sin[n])).item()
    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    assert rotate(q, cos[5], sin[5]).norm() == pytest.approx(q.norm().item(), rel=1e-6)


def test_prior_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="dim_head"):
        PriorTransformer(embed_dim=8, dim=16, heads=2, dim_head=7)


# --- presets -----------------------------------------------------------------------------------------

def test_presets_give_the_release_hyperparameters():
    name, kw = preset("ddpmpp", resolution=64, channels=3, embed_dim=512, label_dim=512, augment_dim=9)
    assert name == "SongUNet" and kw["channel_mult"] == [2, 2, 2] and kw["model_channels"] == 128  # the release's
    assert kw["embedding_type"] == "positional" and kw["resample_filter"] == [1, 1] and kw["dropout"] == 0.13
    name, kw = preset("ncsnpp", resolution=32, channels=3, embed_dim=0, label_dim=10, augment_dim=9)
    assert kw["channel_mult"] == [2, 2, 2] and kw["encoder_type"] == "residual" and kw["channel_mult_noise"] == 2
    name, kw = preset("adm", resolution=64, channels=3, embed_dim=0, label_dim=1000, augment_dim=0, dropout=0.1)
    assert name == "DhariwalUNet" and kw["model_channels"] == 192 and kw["channel_mult"] == [1, 2, 3, 4]
    assert kw["dropout"] == 0.1
    name, kw = preset("dalle2", resolution=64, channels=3, embed_dim=768, label_dim=0, augment_dim=9)
    assert name == "DALLE2Prior" and kw["embed_dim"] == 768 and (kw["dim"], kw["depth"], kw["heads"]) == (512, 6, 8)
    name, kw = preset("prior", resolution=64, channels=3, embed_dim=768, label_dim=0, augment_dim=9)
    assert name == "PriorTransformer" and kw["embed_dim"] == 768 and (kw["dim"], kw["depth"], kw["heads"]) == (512, 6, 8)
    name, kw = preset("ddpmpp", resolution=16, channels=1, embed_dim=0, label_dim=0, augment_dim=0, cbase=32, cres=[1, 2])
    assert (kw["model_channels"], kw["channel_mult"], kw["in_channels"]) == (32, [1, 2], 1)
    net = build_network(name, kw)
    assert net(torch.randn(2, 1, 16, 16), torch.zeros(2)).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("arch, kwargs, match", [
    ("unet", {}, "unknown architecture"),
    ("ddpmpp", dict(resolution=36, cres=[1, 2, 2, 2]), "multiple of 8"),
    ("ddpmpp", dict(cbase=50), "GroupNorm"),
    ("ddpmpp", dict(cres=[]), "positive"),
    ("adm", dict(cbase=96), "64 channels per head"),
    ("ddpmpp", dict(dropout=1.5), "--dropout"),
    ("dalle2", dict(cbase=64), "--cbase"),
])
def test_bad_preset_arguments_are_refused(arch, kwargs, match):
    args = {**dict(resolution=64, channels=3, embed_dim=512, label_dim=0, augment_dim=0), **kwargs}
    with pytest.raises(PresetError, match=match):
        preset(arch, **args)
