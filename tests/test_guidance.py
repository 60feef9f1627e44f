"""Guidance by a second network or by the null condition, D = D_g + w (D - D_g), and guidance intervals.

Checked on the exact denoisers of Gaussian data (tests/test_diffusion.py): two Gaussians of different
means and covariances play the network and its guide, so every guided value has a closed form. The
classifier-free path is pinned to the numbers it gave before guidance was rewritten around a guide
(tests/data/guidance-golden.json, written by the old code on test_samplers.py's exact-arithmetic toy).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_diffusion import F64, Gaussian, posterior_mean, randn_from, whitened
from test_samplers import PseudoNoise, Toy, latents
from vcdm.diffusion import Guidance, guided, sample
from vcdm.diffusion.samplers import Churn, sample_heun
from vcdm.diffusion.schedules import append_zero, karras_sigmas

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
    """The classifier-free guidance of vcdm.diffusion.sampling.Model as it was before the guide existed."""

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
