"""Guidance by a second network or by the null condition, D = D_g + w (D - D_g), and guidance intervals.

Checked on the exact denoisers of Gaussian data (tests/test_diffusion.py): two Gaussians of different
means and covariances play the network and its guide, so every guided value has a closed form. The
classifier-free path is pinned to the numbers it gave before guidance was rewritten around a guide
(tests/data/guidance-golden.json, written by the old code on test_samplers.py's exact-arithmetic toy).
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from click.testing import CliRunner
from edm_fakes import edm2_pickle
from tiny_models import pixel_pca, run, write_model
from tiny_runs import error_lines
from test_diffusion import F64, Gaussian, posterior_mean, randn_from, whitened
from test_samplers import PseudoNoise, Toy, latents
from vcdm import Pipeline, TwoStagePipeline
from vcdm.checkpoints import load_checkpoint, read_checkpoint_config, save_checkpoint
from vcdm.cli.generate import command as generate_cmd
from vcdm.cli.main import cli
from vcdm.cli.sample import command as sample_cmd
from vcdm.cli.variations import command as variations_cmd
from vcdm.diffusion import Guidance, guided, sample
from vcdm.diffusion.samplers import Churn, sample_heun
from vcdm.diffusion.schedules import append_zero, karras_sigmas
from vcdm.generate import SamplerOptions, load_model, results_dir
from vcdm.generate.core import ChunkedDenoiser, draw
from vcdm.generate.files import read_png, read_tensors, to_uint8_hwc
from vcdm.generate.guide import IncompatibleGuide, check_guide
from vcdm.fileio import file_sha256

GOLDEN = Path(__file__).parent / "data" / "guidance-golden.json"
pytestmark = pytest.mark.usefixtures("one_thread")


class Net(Gaussian):
    """The exact denoiser of N(mu + shift * sum(y), cov * spread): a conditional 'network' whose calls are
    counted and whose noise levels are recorded."""

    def __init__(self, shift: float = 0.5, spread: float = 1.0, mean_offset: float = 0.0):
        super().__init__()
        self.cov, self.mu = self.cov * spread, self.mu + mean_offset
        self.shift, self.sigmas, self.ys = shift, [], []

    def __call__(self, x, sigma, y=None):
        self.calls += 1
        self.sigmas.append(float(sigma))
        self.ys.append(y)
        mu = self.mu if y is None else self.mu + self.shift * y.to(F64).sum(1, keepdim=True)
        s = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1)
        return posterior_mean(x - mu + self.mu, s, self.mu, self.cov) + mu - self.mu


class ByHand:
    """D_g + w (D - D_g) written out, for noise levels in (lo, hi]; the unguided D elsewhere."""

    def __init__(self, net, guide, w: float, interval=(0.0, float("inf"))):
        self.net, self.guide, self.w, self.interval = net, guide, w, interval

    def __call__(self, x, sigma, y=None):
        D = self.net(x, sigma, y).to(F64)
        if not self.interval[0] < float(sigma) <= self.interval[1]:
            return D
        D_g = self.guide(x, sigma, y).to(F64)
        return D_g + self.w * (D - D_g)


class ClassifierFreeBefore:
    """The classifier-free guidance of vcdm.diffusion.sampling.GuidedModel as it was before the guide existed."""

    def __init__(self, net, y, w):
        self.net, self.y, self.w = net, y, w

    def __call__(self, x, sigma):
        y_pair = torch.cat([self.y, torch.zeros_like(self.y)])
        cond, uncond = self.net(torch.cat([x, x]), sigma, y_pair).to(F64).chunk(2)
        return uncond + self.w * (cond - uncond)


def weak_guide() -> Net:
    """A worse model of the same data: a wider covariance and a shifted mean, as an undertrained snapshot."""
    return Net(shift=0.3, spread=1.8, mean_offset=0.1)


# ---------------------------------------------------------------------------------------------------
# The formula.

def test_guided_denoiser_is_the_formula_with_two_gaussian_networks():
    x, y, sigma = torch.randn(6, 3, dtype=F64), torch.randn(6, 2), torch.tensor(0.7, dtype=F64)
    net, guide = Net(), weak_guide()
    D = guided(net, y, 2.5, gnet=guide)(x, sigma)
    assert (net.calls, guide.calls) == (1, 1) and net.ys[0] is y and guide.ys[0] is y
    mu_d = net.mu + 0.5 * y.to(F64).sum(1, keepdim=True)  # the closed forms, written out once more
    mu_g = guide.mu + 0.3 * y.to(F64).sum(1, keepdim=True)
    s2 = torch.eye(3, dtype=F64) * 0.49
    D_ref = mu_d + (x - mu_d) @ torch.linalg.solve(net.cov + s2, net.cov)
    D_g_ref = mu_g + (x - mu_g) @ torch.linalg.solve(guide.cov + s2, guide.cov)
    torch.testing.assert_close(D, D_g_ref + 2.5 * (D_ref - D_g_ref), rtol=1e-12, atol=1e-12)
    assert (D - D_ref).abs().max() > 0.1  # the guide moved it


@pytest.mark.parametrize("opts", [dict(num_steps=8), dict(num_steps=6, S_churn=30.0), dict(sampler="dpm2m", num_steps=8),
                                  dict(sampler="unipc", num_steps=8), dict(sampler="euler_a", num_steps=8)],
                         ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_sampling_with_a_guiding_network_is_the_formula_applied_by_hand(opts):
    z, y = whitened(64, 3), torch.randn(64, 2)
    got = sample(Net(), z, y, guidance=1.7, gnet=weak_guide(), randn_like=randn_from(1), **opts)
    want = sample(ByHand(Net(), weak_guide(), 1.7), z, y, randn_like=randn_from(1), **opts)
    assert torch.equal(got, want)
    unguided = sample(Net(), z, y, randn_like=randn_from(1), **opts)
    assert (got - unguided).abs().mean() > 0.05


@pytest.mark.parametrize("w,k", [(2.0, 2.0), (1.5, 3.0), (0.5, 2.0)])
def test_autoguidance_samples_the_closed_form_covariance(w, k):
    """Net and guide model N(mu, C) and N(mu, kC). Along an eigenvector of C (eigenvalue lam) the guided
    denoiser is linear, and the probability-flow ODE from sigma = S to 0 scales x - mu by
    r = (lam / (lam + S^2))^(w/2) (k lam / (k lam + S^2))^((1-w)/2): the samples' covariance is S^2 R R^T,
    about C k^(1-w) (autoguidance by a wider guide narrows the samples). Whitened latents make the sample
    covariance exact, so the tolerance measures Heun's error alone (0.7% at 64 steps, unguided)."""
    z, S = whitened(4000, 3), 80.0
    net, guide = Net(shift=0.0), Net(shift=0.0, spread=k)
    x = sample(net, z, guidance=w, gnet=guide, num_steps=64)
    lam, Q = torch.linalg.eigh(net.cov)
    r = (lam / (lam + S ** 2)) ** (w / 2) * (k * lam / (k * lam + S ** 2)) ** ((1 - w) / 2)
    want = S ** 2 * Q @ torch.diag(r ** 2) @ Q.T
    got = torch.cov(x.T.to(F64), correction=0)
    assert ((got - want).norm() / want.norm()).item() < 0.02  # measured 0.6-0.9%; the unguided C is 30-99% off
    assert ((want - net.cov * k ** (1 - w)).norm() / want.norm()).item() < 0.01  # the large-S limit


