"""EDM2's magnitude-preserving U-Net (issue 20): parity with EDM2's own code from vendored numbers, its
layers' magnitude preservation, and its parameter names and counts.

tests/data/edm2-parity.json holds only numbers written by running NVlabs/edm2's training/networks_edm2.py
(commit 4bf8162) outside this repository: its ``Precond`` with the configuration in the file, every tensor
filled from one seeded generator in sorted name order (names without the ``unet.`` prefix), inputs from a
second seed; then the outputs' RMS, sums and 48 evenly spaced values."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vcdm.checkpoints import CheckpointConfig, load_checkpoint, save_checkpoint
from vcdm.data.structure import Structure
from vcdm.nets import build_network
from vcdm.nets.edm2 import EDM2UNet, MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import EDM2_PRESETS, PresetError, preset

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).parent / "data"
PARITY = json.loads((DATA / "edm2-parity.json").read_text())
PRESETS = json.loads((DATA / "edm2-presets.json").read_text())  # EDM2's Precond per train_edm2.py preset, 1000 classes
LOGVAR_CHANNELS = 16  # the reference's Precond(logvar_channels=16)
HEAD_SHAPES = {"logvar_fourier.freqs": (LOGVAR_CHANNELS,), "logvar_fourier.phases": (LOGVAR_CHANNELS,),
               "logvar_linear.weight": (1, LOGVAR_CHANNELS)}


def fill(tensors: dict[str, torch.Tensor], seed: int) -> None:
    """The reference's weights: every tensor, in sorted name order, from one seeded generator. The
    reference's Precond also holds the uncertainty head; a bare network draws its values and drops them."""
    g = torch.Generator().manual_seed(seed)
    shapes = {**HEAD_SHAPES, **{k: tuple(v.shape) for k, v in tensors.items()}}
    with torch.no_grad():
        for name in sorted(shapes):
            values = torch.randn(shapes[name], generator=g)
            if name in tensors:
                tensors[name].copy_(values)


def inputs(label_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, PARITY["net"]["img_channels"], 16, 16, generator=g)
    if label_dim == 1000:
        y = torch.zeros(2, 1000)
        y[0, 3] = y[1, 997] = 1
    elif label_dim:
        y = torch.randn(2, label_dim, generator=g)
        y = y / y.norm(dim=1, keepdim=True)
    else:
        y = None
    return x, y


def sampled(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().flatten().double()
    return flat[torch.linspace(0, flat.numel() - 1, PARITY["indices"]).round().long()]


def assert_matches(got: torch.Tensor, ref: dict, rtol: float = 1e-5) -> None:
    """Within rtol of the reference output's RMS, value by value and in its sums."""
    scale = ref["rms"]
    assert got.double().square().mean().sqrt().item() == pytest.approx(scale, rel=rtol)
    assert got.double().sum().item() == pytest.approx(ref["sum"], abs=rtol * scale * got.numel() ** 0.5)
    assert got.double().abs().sum().item() == pytest.approx(ref["abs_sum"], rel=rtol)
    torch.testing.assert_close(sampled(got), torch.tensor(ref["values"], dtype=torch.float64), rtol=0, atol=rtol * scale)


def parity_net(case: dict, dropout: float) -> EDM2UNet:
    net = EDM2UNet(label_dim=case["label_dim"], dropout=dropout, **PARITY["net"])
    fill(net.state_dict(), case["weight_seed"])
    return net


MODES = {"eval": 0.0, "train": 0.0, "train_dropout": 0.2}


@pytest.mark.determinism
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case_name", ["uncond", "class1000", "embed512"])
def test_unet_matches_edm2(case_name: str, mode: str):
    """EDM2's UNet with the same weights and inputs: no labels, one-hot classes, a unit-norm 512-d embedding;
    in eval mode, in training mode (forced weight normalisation) and with dropout drawn from the same RNG."""
    case = PARITY["cases"][case_name]
    net = parity_net(case, MODES[mode]).train(mode != "eval")
    x, y = inputs(case["label_dim"], case["input_seed"])
    c_noise = torch.tensor(PARITY["sigmas"]).log() / 4
    torch.manual_seed(123)
    out = net(x, c_noise, y)
    assert_matches(out, case[mode]["F"])
    if mode != "eval":  # forced weight normalisation rewrote the stored weights (unit RMS per output channel)
        assert_matches(net.out_conv.weight, case[mode]["out_conv_weight_after"])


def test_layers_preserve_magnitude():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, 64, generator=g), torch.randn(4096, 192, generator=g)
    rms = lambda t: t.square().mean().sqrt().item()  # noqa: E731
    assert rms(mp_silu(a)) == pytest.approx(1, abs=0.02)
    assert rms(mp_sum(a, b[:, :64], t=0.3)) == pytest.approx(1, abs=0.02)
    cat = mp_cat(a, b, t=0.25)
    assert rms(cat) == pytest.approx(1, abs=0.02)
    # b carries the share t of the magnitude: its part of the squared norm is t^2 / ((1-t)^2 + t^2)
    assert cat[:, 64:].square().sum().item() / cat.square().sum().item() == pytest.approx(0.0625 / 0.625, abs=0.01)
    assert rms(MPFourier(256)(torch.randn(4096, generator=g))) == pytest.approx(1, abs=0.02)
    conv = MPConv(64, 32, kernel=[3, 3])
    assert rms(conv(torch.randn(8, 64, 64, 64, generator=g))) == pytest.approx(1, abs=0.03)  # 1% lost at the border
    assert rms(normalize(5 * a)) == pytest.approx(1, rel=1e-4)


