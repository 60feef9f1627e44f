"""Preconditioning, losses, samplers and per-seed RNG, checked against closed forms.

The reference is a Gaussian data distribution N(mu, cov), whose ideal denoiser is known exactly:
D(x; sigma) = mu + cov (cov + S^2)^-1 (x - mu), with S = diag(sigma * noise_mult). Samplers driven by it
must reproduce mu and cov. Deterministic samplers are fed whitened latents (sample mean exactly 0,
sample covariance exactly I) and are affine in them, so their sample moments carry no Monte-Carlo
error: the tolerances measure the solver alone.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from vcdm.data.structure import Structure, StructureError
from vcdm.diffusion import EDMLoss, StackedRandomGenerator, VELoss, VPLoss, guided, sample
from vcdm.nets.precond import Denoiser

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")

MU = torch.tensor([0.3, -0.2, 0.1, 0.25, -0.3], dtype=F64)


def _cov(d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    eig = torch.linspace(0.1, 0.5, d, dtype=F64)  # variances around sigma_data^2, like images
    return q @ torch.diag(eig) @ q.T


def posterior_mean(x, s, mu, cov):
    """E[x0 | x] for x0 ~ N(mu, cov), x = x0 + s * n; s per row and element (B, N) or scalar."""
    s = torch.as_tensor(s, dtype=F64).expand_as(x)
    if (s == s[:1]).all():  # the same noise for every row (sampling): one small solve
        return mu + (x - mu) @ torch.linalg.solve(cov + torch.diag(s[0] ** 2), cov)
    return mu + (cov @ torch.linalg.solve(cov + torch.diag_embed(s ** 2), (x - mu).unsqueeze(-1))).squeeze(-1)


class Gaussian:
    """A Denoiser-like stand-in: the exact denoiser, no network, in float64."""
    sigma_min, sigma_max = 0.0, math.inf
    round_sigma = staticmethod(torch.as_tensor)

    def __init__(self, d: int = 3):
        self.mu, self.cov = MU[:d], _cov(d)
        self.calls = 0

    def __call__(self, x, sigma, y=None):
        self.calls += 1
        return posterior_mean(x, torch.as_tensor(sigma, dtype=F64).reshape(-1, 1), self.mu, self.cov)


class ExactNet(nn.Module):
    """Outputs the F that makes an EDM-preconditioned Denoiser the exact Gaussian denoiser. It inverts
    the paper's formulas on its own (sigma from c_noise = ln(sigma)/4, x from c_in), so a Denoiser that
    computes any coefficient differently yields a wrong D."""
    label_dim = 0

    def __init__(self, mu, cov, mult, x0, sigma_data=0.5):
        super().__init__()
        self.mu, self.cov, self.mult, self.x0, self.sd = mu, cov, mult, x0, sigma_data

    def forward(self, x_in, noise_labels, class_labels=None, augment_labels=None):
        sd, sigma = self.sd, (4 * noise_labels.to(F64)).exp().reshape(-1, 1)
        s = sigma * self.mult
        x = x_in.to(F64) * (sd ** 2 + s ** 2).sqrt()
        D = posterior_mean(x, s, self.mu, self.cov)
        c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt()
        return torch.where(self.x0, D, (D - c_skip * x) / c_out).float()


class Recorder(nn.Module):
    """F = tanh(x * w + noise_label): elementwise, records what it was given."""

    def __init__(self, n: int, label_dim: int = 0):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, n))
        self.label_dim, self.seen = label_dim, []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.seen.append((x.clone(), noise_labels.clone(), class_labels))
        B = x.shape[0]
        out = torch.tanh(x.reshape(B, -1) * self.w + noise_labels.reshape(-1, 1))
        if class_labels is not None:
            out = out + class_labels.sum(1, keepdim=True)
        return out.reshape(x.shape)


def whitened(n: int, d: int, seed: int = 1) -> torch.Tensor:
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    z = z - z.mean(0)
    return z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / n)).T


def moment_errors(x, mu, cov) -> tuple[float, float]:
    """(max |mean - mu|, ||cov_hat - cov||_F / ||cov||_F)."""
    c = torch.cov(x.T.to(F64), correction=0)
    return (x.mean(0) - mu).abs().max().item(), ((c - cov).norm() / cov.norm()).item()


def randn_from(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


def joint_structure() -> Structure:
    """An embedding (3) and a one-hot label (2) generated jointly: a 5-d flat latent."""
    return Structure.from_flags({"embedding": (3,), "label": (2,)}, "1,1", "0,0")


def exact_denoiser(noise_mult=(1.0, 0.5), pred_x0=(0, 1)) -> Denoiser:
    st = joint_structure()
    mult = st.per_tensor(noise_mult, "--noise_mult", 1.0)
    x0 = st.per_tensor(pred_x0, "--pred_x0", 0).bool()
    return Denoiser(ExactNet(MU, _cov(5), mult, x0), st, noise_mult=noise_mult, pred_x0=pred_x0)


# ---------------------------------------------------------------------------------------------------
# Samplers through the analytic Gaussian denoiser.

# (sampler options, tolerance on the mean, relative tolerance on the covariance). Measured errors
# (this seed) are in the comments. The mean error floor ~2e-3 is EDM's start at N(0, sigma_max^2),
# which ignores mu: mu * sqrt(cov) / sigma_max.
DETERMINISTIC = [
    (dict(num_steps=64), 5e-3, 0.02),                                  # Heun: 1.7e-3, 0.0068
    (dict(num_steps=256, solver="euler"), 5e-3, 0.04),                 # Euler: 1.8e-3, 0.021
    (dict(sampler="ablation", solver="euler", discretization="vp", schedule="vp", scaling="vp", num_steps=256), 5e-3, 0.02),
    (dict(sampler="ablation", solver="heun", discretization="ve", schedule="ve", scaling="none", num_steps=256), 5e-3, 0.02),
    (dict(sampler="ablation", solver="heun", discretization="iddpm", schedule="linear", scaling="none", num_steps=32), 5e-3, 0.03),
    (dict(sampler="ablation", solver="heun", discretization="edm", schedule="vp", scaling="vp", num_steps=64), 5e-3, 0.02),
    (dict(sampler="ablation", num_steps=32, alpha=0.5), 5e-3, 0.02),
]


@pytest.mark.parametrize("opts,tol_mean,tol_cov", DETERMINISTIC, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_deterministic_samplers_reproduce_gaussian(opts, tol_mean, tol_cov):
    den = Gaussian()
    x = sample(den, whitened(4000, 3), **opts)
    assert x.dtype == F64 and x.shape == (4000, 3)
    err_mean, err_cov = moment_errors(x, den.mu, den.cov)
    assert err_mean < tol_mean and err_cov < tol_cov, (err_mean, err_cov)


# With churn the result is random: 20000 samples, Monte-Carlo error ~0.005 on the mean and ~0.01 on
# the covariance, plus the solver's bias (Euler's is the largest, ~0.03 at 512 steps).
STOCHASTIC = [
    (dict(num_steps=128, S_churn=40, S_min=0.05, S_max=50), 0.04),  # measured 0.019 (mean 0.009)
    (dict(num_steps=512, S_churn=20, solver="euler"), 0.06),        # measured 0.021 (mean 0.002)
    (dict(sampler="ablation", num_steps=128, S_churn=20), 0.04),    # measured 0.013 (mean 0.009)
]


@pytest.mark.parametrize("opts,tol_cov", STOCHASTIC, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_stochastic_samplers_reproduce_gaussian(opts, tol_cov):
    den = Gaussian()
    x = sample(den, whitened(20000, 3), randn_like=randn_from(2), **opts)
    err_mean, err_cov = moment_errors(x, den.mu, den.cov)
    assert err_mean < 0.02 and err_cov < tol_cov, (err_mean, err_cov)


def test_churn_changes_samples_but_not_their_distribution():
    den, z = Gaussian(), whitened(4000, 3)
    plain = sample(den, z, num_steps=64)
    churned = sample(den, z, num_steps=64, S_churn=40, randn_like=randn_from(3))
    assert (plain - churned).abs().mean() > 0.05
    # 4000 samples: Monte-Carlo error, measured 0.016 and 0.050; churn noise off by 1.5x gives 1.36
    err_mean, err_cov = moment_errors(churned, den.mu, den.cov)
    assert err_mean < 0.03 and err_cov < 0.1, (err_mean, err_cov)


def test_dpmpp_2m_close_to_many_step_heun():
    den, z = Gaussian(), whitened(4000, 3)
    ref = sample(den, z, num_steps=512)
    rms = lambda x: (x - ref).pow(2).mean().sqrt().item()
    # Measured RMS distance: 10 steps 0.084, 15 steps 0.047, 20 steps 0.025 (data std 0.3-0.7).
    assert rms(sample(den, z, sampler="dpm2m", num_steps=20)) < 0.04
    assert rms(sample(den, z, sampler="dpm2m", num_steps=10)) < 0.12
    # Second-order multistep: better than Heun at the same number of network evaluations (21).
    assert rms(sample(den, z, sampler="dpm2m", num_steps=20)) < 0.5 * rms(sample(den, z, num_steps=11))
    calls = Gaussian()
    sample(calls, z[:8], sampler="dpm2m", num_steps=20)
    assert calls.calls == 20


def test_real_denoiser_with_noise_mult_and_pred_x0_samples_gaussian():
    """The whole chain: flat latent -> EDM preconditioning (per-tensor noise_mult, pred_x0) -> network
    -> Heun with per-element noise. A wrong c_in/c_noise/c_skip/c_out or a sampler ignoring the noise
    multiplier would distort the moments."""
    den = exact_denoiser()
    assert den.noise_scale.tolist() == [1, 1, 1, 0.5, 0.5] and den.x0_mask.tolist() == [0, 0, 0, 1, 1]
    x = sample(den, whitened(4000, 5), num_steps=64)
    err_mean, err_cov = moment_errors(x, MU, _cov(5))
    # measured 4.5e-3 (mu / sigma_max offset, larger for the label's halved sigma_max), 0.0061; a sampler
    # that ignores noise_mult gives a covariance error of 2.2
    assert err_mean < 0.01 and err_cov < 0.02, (err_mean, err_cov)
    x = sample(den, whitened(10000, 5), num_steps=128, S_churn=40, S_min=0.05, S_max=50, randn_like=randn_from(4))
    err_mean, err_cov = moment_errors(x, MU, _cov(5))
    assert err_mean < 0.025 and err_cov < 0.05, (err_mean, err_cov)  # measured 0.010, 0.028


def test_noise_mult_scales_the_initial_noise():
    den = exact_denoiser(noise_mult=(1.0, 0.25))
    seen = []
    inner = den.net.forward
    den.net.forward = lambda x, *a, **k: (seen.append(x.clone()), inner(x, *a, **k))[1]
    z = torch.ones(1, 5, dtype=F64)
    sample(den, z, num_steps=2)
    sd, s = 0.5, torch.tensor([80.0] * 3 + [20.0] * 2)
    assert torch.allclose(seen[0], (80 * z * torch.tensor([1, 1, 1, 0.25, 0.25]) / (sd ** 2 + s ** 2).sqrt()).float())


# ---------------------------------------------------------------------------------------------------
# Denoiser algebra.

def test_edm_preconditioning_formulas():
    st = Structure.from_flags({"image": (2, 2, 2), "embedding": (4,)}, "1,1", "0,1")
    net = Recorder(8, label_dim=4)
    den = Denoiser(net, st)
    x, sigma, y = torch.randn(3, 8), torch.tensor([0.01, 0.7, 30.0]), torch.randn(3, 4)
    D = den(x, sigma, y)
    x_in, c_noise, labels = net.seen[-1]
    assert x_in.shape == (3, 2, 2, 2) and D.shape == (3, 8) and D.dtype == torch.float32
    s, sd = sigma.reshape(-1, 1), 0.5
    c_skip, c_out, c_in = sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt(), 1 / (s ** 2 + sd ** 2).sqrt()
    torch.testing.assert_close(x_in.reshape(3, 8), c_in * x)
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    assert torch.equal(labels, y)
    F = torch.tanh(x_in.reshape(3, 8) * net.w + c_noise.reshape(-1, 1)) + y.sum(1, keepdim=True)
    torch.testing.assert_close(D, c_skip * x + c_out * F)
    den(x, 0.5)  # scalar sigma, no y: zeros for the network's labels
    assert net.seen[-1][1].shape == (3,) and torch.equal(net.seen[-1][2], torch.zeros(3, 4))
    with pytest.raises(ValueError, match="conditioning y has 3 values"):
        den(x, sigma, torch.randn(3, 3))


def test_noise_mult_and_pred_x0_per_tensor():
    st = Structure.from_flags({"image": (3, 2, 2), "embedding": (3,), "label": (2,)}, "0,1,1", "0,0,0")
    net = Recorder(5)
    den = Denoiser(net, st, noise_mult="1,0.5,2", pred_x0="0,0,1")  # indexed per data tensor, as the original release
    m = torch.tensor([0.5] * 3 + [2.0] * 2)
    assert torch.equal(den.noise_scale, m) and den.x0_mask.tolist() == [False] * 3 + [True] * 2
    x, sigma = torch.randn(4, 5), torch.tensor([0.1, 0.5, 2.0, 10.0])
    D = den(x, sigma)
    x_in, c_noise, _ = net.seen[-1]
    s, sd = sigma.reshape(-1, 1) * m, 0.5  # effective per-element sigma ...
    torch.testing.assert_close(x_in, x / (s ** 2 + sd ** 2).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)  # ... but the network is told the base sigma
    F = torch.tanh(x_in * net.w + c_noise.reshape(-1, 1))
    expected = sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2).sqrt() * F
    torch.testing.assert_close(D[:, :3], expected[:, :3])
    assert torch.equal(D[:, 3:], F[:, 3:])  # pred_x0: D = F, x ignored (c_skip 0, c_out 1)
    # One value broadcasts; one value per existing tensor is accepted too.
    assert torch.equal(Denoiser(Recorder(5), st, noise_mult=0.5).noise_scale, torch.full((5,), 0.5))
    assert torch.equal(Denoiser(Recorder(5), st, noise_mult=[0.5, 2]).noise_scale, m)
    for bad in ("1,2,3,4", (1.0, 2.0, 3.0, 4.0)):
        with pytest.raises(StructureError, match="--noise_mult: expected 1, 2 or 3 values"):
            Denoiser(Recorder(5), st, noise_mult=bad)
    with pytest.raises(ValueError, match="--noise_mult: every multiplier must be a positive"):
        Denoiser(Recorder(5), st, noise_mult="1,0,1")
    with pytest.raises(ValueError, match="--pred_x0: expected 0 or 1"):
        Denoiser(Recorder(5), st, pred_x0="0,2,1")


def test_vp_and_ve_preconditioning_formulas():
    st = Structure.from_flags({"image": (1, 2, 2)}, "1", "0")
    x, sigma = torch.randn(3, 4), torch.tensor([0.01, 1.0, 50.0])
    s = sigma.reshape(-1, 1).double()
    beta_d, beta_min, M = 19.9, 0.1, 1000
    vp_inv = ((beta_min ** 2 + 2 * beta_d * (1 + s ** 2).log()).sqrt() - beta_min) / beta_d
    expected = {"vp": (1 / (s ** 2 + 1).sqrt(), -s, (M - 1) * vp_inv), "ve": (torch.ones_like(s), s, (0.5 * s).log())}
    for kind, (c_in, c_out, c_noise) in expected.items():
        net = Recorder(4)
        den = Denoiser(net, st, kind=kind)
        D = den(x, sigma)
        x_in, noise, _ = net.seen[-1]
        torch.testing.assert_close(noise.double(), c_noise.flatten(), rtol=5e-4, atol=0)  # float32, as EDM
        torch.testing.assert_close(x_in.reshape(3, 4).double(), c_in * x.double())
        F = torch.tanh(x_in.reshape(3, 4) * net.w + noise.reshape(-1, 1))
        torch.testing.assert_close(D.double(), x.double() + c_out * F.double())
    vp_sigma = lambda t: math.sqrt(math.exp(0.5 * beta_d * t ** 2 + beta_min * t) - 1)
    vp = Denoiser(Recorder(4), st, kind="vp")
    assert vp.sigma_max == pytest.approx(vp_sigma(1), rel=1e-6)
    assert vp.sigma_min == pytest.approx(vp_sigma(1e-5), rel=0.03)  # float32, exactly as EDM's VPPrecond
    ve = Denoiser(Recorder(4), st, kind="ve")
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)
    edm = Denoiser(Recorder(4), st)
    assert (edm.sigma_min, edm.sigma_max) == (0.0, math.inf)
    with pytest.raises(ValueError, match="denoiser kind"):
        Denoiser(Recorder(4), st, kind="iddpm")


def test_config_rebuilds_the_same_denoiser():
    st = joint_structure()
    for kwargs in (dict(noise_mult="1,0.5", pred_x0="0,1"), dict(kind="vp", beta_d=18.0), dict(kind="ve", sigma_max=50.0)):
        den = Denoiser(Recorder(5), st, **kwargs)
        cfg = json.loads(json.dumps(den.config(), allow_nan=False))
        again = Denoiser(Recorder(5), st, **cfg)
        assert again.config() == cfg and (again.sigma_min, again.sigma_max) == (den.sigma_min, den.sigma_max)
        x = torch.randn(2, 5)
        assert torch.equal(again(x, 0.3), den(x, 0.3))
    assert set(Denoiser(Recorder(5), st).state_dict()) == {"net.w"}  # masks are not weights


def test_several_latent_images_are_refused():
    st = Structure.from_flags({"image": (1, 2, 2), "other": (1, 2, 2)}, "1,1", "0,0")
    with pytest.raises(ValueError, match="cannot be modelled jointly"):
        Denoiser(Recorder(8), st)


# ---------------------------------------------------------------------------------------------------
# Losses.

class ZeroOut(nn.Module):
    """Wraps a Denoiser the way DDP does (``.module``); outputs zeros and records its input."""

    def __init__(self, module):
        super().__init__()
        self.module, self.seen = module, []

    def forward(self, x, sigma, y=None, augment_labels=None):
        self.seen.append((x.clone(), sigma.clone()))
        return torch.zeros_like(x)


def test_edm_loss_weight_noise_and_pred_x0():
    den = exact_denoiser(noise_mult=(1.0, 0.5), pred_x0=(0, 1))
    wrapped, x = ZeroOut(den), torch.randn(64, 5) * 0.5
    loss = EDMLoss()(wrapped, x, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # replay the draws: sigma first, then the noise
    sigma = (torch.randn([64, 1], generator=g) * 1.2 - 1.2).exp()
    s = sigma * torch.tensor([1, 1, 1, 0.5, 0.5])
    noise = torch.randn([64, 5], generator=g) * s
    x_noisy, sigma_seen = wrapped.seen[0]
    torch.testing.assert_close(sigma_seen, sigma.flatten())
    torch.testing.assert_close(x_noisy, x + noise)
    weight = (s ** 2 + 0.25) / (s * 0.5) ** 2
    torch.testing.assert_close(loss[:, :3], weight[:, :3] * x[:, :3] ** 2)
    torch.testing.assert_close(loss[:, 3:], x[:, 3:] ** 2)  # pred_x0 elements: weight 1


def test_edm_loss_draws_sigma_from_its_own_log_normal():
    """P_mean, P_std and sigma_data are the loss's, not EDM's defaults baked in."""
    den = exact_denoiser(noise_mult=(1.0, 1.0), pred_x0=(0, 0))
    wrapped, x = ZeroOut(den), torch.randn(32, 5) * 0.5
    loss = EDMLoss(P_mean=0.7, P_std=0.3, sigma_data=2.0)(wrapped, x, generator=torch.Generator().manual_seed(3))
    sigma = (torch.randn([32, 1], generator=torch.Generator().manual_seed(3)) * 0.3 + 0.7).exp()
    torch.testing.assert_close(wrapped.seen[0][1], sigma.flatten())
    torch.testing.assert_close(loss, (sigma ** 2 + 4.0) / (sigma * 2.0) ** 2 * x ** 2)


def test_vp_and_ve_losses_draw_sigma_from_their_schedules():
    """VP: t ~ U(epsilon_t, 1) mapped by sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM's
    beta_d 19.9, beta_min 0.1); VE: sigma log-uniform on [0.02, 100]. Both weigh by 1 / sigma^2."""
    den = exact_denoiser(noise_mult=(1.0, 1.0), pred_x0=(0, 0))
    x = torch.randn(256, 5) * 0.5
    u = torch.rand([256, 1], generator=torch.Generator().manual_seed(1))
    t = 1 + u * (1e-5 - 1)
    expected = {VPLoss: (9.95 * t ** 2 + 0.1 * t).exp().sub(1).sqrt(), VELoss: 0.02 * 5000 ** u}
    assert VPLoss().sigma(torch.tensor(1.0)).item() == pytest.approx(math.sqrt(math.exp(10.05) - 1))
    for loss_cls, sigma in expected.items():
        wrapped = ZeroOut(den)
        loss = loss_cls()(wrapped, x, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(wrapped.seen[0][1], sigma.flatten())
        torch.testing.assert_close(loss, x ** 2 / sigma ** 2)


def test_exact_denoiser_has_lower_loss():
    x0 = MU.float() + torch.randn(8192, 5, generator=torch.Generator().manual_seed(0)) @ torch.linalg.cholesky(_cov(5)).T.float()
    st, mult, x0_mask = joint_structure(), torch.ones(5, dtype=F64), torch.zeros(5, dtype=torch.bool)
    exact = Denoiser(ExactNet(MU, _cov(5), mult, x0_mask), st)
    wrong_cov = Denoiser(ExactNet(MU, 2 * _cov(5), mult, x0_mask), st)
    wrong_mean = Denoiser(ExactNet(MU + 0.2, _cov(5), mult, x0_mask), st)
    loss = lambda d: EDMLoss()(d, x0, generator=torch.Generator().manual_seed(5)).sum(1).mean().item()
    best = loss(exact)
    assert best < 0.95 * loss(wrong_cov) and best < 0.95 * loss(wrong_mean), (best, loss(wrong_cov), loss(wrong_mean))


def test_loss_refuses_a_plain_module():
    with pytest.raises(TypeError, match="needs a vcdm Denoiser"):
        EDMLoss()(nn.Identity(), torch.randn(2, 3))


# ---------------------------------------------------------------------------------------------------
# Per-seed RNG.

@pytest.mark.determinism
def test_stacked_generator_matches_plain_generators():
    seeds = [7, 0, 123456, 2 ** 32 + 7]
    rnd = StackedRandomGenerator("cpu", seeds)
    z = rnd.randn([4, 2, 3])
    for row, seed in zip(z, seeds):
        assert torch.equal(row, torch.randn([2, 3], generator=torch.Generator().manual_seed(seed % 2 ** 32)))
    assert torch.equal(z[0], z[3])  # seeds are taken mod 2^32, as EDM
    alone = StackedRandomGenerator("cpu", [123456]).randn([1, 2, 3])
    assert torch.equal(alone[0], z[2])
    labels = StackedRandomGenerator("cpu", seeds).randint(10, size=[4])
    assert labels.tolist() == [torch.randint(10, [], generator=torch.Generator().manual_seed(s % 2 ** 32)).item() for s in seeds]
    with pytest.raises(ValueError, match="number of seeds"):
        rnd.randn([3, 2])


@pytest.mark.determinism
def test_same_seed_same_sample_at_batch_1_and_7():
    st = Structure.from_flags({"image": (1, 2, 3)}, "1", "0")
    den = Denoiser(Recorder(6), st).eval()
    seeds, opts = [3, 14, 15, 92, 65, 35, 89], dict(num_steps=8, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)

    def run(batch_seeds):
        rnd = StackedRandomGenerator("cpu", batch_seeds)
        return sample(den, rnd.randn([len(batch_seeds), 6]), randn_like=rnd.randn_like, **opts)

    batched = run(seeds)
    assert torch.equal(batched, torch.cat([run([s]) for s in seeds]))
    assert torch.equal(run(seeds[::-1]), batched.flip(0))


# ---------------------------------------------------------------------------------------------------
# Guidance and the dispatcher.

class Conditional(Gaussian):
    """Gaussian denoiser whose mean moves with the conditioning: D + y.sum()."""

    def __init__(self):
        super().__init__()
        self.ys = []

    def __call__(self, x, sigma, y=None):
        self.ys.append(y)
        return super().__call__(x, sigma) + (0 if y is None else y.sum(1, keepdim=True).to(F64))


def test_guidance_one_is_the_plain_sampler():
    z, y = whitened(16, 3), torch.randn(16, 2)
    den = Conditional()
    plain = sample(den, z, y, num_steps=10)
    assert den.calls == 19 and all(v is y for v in den.ys)
    assert torch.equal(sample(Conditional(), z, y, num_steps=10, guidance=1.0), plain)


def test_guidance_formula():
    den, x, y = Conditional(), torch.randn(4, 3, dtype=F64), torch.randn(4, 2)
    D = guided(den, y, 2.5)(x, torch.tensor(0.7, dtype=F64))
    assert den.calls == 1 and torch.equal(den.ys[0][4:], torch.zeros(4, 2))  # one batched call, y zeroed
    cond, uncond = Gaussian()(x, 0.7) + y.sum(1, keepdim=True), Gaussian()(x, 0.7)
    torch.testing.assert_close(D, uncond + 2.5 * (cond - uncond))
    with pytest.raises(ValueError, match="guidance needs conditioning"):
        guided(den, None, 2.0)


def test_sigma_range_is_clipped_to_the_denoiser():
    class Narrow(Gaussian):
        sigma_min, sigma_max = 0.02, 10.0

        def __call__(self, x, sigma, y=None):
            self.sigmas = getattr(self, "sigmas", []) + [float(sigma)]
            return super().__call__(x, sigma)

    for opts in (dict(), dict(sampler="dpm2m"), dict(sampler="ablation"), dict(sampler="ablation", discretization="ve", schedule="ve")):
        den = Narrow()
        sample(den, torch.zeros(2, 3, dtype=F64), num_steps=6, **opts)
        assert max(den.sigmas) == pytest.approx(10.0) and min(den.sigmas) == pytest.approx(0.02)


def test_dispatcher_rejects_bad_options():
    z = torch.zeros(1, 3, dtype=F64)
    with pytest.raises(ValueError, match="sampler: expected one of edm|ablation|dpm2m"):
        sample(Gaussian(), z, sampler="ddim")
    with pytest.raises(ValueError, match="dpm2m is deterministic: drop S_churn"):
        sample(Gaussian(), z, sampler="dpm2m", S_churn=1)
    with pytest.raises(ValueError, match="solver: expected heun|euler"):
        sample(Gaussian(), z, solver="rk4")
    with pytest.raises(ValueError, match="discretization: expected one of"):
        sample(Gaussian(), z, sampler="ablation", discretization="cosine")
    x = sample(Gaussian(), z, num_steps=4, sigma_min=None, S_churn=None)  # None = default, as EDM's CLI
    assert torch.equal(x, sample(Gaussian(), z, num_steps=4))