# ---------------------------------------------------------------------------------------------------
# w = 1, and classifier-free guidance unchanged.

@pytest.mark.parametrize("interval", [None, (0.1, 2.0)])
def test_guidance_one_is_unguided_bit_for_bit_and_never_calls_the_guide(interval):
    z, y = whitened(32, 3), torch.randn(32, 2)
    guide = weak_guide()
    plain = sample(Net(), z, y, num_steps=10, S_churn=20.0, randn_like=randn_from(5))
    same = sample(Net(), z, y, num_steps=10, S_churn=20.0, randn_like=randn_from(5), guidance=1.0, gnet=guide,
                  guidance_interval=interval)
    assert torch.equal(same, plain) and guide.calls == 0
    assert not Guidance(1.0, guide).applies(1.0)


def test_classifier_free_guidance_is_the_old_code_bit_for_bit():
    z, y = whitened(16, 3), torch.randn(16, 2)
    for w in (0.5, 2.0, 4.5):
        got = sample(Net(), z, y, guidance=w, num_steps=7, S_churn=10.0, randn_like=randn_from(3))
        sigmas = append_zero(karras_sigmas(7, 0.002, 80.0, 7.0, z.device))
        old = sample_heun(ClassifierFreeBefore(Net(), y, w), z.to(F64) * sigmas[0], sigmas, randn_like=randn_from(3),
                          churn=Churn(S_churn=10.0))
        assert torch.equal(got, old)