def test_forced_weight_normalisation_only_in_training():
    conv = MPConv(8, 4, kernel=[])
    with torch.no_grad():
        conv.weight.mul_(3)
    before = conv.weight.clone()
    conv.eval()(torch.randn(2, 8))
    assert torch.equal(conv.weight, before)
    conv.train()(torch.randn(2, 8))
    torch.testing.assert_close(conv.weight, normalize(before))
    torch.testing.assert_close(conv.weight.norm(dim=1), torch.full((4,), math.sqrt(8)), rtol=1e-3, atol=0)


def test_refuses_augmentation_labels():
    net = EDM2UNet(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1], num_blocks=1,
                   attn_resolutions=[])
    with pytest.raises(ValueError, match="no augmentation input"):
        net(torch.zeros(1, 1, 8, 8), torch.zeros(1), augment_labels=torch.zeros(1, 9))


def test_edm2_unet_is_buildable_by_name_from_a_checkpoint():
    net = build_network("EDM2UNet", dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=8,
                                         channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]))
    assert isinstance(net, EDM2UNet) and net.label_dim == 4


def edm2_arch(arch: str, **overrides) -> EDM2UNet:
    kwargs = dict(resolution=64, channels=PRESETS["presets"][arch]["img_channels"], embed_dim=0, label_dim=1000,
                  augment_dim=0, **overrides)
    name, net_kwargs = preset(arch, **kwargs)
    with torch.device("meta"):
        return build_network(name, net_kwargs)


@pytest.mark.parametrize("arch", sorted(PRESETS["presets"]))
def test_presets_are_edm2s(arch: str):
    """Every EDM2 preset: EDM2's parameter count (its Precond's U-Net, built by EDM2's code) and its recipe."""
    ref = PRESETS["presets"][arch]
    net = edm2_arch(arch)
    assert sum(p.numel() for p in net.parameters()) == ref["unet_params"]
    assert {k: getattr(EDM2_PRESETS[arch], k) for k in ref["config"]} == ref["config"]
    assert net.dec["64x64_block3"].dropout == ref["config"]["dropout"]


def test_img64_s_names_and_shapes_are_edm2s():
    """EDM2's Precond state dict is the network's (uncertainty head included) once ``unet.`` is stripped."""
    ref = {k.removeprefix("unet."): tuple(v) for k, v in PRESETS["img64_s_state_dict"].items()}
    net = edm2_arch("edm2-img64-s")
    Denoiser(net, Structure.from_flags({"image": (3, 64, 64), "label": (1000,)}, "1,1", "0,1"), logvar_channels=128)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == ref


def test_preset_overrides_and_refusals():
    net = edm2_arch("edm2-img64-xs", cbase=64, cres=[1, 2], dropout=0.3)
    assert net.enc["64x64_conv"].weight.shape == (64, 4, 3, 3) and "16x16_down" not in net.enc
    assert net.dec["32x32_in0"].num_heads == 2 and net.dec["64x64_block0"].dropout == 0.3
    with pytest.raises(PresetError, match="no augmentation input"):
        preset("edm2-img64-s", resolution=64, channels=3, embed_dim=0, label_dim=0, augment_dim=9)
    with pytest.raises(PresetError, match="attention heads"):
        preset("edm2-img64-s", resolution=64, channels=3, embed_dim=0, label_dim=0, augment_dim=0, cbase=200)
    with pytest.raises(PresetError, match="multiple of 8"):
        preset("edm2-img512-xs", resolution=36, channels=4, embed_dim=0, label_dim=0, augment_dim=0)


