"""Consistency tuning (vcdm tune, vcdm.diffusion.consistency) and the consistency sampler.

The analytic model: data N(0, s^2 I). Its denoiser is D(x, t) = x s^2 / (s^2 + t^2) and its exact
consistency function (the probability-flow ODE's map to t = 0) is f(x, t) = x s / sqrt(s^2 + t^2).
With s = sigma_data = 0.5 and EDM's preconditioning, f = c_skip x + c_out w(t) c_in x has
w(t) = tanh(asinh(t / s) / 2) and D has w = 0; the tiny model below is w = tanh(theta asinh(t / s)):
theta 0 is the diffusion denoiser, theta 1/2 the exact consistency function.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import vcdm
from tiny_models import EMB, write_model
from tiny_runs import PRIOR, assert_same_weights, base_args, error_lines, last_state, run, run_dir, write_dataset
from vcdm.checkpoints import CheckpointConfig, CheckpointError, load_checkpoint, read_checkpoint_config, save_checkpoint
from vcdm.cli.generate import command as generate_cmd
from vcdm.cli.sample import command as sample_cmd
from vcdm.cli.tune import command as tune_cmd
from vcdm.data.structure import Structure
from vcdm.diffusion.consistency import ECTLoss, ect_gap, ect_r
from vcdm.diffusion.distillation import DistillLoss, ode_solution
from vcdm.diffusion.dmd import DMD_LEVELS, Critic, DMDLoss, frozen
from vcdm.diffusion.loss import EDMLoss
from vcdm.diffusion.sampling import sample
from vcdm.diffusion.settings import DMD_REFINE_LEVEL, SamplerOptions
from vcdm.generate import results_dir
from vcdm.generate.files import read_tensors
from vcdm.nets import build_network
from vcdm.nets.edm2 import EDM2UNet
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import ARCHS, VECTOR_ARCHS, preset
from vcdm.train.build import make_network, tuned_sampler
from vcdm.train.options import TrainOptions

S = SD = 0.5
N = 16
T = 80.0


class GaussianConsistency(nn.Module):
    """f(x, t) = c_skip x + c_out tanh(theta asinh(t / sd)) c_in x (EDM's preconditioning, one parameter)."""
    sigma_min, sigma_max = 0.002, T

    def __init__(self, theta: float = 0.0):
        super().__init__()
        self.register_buffer("noise_scale", torch.ones(N))
        self.register_buffer("x0_mask", torch.zeros(N, dtype=torch.bool))
        self.theta = nn.Parameter(torch.tensor([theta]))

    def forward(self, x, sigma, y=None, augment_labels=None):
        t = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        w = torch.tanh(self.theta.to(x.dtype) * torch.asinh(t / SD))
        c_skip, c_out, c_in = SD ** 2 / (SD ** 2 + t ** 2), t * SD / (SD ** 2 + t ** 2).sqrt(), 1 / (SD ** 2 + t ** 2).sqrt()
        return c_skip * x + c_out * w * c_in * x


def sample_variance(model: nn.Module, steps: int, n: int = 20000, **options) -> float:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(n, N, generator=g, dtype=torch.float64)
    with torch.no_grad():
        x = sample(model, latents, sampler="consistency", num_steps=steps,
                   randn_like=lambda z: torch.randn(z.shape, generator=g, dtype=z.dtype), **options)
    return x.var().item()


def expected_gradient(theta: float, stage: int, n: int = 200_000) -> float:
    model, loss = GaussianConsistency(theta), ECTLoss(total_nimg=8)
    loss.set_nimg(stage)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, N, generator=g) * S
    (loss(model, x, generator=g).sum() / n).backward()
    return model.theta.grad.item()


def test_r_of_t_follows_ects_mapping():
    t = torch.tensor([0.01, 1.0, 20.0])
    # stage 0, q 2: r/t = 1 - (1 + 8 sigmoid(-t)) / 2, negative (so r = 0, the denoising loss) for small t
    ratio = 1 - (1 + 8 * torch.sigmoid(-t)) / 2
    torch.testing.assert_close(ect_r(t, 0), (t * ratio).clamp(min=0))
    assert ect_r(t, 0)[0] == 0 and ect_r(t, 0)[2] == pytest.approx(10.0, rel=1e-6)
    torch.testing.assert_close(ect_r(t, 7), t * (1 - (1 + 8 * torch.sigmoid(-t)) / 256))
    loss = ECTLoss(total_nimg=800)
    for nimg, stage in ((0, 0), (99, 0), (100, 1), (799, 7), (5000, 7)):
        loss.set_nimg(nimg)
        assert loss.stage == stage