@pytest.mark.determinism
def test_classifier_free_guidance_matches_the_numbers_saved_before_the_guide_existed():
    golden = json.loads(GOLDEN.read_text())
    cases = {
        "heun-churn": dict(num_steps=6, S_churn=40.0, S_noise=1.007, guidance=2.5),
        "dpm2m": dict(sampler="dpm2m", num_steps=8, guidance=1.7),
        "unipc": dict(sampler="unipc", num_steps=8, guidance=3.0),
        "noise-scale": dict(num_steps=5, guidance=0.6, noise_scale=True),
        "ablation": dict(sampler="ablation", discretization="vp", schedule="vp", scaling="vp", num_steps=5,
                         guidance=2.0),
    }
    assert set(cases) == set(golden["outputs"])
    for name, opts in cases.items():
        opts = dict(opts)
        toy = Toy(noise_scale=torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5]) if opts.pop("noise_scale", False) else None)
        z = latents()
        got = sample(toy, z, z[:, :2] * 0.5, randn_like=PseudoNoise(), **opts).flatten()
        want = torch.tensor([float.fromhex(v) for v in golden["outputs"][name]], dtype=F64)
        if golden["cpu_capability"] == torch.backends.cpu.get_cpu_capability():
            assert torch.equal(got, want), name
        else:  # the schedules' pow/exp may round differently on other kernels
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------------------
# Guidance intervals.