def parity_denoiser(case: dict, dropout: float) -> Denoiser:
    label_dim = case["label_dim"]
    image = (PARITY["net"]["img_channels"], 16, 16)
    structure = (Structure.from_flags({"image": image, "label": (label_dim,)}, "1,1", "0,1") if label_dim
                 else Structure.from_flags({"image": image}, "1", "0"))
    net = EDM2UNet(label_dim=label_dim, dropout=dropout, **PARITY["net"])
    denoiser = Denoiser(net, structure, kind="edm", sigma_data=0.5, logvar_channels=LOGVAR_CHANNELS)
    fill(denoiser.net.state_dict(), case["weight_seed"])
    return denoiser


@pytest.mark.determinism
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case_name", ["uncond", "class1000", "embed512"])
def test_denoiser_with_uncertainty_matches_edm2_precond(case_name: str, mode: str):
    """vcdm's kind='edm' Denoiser (sigma_data 0.5) with logvar_channels is EDM2's Precond: D and u(sigma)."""
    case = PARITY["cases"][case_name]
    denoiser = parity_denoiser(case, MODES[mode]).train(mode != "eval")
    x, y = inputs(case["label_dim"], case["input_seed"])
    torch.manual_seed(123)
    D, logvar = denoiser(x.flatten(1), torch.tensor(PARITY["sigmas"]), y, return_logvar=True)
    assert_matches(D, case[mode]["D"])
    assert logvar.shape == (2, 1)
    torch.testing.assert_close(logvar.flatten(), torch.tensor(case[mode]["logvar"]), rtol=1e-5, atol=1e-6)


def test_uncertainty_head_is_part_of_the_network():
    """The head's tensors are the network's (EDM2's names), recorded in the config, kept by a rebuild
    around a loaded network, and absent (with the config unchanged) when logvar_channels is 0."""
    case = PARITY["cases"]["uncond"]
    denoiser = parity_denoiser(case, 0.0)
    keys = set(denoiser.net.state_dict())
    assert set(HEAD_SHAPES) <= keys and denoiser.config()["logvar_channels"] == LOGVAR_CHANNELS
    before = denoiser.net.logvar_linear.weight.clone()
    rebuilt = Denoiser(denoiser.net, denoiser.structure, **denoiser.config())
    assert torch.equal(rebuilt.net.logvar_linear.weight, before)
    with pytest.raises(ValueError, match="has 16 channels, not 32"):
        Denoiser(denoiser.net, denoiser.structure, logvar_channels=32)

    plain = Denoiser(EDM2UNet(label_dim=0, **PARITY["net"]), denoiser.structure)
    assert "logvar_channels" not in plain.config() and not any(k.startswith("logvar") for k in plain.net.state_dict())
    with pytest.raises(ValueError, match="no uncertainty head"):
        plain(torch.zeros(1, 768), 1.0, return_logvar=True)


def test_uncertainty_head_builds_on_the_meta_device():
    with torch.device("meta"):
        net = EDM2UNet(label_dim=0, **PARITY["net"])
    Denoiser(net, Structure.from_flags({"image": (3, 16, 16)}, "1", "0"), logvar_channels=8)
    assert net.logvar_linear.weight.is_meta and net.logvar_fourier.freqs.is_meta


@pytest.mark.determinism
def test_checkpoint_round_trip_keeps_the_uncertainty_head(tmp_path):
    structure = Structure.from_flags({"image": (3, 8, 8), "label": (4,)}, "1,1", "0,1")
    name, kwargs = preset("edm2-img64-xs", resolution=8, channels=3, embed_dim=0, label_dim=4, augment_dim=0,
                          cbase=16, cres=[1, 4])
    torch.manual_seed(0)
    denoiser = Denoiser(build_network(name, kwargs), structure, logvar_channels=8).eval()
    fill(denoiser.net.state_dict(), 5)  # non-zero gains, so the output depends on every weight
    config = CheckpointConfig(name, kwargs, denoiser.config(), structure.to_dict())
    save_checkpoint(tmp_path / "net.safetensors", {"net": denoiser.net.state_dict()}, config)
    loaded = load_checkpoint(tmp_path / "net.safetensors")[0]
    x, y, sigma = torch.randn(2, 192), torch.eye(4)[:2], torch.tensor([0.1, 3.0])
    D, logvar = denoiser(x, sigma, y, return_logvar=True)
    D2, logvar2 = loaded(x, sigma, y, return_logvar=True)
    assert torch.equal(D, D2) and torch.equal(logvar, logvar2) and loaded.config() == denoiser.config()