@pytest.mark.parametrize("pred_x0", [False, True])
def test_loss_where_r_is_zero_is_the_denoising_error_over_t(pred_x0):
    """Per sample ||D - x|| / t: where r = 0 the gap t - r is t, whether or not the network predicts x0
    directly (--pred_x0), and elements with noise scale 2 (twice the level) count half."""
    model, loss = GaussianConsistency(0.3), ECTLoss(total_nimg=1, P_mean=-4.0, P_std=0.1)  # stage 0, t ~ 0.02: r = 0
    model.x0_mask.fill_(pred_x0)
    model.noise_scale[N // 2:] = 2.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, N, generator=g) * S
    per_element = loss(model, x, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = loss.sample_sigma(64, x.device, g)
    n = torch.randn(x.shape, generator=g) * model.noise_scale
    error = (model(x + t * n, t.flatten()) - x).detach()
    norm = error.norm(dim=1, keepdim=True)
    torch.testing.assert_close(per_element, error ** 2 / (norm * t * model.noise_scale))
    torch.testing.assert_close(per_element[:, :N // 2].sum(1, keepdim=True) / (error[:, :N // 2] ** 2).sum(1, keepdim=True),
                               1 / (norm * t))


def test_exact_consistency_function_is_the_stationary_point_of_the_last_stage():
    """The loss's expected gradient in theta changes sign at the exact map (theta 1/2) in ECT's last stage,
    and pushes a diffusion denoiser (theta 0) towards it; stage 0 pulls theta 0.4 back down instead."""
    assert expected_gradient(0.0, 7) < -10
    assert expected_gradient(0.4, 7) < 0 < expected_gradient(0.6, 7)
    assert abs(expected_gradient(0.5, 7)) < 0.1 * abs(expected_gradient(0.4, 7) - expected_gradient(0.6, 7))
    assert expected_gradient(0.4, 0) > 0.3  # stage 0 is diffusion-like: its stationary point lies below 0.4


def large_gap_gradient(theta: float, teacher: nn.Module | None, n: int = 100_000) -> float:
    """The expected gradient in theta with r = t / 2 everywhere (q 2, k 0: a short tuning's large gap)."""
    model, loss = GaussianConsistency(theta), ECTLoss(total_nimg=8, q=2.0, k=0.0, stages=1, teacher=teacher)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, N, generator=g) * S
    (loss(model, x, generator=g).sum() / n).backward()
    return model.theta.grad.item()


def test_distillation_is_unbiased_where_consistency_training_is_not():
    """At r = t / 2, ECT's same-noise target x + r n pulls theta to ~0.34, short of the exact map (1/2);
    with the exact denoiser as teacher (ECD: a Heun step of its ODE) the stationary point lies at 0.5..0.55."""
    assert large_gap_gradient(0.4, None) > 0.1  # ECT: theta 0.4 is pushed down
    assert large_gap_gradient(0.3, None) < 0
    teacher = GaussianConsistency(0.0).requires_grad_(False)
    assert large_gap_gradient(0.45, teacher) < -1 and large_gap_gradient(0.5, teacher) < -1
    assert large_gap_gradient(0.6, teacher) > 1


def test_ode_solution_of_the_exact_denoiser_converges_to_the_consistency_map():
    """EDM's Heun sampler from each sample's own level lands on f(x, t) = x s / sqrt(s^2 + t^2) with second-order
    error: 200 steps within 0.05% at t from 0.01 to 80 (EDM's 18 steps: 5.5% from t = 80, 0.04% from 0.3)."""
    t = torch.tensor([[80.0], [5.0], [0.3], [0.01]], dtype=torch.float64)
    x = torch.randn(4, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * (S ** 2 + t ** 2).sqrt()
    exact = x * S / (S ** 2 + t ** 2).sqrt()
    denoiser = GaussianConsistency(0.0).double()
    error = {n: (ode_solution(denoiser, x, t, n, 0.002, None, None) / exact - 1).abs().amax(1) for n in (18, 50, 200)}
    error = {n: e.detach() for n, e in error.items()}
    assert float(error[200].max()) < 5e-4 and float(error[18].max()) < 0.06
    assert bool((error[18][:3] > 6 * error[50][:3]).all())  # (50 / 18)^2 = 7.7


def kd_loss(teacher_steps: int = 64) -> DistillLoss:
    return DistillLoss(teacher=GaussianConsistency(0.0).requires_grad_(False), teacher_steps=teacher_steps)


def kd_gradient(theta: float, teacher_steps: int = 64, n: int = 50_000) -> float:
    model, loss = GaussianConsistency(theta), kd_loss(teacher_steps)
    g = torch.Generator().manual_seed(0)
    (loss(model, torch.randn(n, N, generator=g) * S, generator=g).sum() / n).backward()
    return model.theta.grad.item()


def test_ode_distillation_is_stationary_at_the_exact_map(one_thread):
    """--method kd: with the exact denoiser as teacher (64 Heun steps) the regression's gradient in theta vanishes
    at the consistency map (1/2) and pushes the diffusion denoiser (0) up. The student learns the teacher's
    sampler, error included: with EDM's 18 steps (5.5% too wide from t = 80) it lies above 0.5."""
    assert kd_gradient(0.0) < -1 and kd_gradient(0.45) < 0 < kd_gradient(0.55)
    assert abs(kd_gradient(0.5)) < 0.02 * abs(kd_gradient(0.45) - kd_gradient(0.55))
    assert kd_gradient(0.5, teacher_steps=18) < 0


def test_ode_distillation_turns_the_denoiser_into_a_one_and_two_step_sampler(one_thread):
    """60 Adam steps of kd (lr decaying linearly) from the diffusion denoiser reach theta 1/2 within 2% and the data
    variance within 2% at one and two steps of the consistency sampler; half the samples train at t = 80."""
    torch.manual_seed(0)
    model, loss = GaussianConsistency(0.0), kd_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-2, betas=(0.9, 0.99))
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / 60)
    g = torch.Generator().manual_seed(2)
    for _ in range(60):
        optimizer.zero_grad()
        (loss(model, torch.randn(512, N, generator=g) * S, generator=g).sum() / 512).backward()
        optimizer.step()
        decay.step()
    assert model.theta.item() == pytest.approx(0.5, rel=0.02)
    for steps in (1, 2):
        assert sample_variance(model, steps) == pytest.approx(S ** 2, rel=0.02)
    with pytest.raises(RuntimeError, match="needs its teacher"):
        DistillLoss(teacher_steps=2)(model, torch.zeros(2, N))


def test_ode_distillation_makes_its_tensors_on_the_data_device():
    """The meta device stands in for CUDA: a level or noise tensor made on the default device (the CPU) would
    not combine with the batch."""
    with torch.device("meta"):
        model, teacher = GaussianConsistency(0.3), GaussianConsistency(0.0)
    loss = DistillLoss(teacher=teacher, teacher_steps=3)(model, torch.zeros(4, N, device="meta"))
    assert loss.device.type == "meta" and loss.shape == (4, N)


def test_ode_distillation_trains_half_the_samples_at_the_top_level_and_the_rest_within_the_range():
    starts = []

    class Recorder(GaussianConsistency):
        def forward(self, x, sigma, y=None, augment_labels=None):
            if not starts:
                starts.append(torch.as_tensor(sigma).flatten())
            return super().forward(x, sigma, y, augment_labels)

    loss = DistillLoss(teacher=Recorder(0.0), teacher_steps=2)
    loss(GaussianConsistency(0.0), torch.zeros(10_000, N), generator=torch.Generator().manual_seed(0))
    t = starts[0]
    assert float((t == T).float().mean()) == pytest.approx(0.5, abs=0.015)  # and ln t ~ N(-1.1, 2^2) > ln 80: 0.3%
    assert float(t.min()) == pytest.approx(0.002) and float(t.max()) == T


class GaussianDenoiser(nn.Module):
    """D(x, t) = x v / (v + t^2), the exact denoiser of N(0, v I); v learnable (DMD's fake denoiser learns the
    variance of the sampler's outputs). The parameter sits in ``net``, as a Denoiser's do."""
    sigma_min, sigma_max = 0.002, T

    def __init__(self, variance: float):
        super().__init__()
        self.register_buffer("noise_scale", torch.ones(N))
        self.register_buffer("x0_mask", torch.zeros(N, dtype=torch.bool))
        self.net = nn.Module()
        self.net.log_v = nn.Parameter(torch.tensor([variance]).log())

    def forward(self, x, sigma, y=None, augment_labels=None):
        v = self.net.log_v.exp().to(x.dtype)
        return x * v / (v + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2)


def distribution_matched(teacher: nn.Module, *, steps: int, data_sd: float, gan_weight: float = 0.0,
                         sampler_steps: int = 2, guidance: float = 1.0, guide: nn.Module | None = None,
                         levels: tuple[float, ...] | None = None, model: nn.Module | None = None):
    """(the ``sampler_steps``-step sampler, its DMDLoss) after ``steps`` DMD steps from the diffusion denoiser (theta 0)
    against the frozen ``teacher`` (guided by ``guide`` at ``guidance``), given real data N(0, data_sd^2 I) (which only
    the GAN term reads)."""
    torch.manual_seed(0)
    loss = DMDLoss(EDMLoss(P_mean=-1.1, P_std=2.0), steps=sampler_steps, fake_updates=5, fake_lr=1e-2,
                   gan_weight=gan_weight, gan_lr=1e-2, teacher=teacher.requires_grad_(False), guidance=guidance,
                   guide=guide, levels=levels)
    loss.make_fake()
    model = GaussianConsistency(0.0) if model is None else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        (loss(model, torch.randn(256, N, generator=g) * data_sd, generator=g).sum() / 256).backward()
        opt.step()
    return model, loss


def test_distribution_matching_turns_the_denoiser_into_a_two_step_sampler_of_the_data(one_thread):
    """DMD from the diffusion denoiser (theta 0: its two-step samples have variance 0.05, the data 0.25): the
    teacher is the exact denoiser of the data, the fake denoiser learns the sampler's variance; both the sampler's
    two-step samples and the fake denoiser's variance reach the data's, and theta the exact map (1/2)."""
    assert sample_variance(GaussianConsistency(0.0), 2) < 0.06
    model, loss = distribution_matched(GaussianDenoiser(S ** 2), steps=300, data_sd=S)
    assert sample_variance(model, 2) == pytest.approx(S ** 2, rel=0.03)
    assert loss.fake.net.log_v.exp().item() == pytest.approx(S ** 2, rel=0.05)
    assert model.theta.item() == pytest.approx(0.5, abs=0.03)
    assert torch.equal(loss.teacher.net.log_v, torch.tensor([S ** 2]).log())  # the teacher stays frozen


class LevelsSeen(GaussianConsistency):
    """The one-parameter sampler, recording the noise levels it is evaluated at; ``x0``: flagged as a network that
    predicts x0 (as the prior is), which DMD's default levels look at."""
    sigma_data = SD

    def __init__(self, x0: bool = False):
        super().__init__(0.0)
        self.x0_mask.fill_(x0)
        self.seen: set[float] = set()

    def forward(self, x, sigma, y=None, augment_labels=None):
        self.seen.update(torch.as_tensor(sigma).flatten().tolist())
        return super().forward(x, sigma, y, augment_labels)


def test_distribution_matching_at_given_levels_trains_the_sampler_there(one_thread):
    """--sampler-levels 80,0.15: DMD evaluates the sampler at exactly those levels (its second step on its own first
    step's output re-noised to 0.15), and the two-step sampler at them reaches the data's variance (0.25) from the
    denoiser's (0.019 there). Without levels: Karras's (80, 0.80), or for a network that predicts x0 its top level and
    DMD_REFINE_LEVEL sigma_data."""
    levels = (T, 0.15)
    assert sample_variance(GaussianConsistency(0.0), 2, levels=levels) == pytest.approx(0.019, abs=0.002)
    model, _ = distribution_matched(GaussianDenoiser(S ** 2), steps=300, data_sd=S, levels=levels, model=LevelsSeen())
    assert sorted(model.seen) == pytest.approx([0.15, T])
    assert sample_variance(model, 2, levels=levels) == pytest.approx(S ** 2, rel=0.03)
    model, _ = distribution_matched(GaussianDenoiser(S ** 2), steps=3, data_sd=S, model=LevelsSeen())
    assert sorted(model.seen) == pytest.approx([0.80, T], abs=0.01)
    model, _ = distribution_matched(GaussianDenoiser(S ** 2), steps=3, data_sd=S, model=LevelsSeen(x0=True))
    assert sorted(model.seen) == pytest.approx([DMD_REFINE_LEVEL * SD, T])
    with pytest.raises(ValueError, match="levels: 3 noise levels for 2 steps"):
        DMDLoss(EDMLoss(), steps=2, fake_updates=1, fake_lr=1e-3, levels=(T, 1.0, 0.15))


def guided_fixed_point(v: float, v_guide: float, w: float, n: int = 50_000) -> float:
    """The variance V of a one-step Gaussian sampler at which DMD's mean update vanishes, given a perfect fake denoiser
    (the exact one of N(0, V I)) and the teacher of N(0, v I) guided away from that of N(0, v_guide I) at ``w``:
    E[(V / (V + t^2) - a(t)) x_t . x / mean |x - a(t) x_t|] = 0, a(t) = w v / (v + t^2) + (1 - w) v_g / (v_g + t^2),
    x ~ N(0, V I), x_t = x + t n over DMD's levels t. Monte Carlo with common random numbers, then bisection in log V."""
    g = torch.Generator().manual_seed(0)
    u = DMD_LEVELS[0] + torch.rand(n, 1, generator=g, dtype=torch.float64) * (DMD_LEVELS[1] - DMD_LEVELS[0])
    t = DMDLoss.dmd_level(u, GaussianDenoiser(v))
    z, noise = (torch.randn(n, N, generator=g, dtype=torch.float64) for _ in range(2))
    a = w * v / (v + t ** 2) + (1 - w) * v_guide / (v_guide + t ** 2)

    def mean_update(V: float) -> float:
        x = z * V ** 0.5
        x_t = x + t * noise
        return ((V / (V + t ** 2) - a) * x_t * x / (x - a * x_t).abs().mean(1, keepdim=True)).sum(1).mean().item()

    lo, hi = 1e-3, 5.0
    for _ in range(40):
        lo, hi = (lo, (lo * hi) ** 0.5) if mean_update((lo * hi) ** 0.5) > 0 else ((lo * hi) ** 0.5, hi)
    return (lo * hi) ** 0.5


def test_distribution_matching_of_a_guided_teacher_reaches_the_guided_models_fixed_point(one_thread):
    """Autoguidance in DMD (--guidance, --guide): the teacher is the exact denoiser of N(0, 0.25 I), the guide that of
    N(0, 0.36 I), w 1.5. The guided denoiser is no Gaussian's, so the one-step sampler settles where DMD's mean update
    vanishes (``guided_fixed_point``: 0.21), narrower than the teacher's 0.25, which it reaches unguided (w 1)."""
    expected = guided_fixed_point(S ** 2, 0.36, 1.5)
    assert expected == pytest.approx(0.21, abs=0.01)
    model, loss = distribution_matched(GaussianDenoiser(S ** 2), steps=600, data_sd=S, sampler_steps=1, guidance=1.5,
                                       guide=GaussianDenoiser(0.36).requires_grad_(False))
    assert sample_variance(model, 1) == pytest.approx(expected, rel=0.02)
    assert loss.fake.net.log_v.exp().item() == pytest.approx(expected, rel=0.05)  # the fake learnt the sampler's V
    assert guided_fixed_point(S ** 2, 0.36, 1.0) == pytest.approx(S ** 2, rel=0.01)  # w 1: the teacher's own


def test_distribution_matching_without_a_guide_guides_its_teacher_by_the_null_condition():
    """--guidance W without --guide: classifier-free, D(x; y=0) + W (D(x; y) - D(x; y=0)), for a teacher whose output
    moves with its conditioning by the sum of y."""

    class Conditional(nn.Module):
        def forward(self, x, sigma, y=None, augment_labels=None):
            return 0.5 * x + y.sum(dim=1, keepdim=True)

    x, y = torch.randn(4, N), torch.randn(4, 3)
    real = DMDLoss(EDMLoss(), steps=1, fake_updates=1, fake_lr=1e-3, teacher=Conditional(), guidance=3.0).real
    torch.testing.assert_close(real(x, torch.ones(4), y, None), 0.5 * x + 3 * y.sum(dim=1, keepdim=True))


class Energy(nn.Module):
    """(B, 2) features: the mean square of the coordinates (what tells two centred Gaussians apart) and a constant."""

    def forward(self, x):
        return torch.stack([x.pow(2).mean(dim=1), torch.ones(len(x))], dim=1)


class GaussianWithBottleneck(GaussianDenoiser):
    """The exact Gaussian denoiser whose network has a middle block (``dec``'s ``in1``) for the discriminator to read:
    the energy of its input scaled to unit variance under the denoiser's own data variance."""
    structure = types.SimpleNamespace(latent_dim=N)

    def __init__(self, variance: float):
        super().__init__(variance)
        self.net.dec = nn.ModuleDict({"1x1_in1": Energy()})

    def forward(self, x, sigma, y=None, augment_labels=None):
        t = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
        self.net.dec["1x1_in1"](x / (self.net.log_v.exp() + t ** 2).sqrt())
        return super().forward(x, sigma, y, augment_labels)


@pytest.mark.parametrize("gan_weight, data_sd", [(0.1, 0.6), (0.1, S)])
def test_distribution_matching_with_a_gan_term_follows_the_real_data_past_the_teacher(one_thread, gan_weight, data_sd):
    """The teacher is the exact denoiser of N(0, 0.25 I); the real data has sd ``data_sd``. DMD alone brings the
    two-step sampler to the teacher's variance (test above); with DMD2's GAN term (a discriminator on the fake
    denoiser's bottleneck, given the real data) it reaches the real data's: 0.36, where the teacher is wrong, and
    0.25 where it is right."""
    model, loss = distribution_matched(GaussianWithBottleneck(S ** 2), steps=500, data_sd=data_sd, gan_weight=gan_weight)
    assert sample_variance(model, 2) == pytest.approx(data_sd ** 2, rel=0.04)
    assert loss.critic.head is not None and set(loss.state_dict()) == {"fake", "fake_opt", "discriminator"}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_network_has_a_bottleneck_for_the_gan_discriminator(arch):
    """DMD2's discriminator reads the fake denoiser's middle block (U-Nets: (B, C, H, W) at the lowest resolution)
    or output token (priors: (B, C)) and gives one logit per sample; under ``frozen`` its gradient reaches the
    sampler's output only."""
    prior = arch in VECTOR_ARCHS
    structure = Structure.from_flags({"image": (3, 8, 8), "embedding": (8,), "label": (10,)},
                                     *(("0,1,0", "0,0,0") if prior else ("1,1,1", "0,1,1")))
    sizes = ({"prior_dim": 32, "prior_depth": 1} if prior else
             {"cbase": 64, "cres": [1, 1]} if "adm" in arch else {"cbase": 16, "cres": [1, 2]})
    torch.manual_seed(0)
    critic = Critic(Denoiser(build_network(*make_network(TrainOptions(arch=arch, **sizes), structure, 0)), structure),
                    gan=True)
    x = torch.randn(3, structure.latent_dim, requires_grad=True)
    y = torch.randn(3, structure.observed_dim) if structure.observed_dim else None
    with frozen(critic):
        features = critic.features(x, torch.ones(3), y, None)
        logit = critic.logits(x, torch.ones(3), y, None)
    assert features.shape[:1] == (3,) and (features.ndim == 2 if prior else features.shape[2:] == (4, 4))
    assert logit.shape == (3, 1) and torch.isfinite(logit).all()
    logit.sum().backward()
    assert float(x.grad.abs().sum()) > 0 and all(p.grad is None for p in critic.parameters())
    assert all(p.requires_grad for p in critic.parameters())


def test_consistency_sampler_on_the_exact_map_reaches_the_data_distribution():
    """1, 2 and 4 steps of the exact consistency function give variance s^2 (Monte-Carlo sd 0.25%)."""
    for steps in (1, 2, 4):
        assert sample_variance(GaussianConsistency(0.5), steps) == pytest.approx(S ** 2, rel=0.01)
    with pytest.raises(ValueError, match="consistency sampler takes 1..4 steps, got 5"):
        sample_variance(GaussianConsistency(0.5), 5, n=4)


@pytest.mark.parametrize("options, levels", [({"num_steps": 2}, [80.0, 0.80048]),
                                             ({"num_steps": 4}, [80.0, 9.1336, 0.80048, 0.050036]),
                                             ({"num_steps": 2, "rho": 7.0}, [80.0, 0.80048]),  # 7 means "the default"
                                             ({"num_steps": 2, "rho": 3.0}, [80.0, 10.903])])
def test_consistency_levels_renoise_near_ects_two_step_level(options, levels):
    """The consistency sampler evaluates at Karras's levels with rho 20 unless another rho than EDM's 7 is given:
    two steps re-noise at 0.80 (ECT's 0.821), not rho 7's 2.52."""
    seen = []

    class Recorder(GaussianConsistency):
        def forward(self, x, sigma, y=None, augment_labels=None):
            seen.append(float(torch.as_tensor(sigma).flatten()[0]))
            return super().forward(x, sigma, y, augment_labels)

    sample(Recorder(0.5), torch.randn(2, N, dtype=torch.float64), sampler="consistency", **options)
    assert seen == pytest.approx(levels, rel=1e-4)


@pytest.mark.parametrize("levels", [(80.0, 0.15), (80.0, 2.0, 0.15), (10.0,)])
def test_consistency_sampler_at_given_levels_matches_the_gaussian_answer(levels):
    """Given levels, the sampler evaluates once at each, in order, re-noising to the next: for the linear model
    f(x, t) = a(t) x (a partly tuned one, theta 0.25) the variance is v_1 = (t_1 a(t_1))^2, then
    v_(k+1) = (v_k + t_(k+1)^2) a(t_(k+1))^2 (Monte-Carlo sd 0.25%)."""
    model = GaussianConsistency(0.25)
    a = lambda t: float(model(torch.ones(1, N, dtype=torch.float64), t)[0, 0].detach())  # noqa: E731
    variance = (levels[0] * a(levels[0])) ** 2
    for t in levels[1:]:
        variance = (variance + t ** 2) * a(t) ** 2
    assert sample_variance(model, len(levels), levels=levels) == pytest.approx(variance, rel=0.01)


def tuned_gaussian(*, steps: int, q: float, stages: int, batch: int = 1024) -> GaussianConsistency:
    """The exact Gaussian model, started at the diffusion denoiser, tuned by ECTLoss with Adam."""
    torch.manual_seed(0)
    model = GaussianConsistency(0.0)
    loss = ECTLoss(total_nimg=steps * batch, q=q, stages=stages)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(2)
    for step in range(steps):
        loss.set_nimg(step * batch)
        x = torch.randn(batch, N, generator=g) * S
        optimizer.zero_grad()
        (loss(model, x, generator=g).sum() / batch).backward()
        optimizer.step()
    return model


def test_ect_tuning_turns_the_denoiser_into_a_one_step_sampler(one_thread):
    """One step of the diffusion denoiser from x_T = T n gives variance s^4 T^2 / (s^2 + T^2)^2 (~1e-5); after
    ECT tuning from it, one step gives s^2 within 2%: the last stage's stationary point lies within 0.45..0.5
    (test above), and theta 0.45 already gives 0.99 s^2 (one step's variance is (T a(T))^2, a(T) = f / x)."""
    untuned = GaussianConsistency(0.0)
    assert sample_variance(untuned, 1) == pytest.approx(S ** 4 * T ** 2 / (S ** 2 + T ** 2) ** 2, rel=0.01)
    model = tuned_gaussian(steps=600, q=16.0, stages=2)  # ECT's last-stage gap after 2 stages, not 8
    assert 0.43 < model.theta.item() < 0.55
    assert sample_variance(model, 1) == pytest.approx(S ** 2, rel=0.02)


def test_the_short_run_recipe_reaches_the_data_distribution_in_200_steps(one_thread):
    """ECT's short-run r(t): one stage at its smallest gap (q 256). With ECT's 1/(t - r) weighting, 200
    steps from the diffusion denoiser reach theta 0.486 and s^2 within 1% (one step) and 3% (two steps);
    EDM's lambda(t) in its place stops at theta 0.41 (one step: 0.974 s^2)."""
    model = tuned_gaussian(steps=200, q=256.0, stages=1)
    assert 0.47 < model.theta.item() < 0.52
    assert sample_variance(model, 1) == pytest.approx(S ** 2, rel=0.015)
    assert sample_variance(model, 2) == pytest.approx(S ** 2, rel=0.03)


def test_checkpoint_sampler_entry_is_checked(tmp_path):
    path = write_model(tmp_path / "prior.safetensors", "prior")
    denoiser, config, tensors = load_checkpoint(path)
    assert config.sampler is None
    for bad in ({"name": "edm", "num_steps": 2}, {"name": "consistency", "num_steps": 9},
                {"name": "consistency", "num_steps": 2.0}, {"name": "consistency", "num_steps": 2, "x": 1}, [1],
                {"name": "consistency", "num_steps": 2, "levels": [80.0]},
                {"name": "consistency", "num_steps": 2, "levels": [0.15, 80.0]},
                {"name": "consistency", "num_steps": 2, "levels": [80.0, -1.0]},
                {"name": "consistency", "num_steps": 2, "levels": [80.0, "0.15"]}):
        with pytest.raises(CheckpointError, match="config entry 'sampler'"):
            save_checkpoint(tmp_path / "bad.safetensors", {"net": denoiser.net.state_dict()},
                            CheckpointConfig.from_dict({**config.to_dict(), "sampler": bad}))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny prior trained for 8 steps and tuned for 8 (CPU, seconds)."""
    root = tmp_path_factory.mktemp("tune")
    data = write_dataset(root / "tiny.zip")
    run(base_args(data, root / "train", *PRIOR, "--duration", "0.000032"))
    base = sorted(run_dir(root / "train").glob("network-snapshot-*.safetensors"))[-1]
    result = CliRunner().invoke(tune_cmd, [str(base), "--kimg", "0.032", "--tick", "0.016", "--outdir", str(root / "tune"),
                                           "--workers", "0", "--device", "cpu", "--seed", "1"])
    assert result.exit_code == 0, result.output
    snap = sorted(run_dir(root / "tune").glob("network-snapshot-*.safetensors"))[-1]
    return {"root": root, "data": data, "base": base, "tuned": snap, "output": result.output}


@pytest.mark.slow
def test_tune_records_the_sampler_and_starts_from_the_checkpoint(tuned):
    assert "Initialised all" in tuned["output"] and "ln(sigma) ~ N(-1.1, 2^2)" in tuned["output"]
    config = read_checkpoint_config(tuned["tuned"])
    assert config.sampler == {"name": "consistency", "num_steps": 2}
    assert config.training["tune"] == "ect" and config.training["init"] == str(tuned["base"])
    assert read_checkpoint_config(tuned["base"]).sampler is None
    base, _, _ = load_checkpoint(tuned["base"])
    new, _, _ = load_checkpoint(tuned["tuned"])
    moved = [k for k, v in new.net.state_dict().items() if not torch.equal(v, base.net.state_dict()[k])]
    assert moved  # tuned, from the base weights (same names and shapes)


@pytest.mark.slow
def test_generate_and_api_use_the_recorded_sampler(tuned, tmp_path):
    args = ["--network", tuned["tuned"], "--seeds", "0-5", "--batch", "4", "--no-progress"]
    r = CliRunner().invoke(generate_cmd, [*map(str, args), "--outdir", str(tmp_path / "default")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(generate_cmd, [*map(str, args), "--outdir", str(tmp_path / "two"), "--sampler",
                                          "consistency", "--steps", "2"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(generate_cmd, [*map(str, args), "--outdir", str(tmp_path / "one"), "--steps", "1"])
    assert r.exit_code == 0, r.output
    default, two, one = ([read_tensors(tmp_path / d / f"{s:06d}.pt")["embedding"] for s in range(6)]
                         for d in ("default", "two", "one"))
    assert all(torch.equal(a, b) for a, b in zip(default, two))
    assert not any(torch.equal(a, b) for a, b in zip(default, one))
    api = vcdm.Pipeline.from_checkpoint(tuned["tuned"], device="cpu")(seeds=range(6), batch=4)
    assert all(torch.equal(torch.from_numpy(api.embeddings[i]), default[i]) for i in range(6))  # reload: same samples
    r = CliRunner().invoke(generate_cmd, [*map(str, args), "--outdir", str(tmp_path / "five"), "--steps", "5"])
    assert r.exit_code == 2 and error_lines(r.output) == [
        "Error: --steps: the consistency sampler takes 1..4 steps, got 5"], r.output
    with pytest.raises(ValueError, match="steps: the consistency sampler takes 1..4 steps, got 5"):
        vcdm.Pipeline.from_checkpoint(tuned["tuned"], device="cpu")(seeds=range(2), steps=5)


@pytest.mark.slow
def test_dmd_records_the_levels_it_trained(tuned):
    """DMD's sampler records its steps, and its levels where they are not Karras's: those given, or a network that
    predicts x0 at 2 steps, its top level and DMD_REFINE_LEVEL x sigma_data; other tunings record their steps alone."""
    denoiser, _, _ = load_checkpoint(tuned["tuned"])
    x0 = copy.deepcopy(denoiser)
    x0.x0_mask.fill_(True)
    dmd = {"tune": "dmd", "dmd_steps": 2}
    assert tuned_sampler(dmd, x0) == {"name": "consistency", "num_steps": 2,
                                      "levels": [80.0, DMD_REFINE_LEVEL * denoiser.sigma_data]}
    assert tuned_sampler(dmd, denoiser) == {"name": "consistency", "num_steps": 2}
    assert tuned_sampler({**dmd, "dmd_steps": 1}, x0) == {"name": "consistency", "num_steps": 1}
    assert tuned_sampler({**dmd, "dmd_levels": [80.0, 1.0]}, x0) == {  # --sampler-levels
        "name": "consistency", "num_steps": 2, "levels": [80.0, 1.0]}
    assert tuned_sampler({"tune": "kd"}, x0) == {"name": "consistency", "num_steps": 2}
    assert tuned_sampler({"tune": None}, denoiser) is None


@pytest.mark.slow
def test_recorded_levels_are_the_default_and_steps_drop_them(tuned, tmp_path):
    """A checkpoint that records levels samples at them (as --levels given explicitly; the manifest and the results
    folder name them); --steps N samples Karras's N levels instead, and --levels with other steps is refused."""
    denoiser, config, tensors = load_checkpoint(tuned["tuned"])
    config.sampler = {"name": "consistency", "num_steps": 2, "levels": [80.0, 0.15]}
    save_checkpoint(tmp_path / "refined.safetensors", {"net": denoiser.net.state_dict(), **tensors}, config)
    args = ["--network", str(tmp_path / "refined.safetensors"), "--seeds", "0-3", "--no-progress"]
    for name, extra in (("default", []), ("levels", ["--levels", "80,0.15"]), ("karras", ["--steps", "2"]),
                        ("one", ["--steps", "1"])):
        r = CliRunner().invoke(generate_cmd, [*args, "--outdir", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
    default, levels, karras, one = ([read_tensors(tmp_path / d / f"{s:06d}.pt")["embedding"] for s in range(4)]
                                    for d in ("default", "levels", "karras", "one"))
    assert all(torch.equal(a, b) for a, b in zip(default, levels))
    assert not any(torch.equal(a, b) for a, b in zip(default, karras))
    manifest = lambda d: json.loads((tmp_path / d / "vcdm-manifest.json").read_text())["settings"]  # noqa: E731
    assert (manifest("default")["--levels"], manifest("default")["--steps"]) == ([80.0, 0.15], 2)
    assert "--levels" not in manifest("karras") and "--levels" not in manifest("one")
    api = vcdm.Pipeline.from_checkpoint(tmp_path / "refined.safetensors", device="cpu")(seeds=range(4))
    assert all(torch.equal(torch.from_numpy(api.embeddings[i]), default[i]) for i in range(4))
    r = CliRunner().invoke(generate_cmd, [*args, "--outdir", str(tmp_path / "bad"), "--levels", "80,0.15",
                                          "--steps", "3"])
    assert r.exit_code == 2 and error_lines(r.output) == [
        "Error: --levels: 2 noise levels for 3 --steps; give one level per step (or leave the steps out)"], r.output
    name = results_dir(tmp_path / "refined.safetensors", SamplerOptions(sampler="consistency", levels=(80, 0.15)),
                       range(4)).parent.name
    assert "levels-80.0,0.15" in name and "levels" not in results_dir(
        tmp_path / "refined.safetensors", SamplerOptions(sampler="consistency"), range(4)).parent.name


@pytest.mark.slow
def test_untuned_models_keep_their_defaults(tuned, tmp_path):
    """An untuned checkpoint samples as before: the default equals EDM's sampler spelled out in flags."""
    args = ["--network", str(tuned["base"]), "--seeds", "0-3", "--no-progress"]
    for name, extra in (("default", []), ("explicit", ["--sampler", "edm", "--steps", "18", "--S_churn", "0"])):
        r = CliRunner().invoke(generate_cmd, [*args, "--outdir", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
    for s in range(4):
        assert torch.equal(read_tensors(tmp_path / "default" / f"{s:06d}.pt")["embedding"],
                           read_tensors(tmp_path / "explicit" / f"{s:06d}.pt")["embedding"])


@pytest.mark.slow
def test_two_stage_sample_uses_each_stages_recorded_sampler(tuned, tmp_path):
    """`vcdm sample` with a tuned prior: the prior runs the consistency sampler, 2 steps; the untuned image
    model keeps the release's 40 steps with churn (the folders' manifests record the settings)."""
    image = write_model(tmp_path / "image.safetensors", "image")
    denoiser, config, tensors = load_checkpoint(image)
    config.embedder = read_checkpoint_config(tuned["tuned"]).embedder
    save_checkpoint(image, {"net": denoiser.net.state_dict(), **tensors}, config)
    r = CliRunner().invoke(sample_cmd, ["--prior", str(tuned["tuned"]), "--image-model", str(image), "--seeds", "0-1",
                                        "--no-progress", "--outdir", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    prior, images = (json.loads((tmp_path / "out" / d / "vcdm-manifest.json").read_text())["settings"]
                     for d in ("embeddings", "images"))
    assert (prior["--sampler"], prior["--steps"], prior["--S_churn"]) == ("consistency", 2, 0.0)
    assert (images["--sampler"], images["--steps"], images["--S_churn"]) == (None, 40, 50.0)


@pytest.mark.slow
@pytest.mark.determinism
@pytest.mark.parametrize("method", ["ecd", "kd", "dmd", "dmd-gan"])
def test_distillation_tuning_resumes_bit_identically_with_its_teacher(tuned, tmp_path, method):
    """--method ecd/kd load the checkpoint as their teacher, also on resume: a run stopped after one step and
    resumed ends with the straight run's weights (a teacher taken from the resumed weights would not). dmd (the
    default for a tuned checkpoint) loads the diffusion model it was tuned from, and resumes its fake denoiser
    and that one's optimiser from the state; with a GAN term, its discriminator too."""
    dmd = {"dmd": ["--sampler-levels", "80,0.5"], "dmd-gan": ["--sampler-steps", "1", "--gan-weight", "3e-3"]}
    recorded = {"dmd": {"num_steps": 2, "levels": [80.0, 0.5]}, "dmd-gan": {"num_steps": 1}}.get(method, {"num_steps": 2})
    checkpoint, flags = ((tuned["tuned"], dmd[method]) if method in dmd else
                         (tuned["base"], ["--method", method, *(["--teacher-steps", "3"] if method == "kd" else [])]))
    gan, method = method.endswith("-gan"), method.removesuffix("-gan")
    args = [str(checkpoint), *flags, "--kimg", "0.016", "--tick", "0.004", "--snap", "0", "--dump", "0",
            "--workers", "0", "--device", "cpu", "--seed", "1"]
    invoke = lambda *extra: CliRunner().invoke(tune_cmd, [*args, *extra])  # noqa: E731
    straight = invoke("--outdir", str(tmp_path / "straight"))
    assert straight.exit_code == 0 and "Teacher: loaded all" in straight.output, straight.output
    assert run_dir(tmp_path / "straight").name.endswith(f"-{method}")  # the run directory names the method
    snapshot = read_checkpoint_config(sorted(run_dir(tmp_path / "straight").glob("network-*"))[-1])
    assert snapshot.training["tune"] == method
    assert snapshot.sampler == {"name": "consistency", **recorded}  # dmd: the steps (and levels) it trained
    stopped = invoke("--outdir", str(tmp_path / "stopped"), "--time-limit", "0.001")
    assert stopped.exit_code == 0 and "Stopped by --time-limit" in stopped.output, stopped.output
    resumed = invoke("--outdir", str(tmp_path / "stopped"), "--resume", "auto")
    assert resumed.exit_code == 0 and "Resuming from" in resumed.output and "Teacher: loaded" in resumed.output
    assert_same_weights(last_state(run_dir(tmp_path / "straight")), last_state(run_dir(tmp_path / "stopped")))
    if method == "dmd":
        assert "Teacher: loaded all" in straight.output and str(tuned["base"]) in straight.output
        fake = [last_state(run_dir(tmp_path / d))["loss"]["fake"] for d in ("straight", "stopped")]
        teacher, _, _ = load_checkpoint(tuned["base"])
        assert fake[0].keys() == teacher.net.state_dict().keys()
        assert all(torch.equal(fake[0][k], fake[1][k]) for k in fake[0])
        assert not all(torch.equal(fake[0][k], v) for k, v in teacher.net.state_dict().items())  # it trained
        heads = [last_state(run_dir(tmp_path / d))["loss"].get("discriminator") for d in ("straight", "stopped")]
        assert (heads[0] is not None) == gan
        if gan:
            assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
            wrong = invoke("--outdir", str(tmp_path / "stopped"), "--resume", "auto", "--gan-weight", "0",
                           "--kimg", "0.032")
            resumed_state = sorted(run_dir(tmp_path / "stopped").glob("training-state-*.pt"))[-1]
            assert wrong.exit_code != 0 and error_lines(wrong.output) == [
                f"Error: --resume: {resumed_state} does not fit these options (its fake denoiser was trained with a "
                f"GAN term: resume with --gan-weight > 0)"], wrong.output


@pytest.mark.slow
def test_distribution_matching_guides_its_teacher_by_a_weaker_checkpoint(tuned, tmp_path):
    """--guidance W --guide G: DMD's real denoiser is D_g + W (D - D_g). Guided by the teacher itself it is the
    teacher's, and the run's weights equal the unguided run's bit for bit; guided by the base run's first snapshot
    (untrained) they differ. The snapshot records both flags; a guide of other tensors, a guide without a scale, and
    classifier-free guidance of an unconditional model are refused in one line."""
    first = sorted(run_dir(tuned["root"] / "train").glob("network-snapshot-*.safetensors"))[0]
    assert first != tuned["base"]
    args = [str(tuned["tuned"]), "--kimg", "0.008", "--tick", "0.004", "--snap", "0", "--dump", "0", "--workers", "0",
            "--device", "cpu", "--seed", "1", "--fake-updates", "2"]
    states = {}
    for name, extra in (("plain", []), ("self", ["--guidance", "2", "--guide", str(tuned["base"])]),
                        ("early", ["--guidance", "2", "--guide", str(first)])):
        r = CliRunner().invoke(tune_cmd, [*args, *extra, "--outdir", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        states[name] = last_state(run_dir(tmp_path / name))
    assert f"guided at 2 by {first}" in r.output
    assert_same_weights(states["plain"], states["self"])
    assert not all(torch.equal(v, states["early"]["net"][k]) for k, v in states["plain"]["net"].items())
    training = read_checkpoint_config(sorted(run_dir(tmp_path / "early").glob("network-*"))[-1]).training
    assert (training["guidance"], training["guide"]) == (2.0, str(first))
    image = write_model(tmp_path / "image.safetensors", "image")
    r = CliRunner().invoke(tune_cmd, [*args, "--guidance", "2", "--guide", str(image), "--outdir", str(tmp_path / "x")])
    assert r.exit_code != 0 and error_lines(r.output) == [
        f"Error: --guide {image} generates {{'image': (3, 8, 8)}}, but {tuned['base']} generates "
        f"{{'embedding': ({EMB},)}}"], r.output
    r = CliRunner().invoke(tune_cmd, [*args, "--guide", str(first), "--outdir", str(tmp_path / "y")])
    assert r.exit_code != 0 and error_lines(r.output) == [
        f"Error: --guide {first}: a guide needs --guidance other than 1 (at 1 it is not used)"], r.output
    r = CliRunner().invoke(tune_cmd, [*args, "--guidance", "2", "--outdir", str(tmp_path / "z")])  # the prior: no y
    assert r.exit_code != 0 and error_lines(r.output) == [
        "Error: --guidance 2: without --guide the teacher is guided by its null condition, but this model is "
        "unconditional; give --guide"], r.output


@pytest.mark.slow
def test_ode_distillation_under_torchrun_takes_the_single_process_step(tuned, tmp_path):
    """kd under DDP: two processes of 2 samples each take the step that one process takes over two accumulation
    rounds of 2 (rank r draws what round r draws), so the first Adam moments (the gradient) agree."""
    script = tmp_path / "vcdm_cli.py"
    script.write_text("from vcdm.cli.main import cli\ncli()\n")
    args = [str(tuned["base"]), "--method", "kd", "--teacher-steps", "3", "--kimg", "0.004", "--batch", "4",
            "--batch-gpu", "2", "--tick", "0.004", "--snap", "0", "--dump", "0", "--workers", "0", "--device", "cpu",
            "--seed", "1"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), "tune", *args, "--outdir", str(tmp_path / "ddp")],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "2 processes x 1 rounds x 2" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = CliRunner().invoke(tune_cmd, [*args, "--outdir", str(tmp_path / "one")])
    assert one.exit_code == 0 and "1 processes x 2 rounds x 2" in one.output, one.output
    moments = lambda d: [v["exp_avg"] for v in last_state(run_dir(d))["optimizer"]["state"].values()]  # noqa: E731
    single = moments(tmp_path / "one")
    scale = max(float(m.abs().max()) for m in single)
    assert scale > 0
    for a, b in zip(moments(tmp_path / "ddp"), single, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.slow
def test_distribution_matching_runs_under_torchrun_with_its_fake_denoiser_in_ddp(tuned, tmp_path):
    """dmd with its GAN term under DDP (two processes): the fake denoiser and its discriminator are wrapped too (their
    steps are collectives); the run ends, and its state holds them trained, which a resumed single process takes up."""
    script = tmp_path / "vcdm_cli.py"
    script.write_text("from vcdm.cli.main import cli\ncli()\n")
    args = [str(tuned["tuned"]), "--kimg", "0.008", "--batch", "4", "--tick", "0.004", "--snap", "0", "--dump", "0",
            "--workers", "0", "--device", "cpu", "--seed", "1", "--fake-updates", "2", "--gan-weight", "3e-3"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), "tune", *args, "--outdir", str(tmp_path / "ddp")],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "2 processes x 1 rounds x 2" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = last_state(run_dir(tmp_path / "ddp"))
    teacher, _, _ = load_checkpoint(tuned["base"])
    assert any(not torch.equal(state["loss"]["fake"][k], v) for k, v in teacher.net.state_dict().items())
    assert state["loss"]["fake_opt"]["state"]  # Adam's moments of the fake denoiser
    assert state["loss"]["discriminator"].keys() == {"mix.weight", "mix.bias", "out.weight", "out.bias"}
    more = CliRunner().invoke(tune_cmd, [*args[:1], *args[3:], "--kimg", "0.012", "--outdir", str(tmp_path / "ddp"),
                                         "--resume", "auto"])
    assert more.exit_code == 0 and "Resuming from" in more.output, more.output


@pytest.mark.slow
def test_tuning_an_edm2_network_under_torchrun_leaves_its_uncertainty_head_out(tmp_path):
    """EDM2's uncertainty head serves only its diffusion loss: a tuning run freezes it, so DDP does not wait for its
    gradient (before, the second step of `vcdm tune` under torchrun failed: "Expected to have finished reduction")."""
    data = write_dataset(tmp_path / "tiny.zip")
    run(base_args(data, tmp_path / "train", "--exist", "1,1", "--observed", "0,1", "--arch", "edm2-img64-xs",
                  "--cbase", "32", "--cres", "1,2", "--recipe", "edm2", "--augment", "0", "--duration", "0.000008",
                  "--sample", "0"))
    base = sorted(run_dir(tmp_path / "train").glob("network-snapshot-*.safetensors"))[-1]
    script = tmp_path / "vcdm_cli.py"
    script.write_text("from vcdm.cli.main import cli\ncli()\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), "tune", str(base), "--kimg", "0.012", "--batch", "4", "--tick", "0.004",
                           "--snap", "0", "--dump", "0", "--workers", "0", "--device", "cpu", "--seed", "1",
                           "--outdir", str(tmp_path / "ddp")],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = last_state(run_dir(tmp_path / "ddp"))
    assert state["frozen"] and all(n.startswith("logvar_") for n in state["frozen"])
    trained, _, _ = load_checkpoint(base)
    assert all(torch.equal(state["net"][n], trained.net.state_dict()[n]) for n in state["frozen"])


@pytest.mark.parametrize("edm2", [False, True])
def test_both_passes_share_dropout_on_edm_and_edm2_networks(edm2):
    """With r = t (q huge) the target is the online pass itself: the loss vanishes only if both passes draw the
    same dropout masks (dropout 0.5 here) and EDM2's forced weight normalisation keeps the weights. The
    gradient reaches every parameter but EDM2's uncertainty head (ECT does not use it)."""
    structure = Structure.from_flags({"image": (3, 8, 8)}, "1", "0")
    if edm2:
        net = EDM2UNet(img_resolution=8, img_channels=3, model_channels=8, channel_mult=[1], num_blocks=1,
                       attn_resolutions=[], dropout=0.5)
    else:
        _, kwargs = preset("ddpmpp", resolution=8, channels=3, embed_dim=0, label_dim=0, augment_dim=0, cbase=8,
                           cres=[1], dropout=0.5)
        net = build_network("SongUNet", {**kwargs, "num_blocks": 1, "attn_resolutions": []})
    torch.manual_seed(0)
    denoiser = Denoiser(net.train(), structure, logvar_channels=8 if edm2 else 0)
    with torch.no_grad():  # a trained network: the zero-initialised layers after dropout no longer vanish
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(4, structure.latent_dim, generator=torch.Generator().manual_seed(0)) * 0.5
    same = ECTLoss(total_nimg=1, q=1e12)(denoiser, x, generator=torch.Generator().manual_seed(1))
    t = ECTLoss(total_nimg=1).sample_sigma(4, x.device, torch.Generator().manual_seed(1))
    difference = same.detach().sum(1, keepdim=True) * ect_gap(t, 0, q=1e12)  # per sample ||f_t - f_r||
    assert float(difference.sum()) < 1e-6 * x.numel()
    loss = ECTLoss(total_nimg=1, P_mean=0.0, P_std=0.5)(denoiser, x, generator=torch.Generator().manual_seed(1))
    loss.sum().backward()
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert float(loss.detach().sum()) > 1e-3 and all("logvar" in n for n in unused), unused  # EDM2's head: unused


@pytest.mark.slow
def test_tune_defaults_to_half_the_training_and_refuses_untrained_checkpoints(tuned, tmp_path):
    r = CliRunner().invoke(tune_cmd, [str(tuned["base"]), "--dry-run", "--workers", "0", "--device", "cpu",
                                      "--outdir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    options = json.loads(r.output[r.output.index("{"):r.output.index("\n}") + 2])
    assert options["duration"] == pytest.approx(32 / 2 / 1e6) and options["tune"] == "ect"  # trained 32 images
    training = read_checkpoint_config(tuned["base"]).training  # no ramp-up: its last learning rate is its lr
    assert training["lr_rampup"] == 0 and options["lr"] == pytest.approx(training["lr"] / 4)
    assert (options["lr_rampup"], options["P_mean"], options["P_std"]) == (0.0, -1.1, 2.0)
    assert (options["ect_q"], options["ect_stages"]) == (2.0, 2)  # EDM's preconditioning: two stages of ECT's q
    assert not (tmp_path / "runs").exists()
    denoiser, config, tensors = load_checkpoint(tuned["base"])  # the same network recorded as predicting x0
    config.training = {**config.training, "pred_x0": [1]}
    save_checkpoint(tmp_path / "x0.safetensors", {"net": denoiser.net.state_dict(), **tensors}, config)
    for extra, method, stages in (([], "kd", 2), (["--ect-stages", "4", "--method", "ect"], "ect", 4)):
        r = CliRunner().invoke(tune_cmd, [str(tmp_path / "x0.safetensors"), "--dry-run", "--workers", "0", *extra,
                                          "--outdir", str(tmp_path / "runs")])
        assert r.exit_code == 0, r.output
        options = json.loads(r.output[r.output.index("{"):r.output.index("\n}") + 2])
        assert (options["tune"], options["ect_stages"]) == (method, stages)  # x0-predicting networks: ODE distilled
        assert options["teacher_steps"] == 18
    for extra, message in ((["--ect-q", "4"], "--ect-q does not apply to --method kd"),
                           (["--method", "ect", "--teacher-steps", "8"], "--teacher-steps does not apply to --method ect")):
        r = CliRunner().invoke(tune_cmd, [str(tmp_path / "x0.safetensors"), "--dry-run", *extra])
        assert r.exit_code == 2 and error_lines(r.output) == [f"Error: {message}"], r.output
    r = CliRunner().invoke(tune_cmd, [str(tuned["tuned"]), "--dry-run", "--workers", "0", "--outdir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    options = json.loads(r.output[r.output.index("{"):r.output.index("\n}") + 2])  # a tuned checkpoint: refined by DMD
    assert (options["tune"], options["init"], options["teacher"]) == ("dmd", str(tuned["tuned"]), str(tuned["base"]))
    assert options["duration"] == pytest.approx(2 * 32 / 1e6) and options["lr"] == pytest.approx(training["lr"] / 200)
    assert (options["dmd_steps"], options["fake_updates"], options["fake_lr"]) == (2, 5, options["lr"])  # fake: --lr
    assert (options["gan_weight"], options["gan_lr"]) == (0.0, training["lr"])  # a new head: the teacher's training lr
    for args, message in (([str(tuned["base"]), "--fake-updates", "2"], "--fake-updates does not apply to --method ect"),
                          ([str(tuned["base"]), "--gan-weight", "0.1"], "--gan-weight does not apply to --method ect"),
                          ([str(tuned["base"]), "--method", "ect", "--teacher", str(tuned["base"])],
                           "--teacher does not apply to --method ect"),
                          ([str(tuned["tuned"]), "--teacher", str(tmp_path / "gone.safetensors")],
                           f"--teacher: {tmp_path / 'gone.safetensors'} does not exist")):
        r = CliRunner().invoke(tune_cmd, [*args, "--dry-run"])
        assert r.exit_code == 2 and error_lines(r.output) == [f"Error: {message}" + (
            " (expected a vcdm .safetensors snapshot)" if "gone" in message else "")], r.output
    denoiser, config, tensors = load_checkpoint(tuned["tuned"])  # a tuned network that predicts x0: one step
    config.training = {**config.training, "pred_x0": [1]}
    save_checkpoint(tmp_path / "x0-tuned.safetensors", {"net": denoiser.net.state_dict(), **tensors}, config)
    r = CliRunner().invoke(tune_cmd, [str(tmp_path / "x0-tuned.safetensors"), "--dry-run", "--workers", "0",
                                      "--outdir", str(tmp_path / "runs")])
    assert r.exit_code == 0 and '"dmd_steps": 2,' in r.output and '"gan_weight": 0.3,' in r.output, r.output
    r = CliRunner().invoke(tune_cmd, [str(tmp_path / "x0-tuned.safetensors"), "--dry-run", "--workers", "0",
                                      "--outdir", str(tmp_path / "runs"), "--sampler-levels", "80,0.15"])
    options = json.loads(r.output[r.output.index("{"):r.output.index("\n}") + 2])  # the levels set the steps
    assert (options["dmd_steps"], options["dmd_levels"]) == (2, [80.0, 0.15]) and "at levels 80,0.15" in r.output
    for extra, message in ((["--sampler-levels", "80,1,0.15", "--sampler-steps", "2"],
                            "--sampler-levels: 3 noise levels for 2 --sampler-steps; give one level per step (or leave "
                            "the steps out)"),
                           (["--sampler-levels", "0.15,80"], "--sampler-levels: expected 1..4 finite positive noise "
                            "levels, falling (e.g. 80,0.15), got 0.15,80.0"),
                           (["--sampler-levels", "80,x"], "Invalid value for '--sampler-levels' / '--sampler_levels': "
                            "expected noise levels SIGMA,... separated by commas (e.g. 80,0.15), got '80,x'"),
                           (["--method", "kd", "--sampler-levels", "80"], "--sampler-levels does not apply to --method kd")):
        r = CliRunner().invoke(tune_cmd, [str(tmp_path / "x0-tuned.safetensors"), "--dry-run", "--workers", "0", *extra])
        assert r.exit_code == 2 and error_lines(r.output) == [f"Error: {message}"], r.output
    denoiser, config, tensors = load_checkpoint(tuned["tuned"])  # tuned from a model that is not here (moved)
    config.training = {**config.training, "init": str(tmp_path / "moved.safetensors")}
    save_checkpoint(tmp_path / "orphan.safetensors", {"net": denoiser.net.state_dict(), **tensors}, config)
    r = CliRunner().invoke(tune_cmd, [str(tmp_path / "orphan.safetensors"), "--dry-run"])
    assert r.exit_code == 2 and error_lines(r.output) == [
        f"Error: --teacher: {tmp_path / 'orphan.safetensors'} was tuned from {tmp_path / 'moved.safetensors'}, which "
        f"does not exist (here); give that diffusion model's path with --teacher"], r.output
    r = CliRunner().invoke(tune_cmd, [str(tmp_path / "orphan.safetensors"), "--dry-run", "--teacher", str(tuned["base"]),
                                      "--workers", "0", "--outdir", str(tmp_path / "runs")])
    assert r.exit_code == 0 and '"teacher": "' + str(tuned["base"]) in r.output, r.output
    other = write_model(tmp_path / "image.safetensors", "image")  # a teacher that records no training, then one of
    r = CliRunner().invoke(tune_cmd, [str(tuned["tuned"]), "--teacher", str(other), "--dry-run"])  # another network
    assert r.exit_code == 2 and error_lines(r.output) == [f"Error: --teacher: {other} records no training options "
                                                          f"(an imported network?); tune a model trained by `vcdm train`"]
    denoiser, config, tensors = load_checkpoint(other)
    config.training = read_checkpoint_config(tuned["base"]).training
    save_checkpoint(other, {"net": denoiser.net.state_dict(), **tensors}, config)
    r = CliRunner().invoke(tune_cmd, [str(tuned["tuned"]), "--teacher", str(other), "--workers", "0", "--device", "cpu",
                                      "--outdir", str(tmp_path / "mismatch")])
    assert r.exit_code != 0 and len(error_lines(r.output)) == 1, r.output
    assert f"Error: --teacher: {other} is not this network" in r.output
    imported = write_model(tmp_path / "imported.safetensors", "prior")  # records no training options
    for args, message in (([str(imported)], "records no training options"),
                          ([str(tmp_path / "missing.safetensors")], "does not exist")):
        r = CliRunner().invoke(tune_cmd, [*args, "--outdir", str(tmp_path / "runs")])
        assert r.exit_code == 2 and len(error_lines(r.output)) == 1 and message in r.output, r.output