@pytest.mark.parametrize("opts", [dict(num_steps=12), dict(num_steps=10, S_churn=40.0), dict(sampler="dpm2m", num_steps=12)],
                         ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("gnet", [True, False], ids=["gnet", "cfg"])
def test_outside_the_interval_the_step_is_the_unguided_one(opts, gnet):
    z, y, lo, hi = whitened(32, 3), torch.randn(32, 2), 0.3, 3.0
    guide = weak_guide() if gnet else None
    net = Net()
    got = sample(net, z, y, guidance=2.0, gnet=guide, guidance_interval=(lo, hi), randn_like=randn_from(2), **opts)
    if gnet:  # the guide is evaluated exactly at the levels inside (lo, hi], the net at all of them
        assert guide.sigmas == [s for s in net.sigmas if lo < s <= hi] and 0 < guide.calls < net.calls
        null = weak_guide()
    else:  # classifier-free: the null condition is batched in only inside the interval
        inside = [len(v) == 64 for v in net.ys]
        assert inside == [lo < s <= hi for s in net.sigmas] and 0 < sum(inside) < len(inside)
        null = lambda x, sigma, y: Net()(x, sigma, torch.zeros_like(y))
    want = sample(ByHand(Net(), null, 2.0, (lo, hi)), z, y, randn_like=randn_from(2), **opts)
    if gnet:
        assert torch.equal(got, want)
    else:  # the null half is batched with the conditional one: same values up to the batch's rounding
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    everywhere = sample(Net(), z, y, guidance=2.0, gnet=weak_guide() if gnet else None, randn_like=randn_from(2), **opts)
    plain = sample(Net(), z, y, randn_like=randn_from(2), **opts)
    assert (got - everywhere).abs().max() > 1e-3 and (got - plain).abs().max() > 1e-3


def test_an_interval_that_holds_no_step_is_unguided_bit_for_bit():
    z, y, guide = whitened(16, 3), torch.randn(16, 2), weak_guide()
    plain = sample(Net(), z, y, num_steps=8)
    assert torch.equal(sample(Net(), z, y, num_steps=8, guidance=3.0, gnet=guide, guidance_interval=(100.0, 200.0)),
                       plain)
    assert guide.calls == 0
    # a level on the interval's upper end is guided, one on its lower end is not: (lo, hi]
    g = Guidance(2.0, interval=(0.5, 2.0))
    assert [g.applies(s) for s in (0.5, 0.50001, 2.0, 2.00001)] == [False, True, True, False]


def test_guidance_options_are_checked():
    with pytest.raises(ValueError, match="positive scale"):
        Guidance(0.0)
    for bad in ((1.0, 1.0), (2.0, 1.0), (-0.1, 1.0)):
        with pytest.raises(ValueError, match="0 <= lo < hi"):
            Guidance(2.0, interval=bad)
    with pytest.raises(ValueError, match="classifier-free guidance needs conditioning"):
        guided(Net(), None, 2.0)
    guided(Net(), None, 2.0, gnet=weak_guide())  # a guiding network needs no conditioning (unconditional models)


# ---------------------------------------------------------------------------------------------------
# Generation: `vcdm generate --gnet`, `vcdm sample --prior-gnet/--image-gnet`, the Python API.

@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight checkpoints; a model's guide differs from it only by its weights (the path's
    length seeds them), as an earlier snapshot of the same run would."""
    root = tmp_path_factory.mktemp("guided")
    pca = pixel_pca(0)
    nets = {
        "prior": write_model(root / "prior" / "net.safetensors", "prior", embedder=pca),
        "weak_prior": write_model(root / "prior" / "weak-snapshot.safetensors", "prior", embedder=pca),
        "other_prior": write_model(root / "other" / "net.safetensors", "prior", embedder=pixel_pca(1)),
        "wide_prior": write_model(root / "wide" / "net.safetensors", "prior", embedder=pixel_pca(0, 16), emb_dim=16),
        "cond_prior": write_model(root / "cond" / "net.safetensors", "prior", embedder=pca, label_dim=3),
        "image": write_model(root / "image" / "net.safetensors", "image", embedder=pca),
        "weak_image": write_model(root / "image" / "weak-snapshot.safetensors", "image", embedder=pca),
        "uncond": write_model(root / "uncond" / "net.safetensors", "uncond"),
        "weak_uncond": write_model(root / "uncond" / "weak-snapshot.safetensors", "uncond"),
    }
    for seed, path in enumerate(nets.values()):
        jitter(path, seed)
    return nets


def jitter(path: Path, seed: int, scale: float = 0.05) -> None:
    """Perturb every weight: freshly initialised output layers are near zero, and so would be what guidance
    changes."""
    denoiser, config, tensors = load_checkpoint(path)
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in denoiser.net.state_dict().items()}
    save_checkpoint(path, {"net": state, **tensors}, config)


def by_hand(net_path: Path, guide_path: Path, w: float, seeds: list[int], interval=(0.0, float("inf")),
            given: dict | None = None, **opts) -> torch.Tensor:
    """The guided samples computed outside vcdm.generate: the same per-seed draws and batch padding, the
    formula applied by ByHand (an unconditional guide called without conditioning)."""
    net, guide = load_model(net_path), load_model(guide_path)
    latents, obs, rnd = draw(net, seeds, torch.device("cpu"), given=given)
    y = net.structure.flatten_observed({k: v.float() for k, v in obs.items()}) if obs else None
    g = ChunkedDenoiser(guide.denoiser)
    if not guide.structure.observed_names:
        g = (lambda padded: lambda x, sigma, y=None: padded(x, sigma, None))(g)
    with torch.no_grad():
        return sample(ByHand(ChunkedDenoiser(net.denoiser), g, w, interval), latents, y, randn_like=rnd.randn_like,
                      **opts)


def test_generate_with_a_guiding_network_is_the_formula_applied_by_hand(nets, tmp_path):
    args = ["--network", nets["uncond"], "--seeds", "0-3", "--steps", 4, "--fp32", "--no-channels-last"]
    run(generate_cmd, [*args, "--outdir", tmp_path / "g", "--gnet", nets["weak_uncond"], "--guidance", 2.5])
    want = to_uint8_hwc(load_model(nets["uncond"]).structure.unflatten_latent(
        by_hand(nets["uncond"], nets["weak_uncond"], 2.5, [0, 1, 2, 3], num_steps=4))["image"])
    got = np.stack([read_png(tmp_path / "g" / f"{s:06d}.png") for s in range(4)])
    assert np.array_equal(got, want)
    run(generate_cmd, [*args, "--outdir", tmp_path / "plain"])
    run(generate_cmd, [*args, "--outdir", tmp_path / "w1", "--gnet", nets["weak_uncond"], "--guidance", 1])
    plain = [read_png(tmp_path / "plain" / f"{s:06d}.png") for s in range(4)]
    assert all(np.array_equal(a, read_png(tmp_path / "w1" / f"{s:06d}.png")) for s, a in enumerate(plain))
    assert not np.array_equal(got, np.stack(plain))
    manifest = json.loads((tmp_path / "g" / "vcdm-manifest.json").read_text())["settings"]
    assert manifest["--gnet"] == f"sha256:{file_sha256(nets['weak_uncond'])}" and manifest["--guidance"] == 2.5
    unguided = json.loads((tmp_path / "w1" / "vcdm-manifest.json").read_text())["settings"]
    assert not {"--gnet", "--guidance_interval"} & set(unguided)  # as manifests were before guides existed
    # another guide never shares the folder
    other = run(generate_cmd, [*args, "--outdir", tmp_path / "g", "--gnet", nets["uncond"], "--guidance", 2.5],
                ok=False)
    assert other.exit_code == 1 and "made with --gnet sha256:" in other.output and "--overwrite" in other.output


def test_results_folders_name_the_guide_and_keep_unguided_names(nets):
    plain = SamplerOptions(num_steps=40, S_churn=50, S_noise=1.007)
    digest = file_sha256(nets["weak_prior"])[:16]
    guided_dir = results_dir(nets["prior"], plain.replace(guidance=2.0, gnet=nets["weak_prior"]), [0])
    assert f"_gnet-{digest}_guidance-2.0_" in guided_dir.parent.name
    interval = results_dir(nets["prior"], plain.replace(guidance=2.0, guidance_interval=(0.28, 2.9)), [0])
    assert "_guidance-2.0_guidance_interval-0.28,2.9_" in interval.parent.name and "gnet" not in str(interval)
    # w = 1 is the unguided run: its folder, whatever guide or interval is named
    w1 = plain.replace(gnet=nets["weak_prior"], guidance_interval=(0.3, 3.0))
    assert results_dir(nets["prior"], w1, [0]) == results_dir(nets["prior"], plain, [0])
    assert (w1.gnet, w1.guidance_interval) == (None, None)


def test_two_stage_guided_prior_gives_the_formulas_embeddings(nets, tmp_path, monkeypatch):
    """`vcdm sample` with an autoguided prior (interval) and an image model guided by an unconditional
    network (classifier-free guidance by a second network): the prior's embeddings are the formula's."""
    monkeypatch.chdir(tmp_path)
    args = ["--prior", nets["prior"], "--image-model", nets["image"], "--seeds", "0-2", "--prior-steps", 3,
            "--image-steps", 3, "--prior-S_churn", 0, "--image-S_churn", 0, "--fp32", "--no-channels-last",
            "--prior-gnet", nets["weak_prior"], "--prior-guidance", 2.0, "--prior-guidance-interval", "0.5,20",
            "--image-gnet", nets["uncond"], "--image-guidance", 1.5]
    result = run(sample_cmd, args)
    emb_dir, img_dir = (Path(line.split(":")[0]) for line in result.output.splitlines()[-2:])
    assert f"gnet-{file_sha256(nets['weak_prior'])[:16]}" in emb_dir.parent.name
    assert f"gnet-{file_sha256(nets['uncond'])[:16]}" in img_dir.parents[1].name
    want = by_hand(nets["prior"], nets["weak_prior"], 2.0, [0, 1, 2], (0.5, 20.0), num_steps=3).float()
    got = torch.stack([read_tensors(emb_dir / f"{s:06d}.pt")["embedding"] for s in range(3)])
    assert torch.equal(got, want)
    assert (want - by_hand(nets["prior"], nets["weak_prior"], 1.0, [0, 1, 2], num_steps=3)).abs().max() > 0.5
    embeddings = {"embedding": got}
    images = by_hand(nets["image"], nets["uncond"], 1.5, [0, 1, 2], given=embeddings, num_steps=3)
    want_img = to_uint8_hwc(load_model(nets["image"]).structure.unflatten_latent(images)["image"])
    assert np.array_equal(np.stack([read_png(img_dir / f"{s:06d}.png") for s in range(3)]), want_img)
    # the Python API: the same embeddings and images
    pipe = TwoStagePipeline.from_checkpoints(nets["prior"], nets["image"], device="cpu")
    out = pipe([0, 1, 2], prior_steps=3, image_steps=3, prior_S_churn=0, image_S_churn=0, bf16=False,
               channels_last=False, prior_gnet=nets["weak_prior"], prior_guidance=2.0,
               prior_guidance_interval=(0.5, 20), image_gnet=nets["uncond"], image_guidance=1.5)
    assert np.array_equal(out.embeddings, got.numpy())
    assert np.array_equal(out.images, want_img)


def test_sampler_options_check_the_interval():
    opts = SamplerOptions(guidance=2, guidance_interval=[0.3, 5])
    assert opts.guidance_interval == (0.3, 5.0)
    with pytest.raises(ValueError, match="^guidance_interval: expected SIGMA_LO,SIGMA_HI with 0 <= SIGMA_LO"):
        SamplerOptions(guidance=2, guidance_interval=(3, 1))
    with pytest.raises(TypeError, match="^guidance_interval: expected"):
        SamplerOptions(guidance=2, guidance_interval="0.3,5")
    assert SamplerOptions(guidance=2).guidance_interval is None


def test_pipeline_guidance_one_is_unguided_and_loads_no_guide(nets):
    pipe = Pipeline.from_checkpoint(nets["uncond"], device="cpu")
    plain = pipe([0, 1], steps=3, bf16=False)
    same = pipe([0, 1], steps=3, bf16=False, guidance=1.0, gnet=nets["weak_uncond"], guidance_interval=(0.1, 1.0))
    assert np.array_equal(plain.images, same.images) and not pipe.guides
    guided_out = pipe([0, 1], steps=3, bf16=False, guidance=2.0, gnet=nets["weak_uncond"])
    assert not np.array_equal(plain.images, guided_out.images) and len(pipe.guides) == 1


def test_variations_take_a_guide(nets, tmp_path):
    PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    args = ["--image-model", nets["image"], "--images", tmp_path / "in.png", "--seeds", "0-2", "--steps", 3,
            "--device", "cpu", "--fp32"]
    grids = {}
    for name, extra in (("plain", []), ("w1", ["--gnet", nets["weak_image"], "--guidance", 1]),
                        ("guided", ["--gnet", nets["weak_image"], "--guidance", 2])):
        run(variations_cmd, [*args, "--outdir", tmp_path / name, *extra])
        grids[name] = read_png(tmp_path / name / "in.png")
    assert np.array_equal(grids["plain"], grids["w1"]) and not np.array_equal(grids["plain"], grids["guided"])
    bad = run(variations_cmd, [*args, "--outdir", tmp_path / "bad", "--gnet", nets["prior"], "--guidance", 2], ok=False)
    assert bad.exit_code == 1 and len(error_lines(bad.output)) == 1 and "--gnet" in bad.output


@pytest.mark.parametrize("net,guide,message", [
    ("prior", "other_prior", "embedders differ"),
    ("prior", "wide_prior", "generates {'embedding': (16,)}, but"),
    ("prior", "image", "generates {'image': (3, 8, 8)}, but"),
    ("prior", "cond_prior", "is conditioned on {'label': (3,)}, "),
    ("prior", "missing", "no such checkpoint file"),
])
def test_an_incompatible_guide_is_one_error_line(nets, tmp_path, net, guide, message):
    gnet = nets.get(guide, tmp_path / "missing.safetensors")
    result = run(generate_cmd, ["--network", nets[net], "--outdir", tmp_path / "o", "--seeds", "0", "--steps", 2,
                                "--gnet", gnet, "--guidance", 2], ok=False)
    lines = error_lines(result.output)
    assert result.exit_code != 0 and len(lines) == 1 and "Traceback" not in result.output
    assert "--gnet" in lines[0] and message in lines[0], lines
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.pt"))


def test_two_stage_checks_both_guides_before_sampling(nets, tmp_path):
    result = run(sample_cmd, ["--prior", nets["prior"], "--image-model", nets["image"], "--seeds", "0",
                              "--outdir", tmp_path / "o", "--image-gnet", nets["prior"], "--image-guidance", 2],
                 ok=False)
    lines = error_lines(result.output)
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: --image-gnet ")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["3,1", "0.5", "a,b", "-1,2"])
def test_a_bad_guidance_interval_is_a_usage_error(nets, tmp_path, value):
    result = run(generate_cmd, ["--network", nets["uncond"], "--outdir", tmp_path, "--gnet", nets["weak_uncond"],
                                "--guidance", 2, "--guidance-interval", value], ok=False)
    lines = error_lines(result.output)
    assert result.exit_code == 2 and len(lines) == 1 and "--guidance-interval" in lines[0], result.output


def test_check_guide_data_and_noise(nets):
    net = read_checkpoint_config(nets["prior"])
    guide = copy.deepcopy(net)
    check_guide(net, guide)
    guide.data["resolution"] = 16
    with pytest.raises(IncompatibleGuide, match="other data: its resolution is 16"):
        check_guide(net, guide)
    guide = copy.deepcopy(net)
    guide.denoiser["noise_mult"] = [1.0, 0.5]  # image (not modelled), embedding
    with pytest.raises(IncompatibleGuide, match="noise levels differ"):
        check_guide(net, guide)
    check_guide(read_checkpoint_config(nets["image"]), read_checkpoint_config(nets["uncond"]))  # an unconditional guide: allowed


def test_readme_guidance_commands_use_the_commands_flags():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("\n## Guidance\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = {"generate": generate_cmd, "sample": sample_cmd}
    seen = set()
    for line in block.splitlines():
        if line.startswith("vcdm "):
            name = line.split()[1]
            known = {opt for p in commands[name].params for opt in p.opts}
            flags = set(re.findall(r"(--[\w-]+)", line))
            assert flags <= known, (name, flags - known)
            seen |= flags
    assert {"--gnet", "--guidance-interval", "--prior-gnet", "--image-guidance-interval"} <= seen


# ---------------------------------------------------------------------------------------------------
# Parity with EDM2's generate_images.py --gnet --guidance (tests/data/edm2-guided.json, made by running it).

EDM2_GUIDED = json.loads((Path(__file__).parent / "data" / "edm2-guided.json").read_text())


@pytest.mark.slow
@pytest.mark.determinism
@pytest.mark.parametrize("case", list(EDM2_GUIDED["cases"]))
def test_guided_generate_gives_edm2s_images(fake_modules, marker, case):
    """EDM2's networks guided as EDM2 guides them: autoguidance by a smaller network (model_channels 16
    instead of 32) and classifier-free guidance by an unconditional network. Pixels may differ by one level:
    EDM2's own sampler run in float64 writes the same PNGs as in float32, so the differences come from the
    networks' float32 evaluation (as unguided, tests/test_edm2_import.py), which guidance amplifies by up to w.
    Measured: at most 1 level, in 1.7-6.3% of the values per image."""
    golden, s = EDM2_GUIDED["cases"][case], EDM2_GUIDED["sampler"]
    paths = {}
    for name in (golden["net"], golden["gnet"]):
        label_dim = 1000 if name.startswith("class1000") else 0
        over = dict(model_channels=EDM2_GUIDED["small_model_channels"]) if name.endswith("-small") else {}
        edm2_pickle(fake_modules / f"{name}.pkl", marker, label_dim=label_dim, snapshot=False, **over)
        paths[name] = fake_modules / f"{name}.safetensors"
        imported = CliRunner().invoke(cli, ["import-edm", str(fake_modules / f"{name}.pkl"), str(paths[name])])
        assert imported.exit_code == 0, imported.output
    out = fake_modules / "out"
    args = ["generate", "--network", paths[golden["net"]], "--gnet", paths[golden["gnet"]], "--guidance",
            golden["guidance"], "--outdir", out, "--seeds", ",".join(map(str, golden["seeds"])), "--steps",
            s["num_steps"], "--sigma_min", s["sigma_min"], "--sigma_max", s["sigma_max"], "--rho", s["rho"], "--fp32",
            "--batch", 4, "--no-progress", "--device", "cpu"]
    if golden["class_idx"] is not None:
        args += ["--class", golden["class_idx"]]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    res, ch = EDM2_GUIDED["net"]["img_resolution"], EDM2_GUIDED["net"]["img_channels"]
    for seed in golden["seeds"]:
        want = np.frombuffer(bytes.fromhex(golden["pixels"][str(seed)]["hex"]), np.uint8).reshape(res, res, ch)
        diff = np.abs(read_png(out / f"{seed:06d}.png").astype(int) - want.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.08, (seed, diff.max(), (diff > 0).mean())