def _tiny_denoiser() -> Denoiser:
    torch.manual_seed(0)
    net = EDM2UNet(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1, 8], num_blocks=1)
    denoiser = Denoiser(net, Structure.from_flags({"image": (1, 8, 8)}, "1", "0"), logvar_channels=8)
    fill(denoiser.net.state_dict(), 3)
    return denoiser.train()


def _uncertainty_loss(denoiser: Denoiser, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    x, sigma = torch.randn(3, 64, generator=g), torch.rand(3, generator=g) * 3 + 0.1
    D, logvar = denoiser(x + sigma[:, None] * torch.randn(3, 64, generator=g), sigma, return_logvar=True)
    return ((D - x) ** 2 / logvar.exp() + logvar).mean()


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    from vcdm.train.ddp import with_net, wrap_ddp

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    denoiser = _tiny_denoiser()
    view = with_net(denoiser, wrap_ddp(denoiser.net, torch.device("cpu")))
    for _ in range(2):  # a second step fails if DDP's first reduction missed the head's gradients
        denoiser.net.zero_grad()
        _uncertainty_loss(view, rank).backward()
    torch.save({k: p.grad for k, p in denoiser.net.named_parameters()}, f"{out}-{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_uncertainty_head_trains_under_ddp(tmp_path):
    """With the network wrapped in DDP, the head's gradients are averaged over the processes like the rest."""
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    grads = []
    for rank in range(2):
        denoiser = _tiny_denoiser()
        _uncertainty_loss(denoiser, rank)  # as the workers' first step, normalises the weights once in place
        _uncertainty_loss(denoiser, rank).backward()
        grads.append({k: p.grad.clone() for k, p in denoiser.net.named_parameters()})
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'out'}-{rank}.pt")
        for name in ("logvar_linear.weight", "emb_noise.weight", "out_gain"):
            torch.testing.assert_close(got[name], (grads[0][name] + grads[1][name]) / 2, rtol=1e-5, atol=1e-7)


def test_inference_settings_are_sound_for_edm2():
    """vcdm.perf's per-device settings apply to EDM2's U-Net: 64x64 gets channels_last + bf16 where bf16 is
    native (as the other U-Nets), and bf16 moves the network output by a few percent of its RMS at most."""
    from vcdm import perf
    from vcdm.perf import FP32, InferenceSettings

    case = PARITY["cases"]["class1000"]
    denoiser = parity_denoiser(case, 0.0).eval()
    x, y = inputs(case["label_dim"], case["input_seed"])
    sigma = torch.tensor(PARITY["sigmas"])
    c_skip, c_out, _, _ = denoiser.coefficients(sigma[:, None])
    outputs = {}
    for settings in (FP32, InferenceSettings(channels_last=True), InferenceSettings(autocast_dtype=torch.bfloat16),
                     InferenceSettings(channels_last=True, autocast_dtype=torch.bfloat16)):
        model = perf.prepare(parity_denoiser(case, 0.0), settings)
        with torch.no_grad(), perf.autocast(settings, "cpu"):
            outputs[settings.name] = (model(x.flatten(1), sigma, y) - c_skip * x.flatten(1)) / c_out
    ref = outputs["fp32"]
    errors = {k: ((v - ref).square().mean() / ref.square().mean()).sqrt().item() for k, v in outputs.items()}
    assert errors["channels_last"] < 1e-5
    assert 1e-4 < errors["bf16"] < 0.05 and 1e-4 < errors["channels_last+bf16"] < 0.05  # bf16 ran, and is close

    big = EDM2UNet(img_resolution=64, img_channels=3, model_channels=8, channel_mult=[1], num_blocks=1)
    for native, expected in ((True, InferenceSettings(channels_last=True, autocast_dtype=torch.bfloat16)),
                             (False, InferenceSettings(channels_last=True))):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(perf, "bf16_is_fast", lambda device: native)
            assert perf.default_settings("cpu", big) == expected
