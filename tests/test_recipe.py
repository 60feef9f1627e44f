"""Training recipes: the lr schedules against their formulas and EDM2's own numbers, EDM2's loss and two
Adam steps against EDM2's training loop (tests/data/edm2-train-step.json), how options resolve, how
non-finite gradients are replaced, and the flags end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tiny_runs import PRIOR, base_args, error_lines, run, run_dir
from vcdm.checkpoints import load_checkpoint
from vcdm.diffusion.loss import EDM2Loss, EDMLoss
from vcdm.train.build import make_loss, make_optimizer
from vcdm.train.ema import EMA
from vcdm.train.lr_schedules import LRSchedule, edm, edm2
from vcdm.train.options import TrainOptions
from vcdm.train.recipe import describe, grad_inf, lr_schedule, resolve
from vcdm.train.state import TrainState
from vcdm.train.step import StepSetup, update

pytestmark = pytest.mark.usefixtures("one_thread")
REF = json.loads((Path(__file__).parent / "data" / "edm2-train-step.json").read_text())


# ------------------------------------------------------------------------------------------------ lr schedules

@pytest.mark.parametrize("nimg", [0, 1, 2_500, 9_999, 10_000, 123_456_789])
@pytest.mark.parametrize("rampup", [0.0, 10.0, 1e-12, 10_000.0])
def test_edm_schedule_is_the_release_formula_bit_for_bit(nimg, rampup):
    old = 3e-4 * (1.0 if rampup <= 0 else min(nimg / max(rampup * 1000, 1e-8), 1.0))  # train/step.py's lr_at
    assert edm(nimg, 3e-4, rampup) == old and LRSchedule("edm", 3e-4, rampup)(nimg) == old


def test_schedules_known_answers():
    assert edm(0, 1e-3, 10) == 0 and edm(2_500, 1e-3, 10) == pytest.approx(2.5e-4) and edm(10**9, 1e-3, 10) == 1e-3
    assert edm(0, 1e-3, 0) == 1e-3  # no ramp-up
    assert edm2(1000, 1e-2, 0, ref_kimg=1) == 1e-2 and edm2(4000, 1e-2, 0, ref_kimg=1) == 5e-3  # 1/sqrt(4)
    assert edm2(100_000, 1e-2, 0, ref_kimg=1) == pytest.approx(1e-3)
    assert edm2(400_000, 1e-2, 0, ref_kimg=0) == 1e-2  # no decay
    assert edm2(500, 1e-2, 1, ref_kimg=1) == 5e-3  # ramp-up half way, before the reference


@pytest.mark.determinism
def test_edm2_schedule_equals_edm2s_learning_rate_schedule():
    for case in REF["lr_schedule"]:
        schedule = LRSchedule("edm2", case["ref_lr"], rampup_kimg=case["rampup_Mimg"] * 1000,
                              ref_kimg=case["ref_batches"] * case["batch_size"] / 1000)
        assert schedule(case["cur_nimg"]) == case["lr"], case


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="--lr-schedule"):
        LRSchedule("cosine", 1e-3)


# ------------------------------------------------------------------------------------------------ EDM2's loss

class ConstantDenoiser(nn.Module):
    """D = 0 and a fixed log-variance; per-element noise multipliers and pred_x0 as a vcdm Denoiser has."""

    def __init__(self, logvar: float, noise_mult=(1.0, 1.0, 2.0), pred_x0=(False, True, False)):
        super().__init__()
        self.register_buffer("noise_scale", torch.tensor(noise_mult))
        self.register_buffer("x0_mask", torch.tensor(pred_x0))
        self.logvar_channels, self.logvar = 1, logvar
        self.seen_y = None

    def forward(self, x, sigma, y=None, augment_labels=None, return_logvar=False):
        self.seen_y = y
        D = torch.zeros_like(x)
        return (D, torch.full([x.shape[0], 1], self.logvar)) if return_logvar else D


@pytest.mark.parametrize("logvar", [0.0, 1.5, -2.0])
def test_edm2_loss_is_edms_scaled_by_the_learned_uncertainty(logvar):
    """Same draws: EDM2's per-element loss = EDM's / exp(u) + u (EDM's weight, noise_mult and pred_x0 included)."""
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    edm_loss = EDMLoss(P_mean=-0.8, P_std=1.6)(ConstantDenoiser(logvar), x, y, generator=torch.Generator().manual_seed(7))
    edm2_loss = EDM2Loss(P_mean=-0.8, P_std=1.6)(ConstantDenoiser(logvar), x, y, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(edm2_loss, edm_loss / torch.exp(torch.tensor(logvar)) + logvar, rtol=1e-6, atol=0)
    assert torch.equal(edm_loss[:, 1], x[:, 1] ** 2)  # pred_x0: weight 1


def test_edm2_loss_drops_conditioning_as_edms():
    x, y = torch.randn(64, 3), torch.ones(64, 2)
    den = ConstantDenoiser(0.0)
    EDM2Loss(cond_drop=0.5)(den, x, y, generator=torch.Generator().manual_seed(3))
    dropped = den.seen_y
    EDMLoss(cond_drop=0.5)(den, x, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(dropped, den.seen_y) and 0 < (dropped[:, 0] == 0).sum() < 64


def test_edm2_loss_needs_the_uncertainty_head():
    den = ConstantDenoiser(0.0)
    den.logvar_channels = 0
    with pytest.raises(TypeError, match="logvar_channels"):
        EDM2Loss()(den, torch.randn(2, 3))


# ------------------------------------------------------------------------------------------------ resolution

def test_edm_recipe_resolves_to_the_release_settings():
    o = resolve(TrainOptions(path="d.zip", observed=[0, 1]))
    assert (o.precond, o.P_mean, o.P_std, o.lr, o.adam_betas, o.lr_schedule) == ("edm", -1.2, 1.2, 1e-3, [0.9, 0.999], "edm")
    assert grad_inf(o) == 1e5 and lr_schedule(o) == LRSchedule("edm", 1e-3, 10_000.0, 0.0)
    assert isinstance(make_loss(o), EDMLoss) and not isinstance(make_loss(o), EDM2Loss)
    assert make_loss(o).P_mean == EDMLoss().P_mean and make_loss(o).P_std == EDMLoss().P_std
    assert resolve(o) == o


def test_edm2_recipe_on_any_network():
    o = resolve(TrainOptions(path="d.zip", observed=[0, 1], arch="ddpmpp", recipe="edm2", batch=256))
    assert (o.precond, o.adam_betas, o.lr_schedule, grad_inf(o)) == ("edm2", [0.9, 0.99], "edm2", 0.0)
    assert (o.lr, o.P_mean, o.P_std) == (1e-3, -1.2, 1.2)  # the network's and data's, not the recipe's
    assert o.lr_ref == 35000 * 256 / 1000  # EDM2's pixel presets' reference, in batches
    loss = make_loss(o)
    assert isinstance(loss, EDM2Loss) and (loss.P_mean, loss.P_std) == (-1.2, 1.2)
    assert resolve(o) == o


@pytest.mark.parametrize("arch, lr, decay, P", [("edm2-img64-s", 0.010, 35000, (-0.8, 1.6)),
                                               ("edm2-img64-xl", 0.007, 35000, (-0.8, 1.6)),
                                               ("edm2-img512-xxs", 0.017, 70000, (-0.4, 1.0))])
def test_edm2_recipe_takes_the_edm2_presets_numbers(arch, lr, decay, P):
    o = resolve(TrainOptions(path="d.zip", observed=[0, 1], arch=arch, recipe="edm2", batch=2048))
    assert (o.lr, o.lr_ref, (o.P_mean, o.P_std), o.precond) == (lr, decay * 2048 / 1000, P, "edm2")
    assert lr_schedule(o)(1_000_000_000) == pytest.approx(lr / (1e9 / (decay * 2048)) ** 0.5)  # EDM2's schedule
    edm = resolve(TrainOptions(path="d.zip", observed=[0, 1], arch=arch))
    assert (edm.lr, edm.P_mean, edm.lr_schedule) == (1e-3, -1.2, "edm")  # the edm recipe stays EDM's
    assert f"EDM2 trains --arch {arch} with --recipe edm2" in describe(edm) and "EDM2 trains" not in describe(o)


def test_flags_given_win_over_the_recipe():
    o = resolve(TrainOptions(path="d.zip", observed=[0, 1], recipe="edm2", precond="edm", lr=2e-4, adam_betas=[0.5, 0.9],
                             P_mean=0.1, P_std=2.0, lr_schedule="edm", lr_ref=5.0))
    assert (o.precond, o.lr, o.adam_betas, o.P_mean, o.P_std, o.lr_schedule, o.lr_ref) == (
        "edm", 2e-4, [0.5, 0.9], 0.1, 2.0, "edm", 5.0)
    assert grad_inf(o) == 0.0  # the recipe's


def test_optimizer_has_the_recipes_betas():
    p = [nn.Parameter(torch.zeros(2))]
    for recipe, betas in (("edm", (0.9, 0.999)), ("edm2", (0.9, 0.99))):
        group = make_optimizer(p, resolve(TrainOptions(recipe=recipe))).param_groups[0]
        assert (group["betas"], group["eps"], group["lr"]) == (betas, 1e-8, 1e-3)


@pytest.mark.parametrize("bad", [dict(adam_betas=[0.9]), dict(adam_betas=[0.9, 1.0]), dict(P_std=0.0),
                                 dict(lr_ref=-1.0), dict(recipe="edm3"), dict(lr_schedule="cosine")])
def test_bad_recipe_options_name_their_flag(bad):
    flag = {"adam_betas": "--adam-betas", "P_std": "--P_std", "lr_ref": "--lr-ref", "recipe": "--recipe",
            "lr_schedule": "--lr-schedule"}[next(iter(bad))]
    with pytest.raises(ValueError, match=flag):
        TrainOptions(path="d.zip", observed=[0, 1], **bad).validate()


# ------------------------------------------------------------------------------------------------ gradients

@pytest.mark.parametrize("recipe, expected", [("edm", [0.0, 1e5, -1e5, 2.0]), ("edm2", [0.0, 0.0, 0.0, 2.0])])
def test_nonfinite_gradients_are_replaced_as_the_recipe_says(recipe, expected):
    net = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        net.weight.zero_()
    net.weight.grad = torch.tensor([[float("nan"), float("inf"), -float("inf"), 2.0]])
    state = TrainState(net, EMA(net, halflife_nimg=1), torch.optim.SGD(net.parameters(), lr=1.0))
    opts = resolve(TrainOptions(recipe=recipe))
    step = StepSetup(None, net, None, None, [4], 1, 1, 1, 0, lr_schedule=lr_schedule(opts), grad_inf=grad_inf(opts))
    update(state, step, lr=1.0)
    assert net.weight.detach().neg().flatten().tolist() == expected  # SGD, lr 1: the step is minus the gradient


# ------------------------------------------------------------------------------------------------ flags

def test_dry_run_prints_the_resolved_recipe(data, tmp_path):
    r = run(base_args(data, tmp_path / "runs", *PRIOR, "--recipe", "edm2", "--lr", "2e-4", "--dry-run"))
    opts = json.loads(r.output[:r.output.index("\n}\n") + 2])
    assert (opts["recipe"], opts["precond"], opts["adam_betas"], opts["lr_schedule"], opts["lr"]) == (
        "edm2", "edm2", [0.9, 0.99], "edm2", 2e-4)
    assert opts["lr_ref"] == 35000 * 4 / 1000 and "non-finite gradients -> 0" in r.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra, flag", [(["--adam-betas", "0.9"], "--adam-betas"), (["--adam-betas", "a,b"], "--adam-betas"),
                                         (["--P_std", "0"], "--P_std"), (["--lr-schedule", "cosine"], "--lr-schedule"),
                                         (["--recipe", "edm3"], "--recipe"), (["--lr-ref", "-1"], "--lr-ref")])
def test_bad_recipe_flags_give_one_line_errors(data, tmp_path, extra, flag):
    r = run(base_args(data, tmp_path / "runs", *PRIOR, *extra, "--dry-run"), code=2)
    (line,) = error_lines(r.output)
    assert flag in line
