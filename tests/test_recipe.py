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
from vcdm.data.structure import Structure
from vcdm.diffusion.loss import EDM2Loss, EDMLoss
from vcdm.nets.edm2 import EDM2UNet
from vcdm.train.build import make_denoiser, make_loss, make_optimizer
from vcdm.train.ema import EMA
from vcdm.train.lr_schedules import LRSchedule, edm, edm2
from vcdm.train.options import TrainOptions
from vcdm.train.recipe import describe, grad_inf, resolve
from vcdm.train.state import TrainState, load_state
from vcdm.train.step import StepSetup, reduce_loss, update

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


@pytest.mark.determinism
def test_edm2_loss_and_two_adam_steps_equal_edm2s_training_loop():
    """vcdm's EDM2 recipe (loss, reduction, schedule, gradient clean-up, Adam) against EDM2's own loop on the
    same small EDM2 network, weights, batch and noise: per-sample losses, gradient norms, and the change Adam
    makes to every parameter in two steps (the second depends on the betas). Rounding: float32 parameters
    of magnitude up to ~4 make a change exact to ~5e-7 at most, so single values get that tolerance."""
    s = REF["setup"]
    cfg = {k: v for k, v in s["net"].items() if k != "logvar_channels"}
    batch, sched = s["batch"], s["lr"]
    opts = resolve(TrainOptions(recipe="edm2", P_mean=s["P_mean"], P_std=s["P_std"], lr=sched["ref_lr"], batch=batch,
                                lr_rampup=sched["rampup_Mimg"] * 1000, lr_ref=sched["ref_batches"] * batch / 1000))
    assert opts.adam_betas == s["betas"]
    structure = Structure.from_flags({"image": (3, 8, 8), "embedding": (8,)}, "1,1", "0,1")
    net = EDM2UNet(**cfg)
    denoiser = make_denoiser(opts, net, structure).train()
    assert denoiser.config()["logvar_channels"] == s["net"]["logvar_channels"]
    tensors = net.state_dict()
    gen = torch.Generator().manual_seed(s["weight_seed"])
    with torch.no_grad():
        for name in sorted(tensors):
            tensors[name].copy_(torch.randn(tensors[name].shape, generator=gen))
    gen = torch.Generator().manual_seed(s["data_seed"])
    images, labels = torch.randn([batch, 3, 8, 8], generator=gen) * 0.5, torch.randn([batch, 8], generator=gen)
    state = TrainState(net, EMA(net, halflife_nimg=1e6), make_optimizer(net.parameters(), opts))
    step = StepSetup(denoiser, net, make_loss(opts), None, [3 * 8 * 8], 1, batch, batch, 0,
                     lr_schedule=LRSchedule.of(opts), grad_inf=grad_inf(opts))
    params = dict(net.named_parameters())
    assert set(params) == set(REF["steps"][0]["grad_norm"])
    nimg = s["nimg"]
    for seed, ref in zip(s["noise_seeds"], REF["steps"]):
        state.optimizer.zero_grad(set_to_none=True)
        loss = step.loss_fn(denoiser, images.reshape(batch, -1), labels, generator=torch.Generator().manual_seed(seed))
        reduce_loss(loss, step.sizes, step.per_rank, step.ls).backward()
        before = {n: p.detach().clone() for n, p in params.items()}  # after the forward's forced weight normalisation
        lr = step.lr_schedule(nimg)
        assert lr == ref["lr"]
        update(state, step, lr)
        nimg += batch
        torch.testing.assert_close(loss.double().sum(1), torch.tensor(ref["loss_per_sample"], dtype=torch.float64),
                                   rtol=1e-5, atol=0)
        for name, p in params.items():
            delta = (p.detach() - before[name]).double()
            assert p.grad.double().norm().item() == pytest.approx(ref["grad_norm"][name], rel=3e-5), name
            assert delta.norm().item() == pytest.approx(ref["delta_norm"][name], rel=1e-5), name
            assert delta.flatten()[:4].tolist() == pytest.approx(ref["delta_probe"][name], abs=1e-6), name


# ------------------------------------------------------------------------------------------------ resolution

def test_edm_recipe_resolves_to_the_release_settings():
    o = resolve(TrainOptions(path="d.zip", observed=[0, 1]))
    assert (o.precond, o.P_mean, o.P_std, o.lr, o.adam_betas, o.lr_schedule) == ("edm", -1.2, 1.2, 1e-3, [0.9, 0.999], "edm")
    assert grad_inf(o) == 1e5 and LRSchedule.of(o) == LRSchedule("edm", 1e-3, 10_000.0, 0.0) and o.ema_std is None
    assert isinstance(make_loss(o), EDMLoss) and not isinstance(make_loss(o), EDM2Loss)
    assert make_loss(o).P_mean == EDMLoss().P_mean and make_loss(o).P_std == EDMLoss().P_std
    assert resolve(o) == o


def test_edm2_recipe_on_any_network():
    o = resolve(TrainOptions(path="d.zip", observed=[0, 1], arch="ddpmpp", recipe="edm2", batch=256))
    assert (o.precond, o.adam_betas, o.lr_schedule, grad_inf(o)) == ("edm2", [0.9, 0.99], "edm2", 0.0)
    assert (o.lr, o.P_mean, o.P_std) == (1e-3, -1.2, 1.2)  # the network's and data's, not the recipe's
    assert o.lr_ref == 35000 * 256 / 1000  # EDM2's pixel presets' reference, in batches
    assert o.ema_std == [0.05, 0.1]  # EDM2's power-function EMA profiles
    loss = make_loss(o)
    assert isinstance(loss, EDM2Loss) and (loss.P_mean, loss.P_std) == (-1.2, 1.2)
    assert resolve(o) == o


@pytest.mark.parametrize("arch, lr, decay, P", [("edm2-img64-s", 0.010, 35000, (-0.8, 1.6)),
                                               ("edm2-img64-xl", 0.007, 35000, (-0.8, 1.6)),
                                               ("edm2-img512-xxs", 0.017, 70000, (-0.4, 1.0))])
def test_edm2_recipe_takes_the_edm2_presets_numbers(arch, lr, decay, P):
    o = resolve(TrainOptions(path="d.zip", observed=[0, 1], arch=arch, recipe="edm2", batch=2048))
    assert (o.lr, o.lr_ref, (o.P_mean, o.P_std), o.precond) == (lr, decay * 2048 / 1000, P, "edm2")
    assert LRSchedule.of(o)(1_000_000_000) == pytest.approx(lr / (1e9 / (decay * 2048)) ** 0.5)  # EDM2's schedule
    edm = resolve(TrainOptions(path="d.zip", observed=[0, 1], arch=arch))
    assert (edm.lr, edm.P_mean, edm.lr_schedule) == (1e-3, -1.2, "edm")  # the edm recipe stays EDM's
    assert f"EDM2 trains --arch {arch} with --recipe edm2" in describe(edm) and "EDM2 trains" not in describe(o)


def test_flags_given_win_over_the_recipe():
    o = resolve(TrainOptions(path="d.zip", observed=[0, 1], recipe="edm2", precond="edm", lr=2e-4, adam_betas=[0.5, 0.9],
                             P_mean=0.1, P_std=2.0, lr_schedule="edm", lr_ref=5.0, ema_std=[0.2]))
    assert (o.precond, o.lr, o.adam_betas, o.P_mean, o.P_std, o.lr_schedule, o.lr_ref, o.ema_std) == (
        "edm", 2e-4, [0.5, 0.9], 0.1, 2.0, "edm", 5.0, [0.2])
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
    step = StepSetup(None, net, None, None, [4], 1, 1, 1, 0, lr_schedule=LRSchedule.of(opts), grad_inf=grad_inf(opts))
    update(state, step, lr=1.0)
    assert net.weight.detach().neg().flatten().tolist() == expected  # SGD, lr 1: the step is minus the gradient


# ------------------------------------------------------------------------------------------------ flags

def test_dry_run_prints_the_resolved_recipe(data, tmp_path):
    r = run(base_args(data, tmp_path / "runs", *PRIOR, "--recipe", "edm2", "--lr", "2e-4", "--dry-run"))
    opts = json.loads(r.output[:r.output.index("\n}\n") + 2])
    assert (opts["recipe"], opts["precond"], opts["adam_betas"], opts["lr_schedule"], opts["lr"]) == (
        "edm2", "edm2", [0.9, 0.99], "edm2", 2e-4)
    assert opts["lr_ref"] == 35000 * 4 / 1000 and opts["ema_std"] == [0.05, 0.1]
    assert "EMA profiles std 0.05,0.1, non-finite gradients -> 0" in r.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra, flag", [(["--adam-betas", "0.9"], "--adam-betas"), (["--adam-betas", "a,b"], "--adam-betas"),
                                         (["--P_std", "0"], "--P_std"), (["--lr-schedule", "cosine"], "--lr-schedule"),
                                         (["--recipe", "edm3"], "--recipe"), (["--lr-ref", "-1"], "--lr-ref"),
                                         (["--P_mean", "nan"], "--P-mean")])
def test_bad_recipe_flags_give_one_line_errors(data, tmp_path, extra, flag):
    r = run(base_args(data, tmp_path / "runs", *PRIOR, *extra, "--dry-run"), code=2)
    (line,) = error_lines(r.output)
    assert flag in line


def test_edm2_recipe_trains_the_prior_and_a_resumed_run_keeps_it(data, tmp_path):
    out = tmp_path / "runs"
    r = run(base_args(data, out, *PRIOR, "--recipe", "edm2", "--lr", "2e-3", "--duration", "0.000008"))
    assert "recipe edm2: --precond edm2" in r.output
    d = run_dir(out)
    recorded = json.loads((d / "training_options.json").read_text())
    assert {k: recorded[k] for k in ("recipe", "precond", "adam_betas", "lr_schedule", "lr_ref", "lr", "P_mean")} == {
        "recipe": "edm2", "precond": "edm2", "adam_betas": [0.9, 0.99], "lr_schedule": "edm2", "lr_ref": 35000 * 4 / 1000,
        "lr": 2e-3, "P_mean": -1.2}
    assert sorted(p.name for p in d.glob("network-snapshot-*.safetensors")) == [  # two ticks of 4 images
        "network-snapshot-000000-0.050-4img.safetensors", "network-snapshot-000000-0.050.safetensors",
        "network-snapshot-000000-0.100-4img.safetensors", "network-snapshot-000000-0.100.safetensors"]
    denoiser, config, _ = load_checkpoint(d / "network-snapshot-000000-0.100.safetensors")
    assert denoiser.config()["logvar_channels"] == 128 and "logvar_linear.weight" in denoiser.net.state_dict()
    assert {k: config.training[k] for k in recorded} == recorded  # the checkpoint records the resolved recipe
    D, logvar = denoiser(torch.zeros(3, 8), torch.ones(3), return_logvar=True)
    assert D.shape == (3, 8) and logvar.shape == (3, 1)
    (first,) = [load_state(p) for p in d.glob("training-state-*.pt")]

    r = run(["--resume", str(d), "--duration", "0.000016", "--workers", "0", "--device", "cpu"])
    assert "Resuming from" in r.output and "recipe edm2: --precond edm2" in r.output and "betas 0.9,0.99" in r.output
    last = max((load_state(p) for p in d.glob("training-state-*.pt")), key=lambda s: s["counters"]["nimg"])
    assert last["counters"]["nimg"] == 16 and last["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    head = "logvar_linear.weight"
    assert not torch.equal(first["net"][head], last["net"][head])  # the head is trained with the network
    r = run(["--resume", str(d), "--recipe", "edm", "--duration", "0.000024"], code=2)
    (err,) = error_lines(r.output)
    assert "--recipe edm differs from the resumed run's edm2" in err


@pytest.mark.slow
def test_edm2_recipe_trains_an_edm2_image_model_with_its_presets_numbers(data, tmp_path):
    out = tmp_path / "runs"
    args = ["--exist", "1,1", "--observed", "0,1", "--arch", "edm2-img64-s", "--cbase", "16", "--cres", "1,1",
            "--augment", "0", "--recipe", "edm2", "--duration", "0.000008", "--sample", "0"]
    r = run(base_args(data, out, *args))
    assert "recipe edm2: --precond edm2, ln(sigma) ~ N(-0.8, 1.6^2), Adam betas 0.9,0.99, lr 0.01" in r.output
    recorded = json.loads((run_dir(out) / "training_options.json").read_text())
    assert (recorded["lr"], recorded["lr_ref"], recorded["P_std"]) == (0.01, 35000 * 4 / 1000, 1.6)
    denoiser = load_checkpoint(run_dir(out) / "network-snapshot-000000-0.050.safetensors")[0]
    assert type(denoiser.net).__name__ == "EDM2UNet" and denoiser.config()["logvar_channels"] == 128


def test_augmentation_defaults_to_none_for_edm2_networks_only():
    """EDM2's U-Nets have no augmentation input: --arch edm2-* without --augment trains unaugmented, every other
    network keeps EDM's 0.12, and a given --augment is kept (EDM2UNet then refuses it in one line)."""
    from vcdm.train.options import TrainOptions
    from vcdm.train.recipe import resolve

    assert resolve(TrainOptions(path="x.zip", arch="edm2-img64-xs")).augment == 0.0
    assert resolve(TrainOptions(path="x.zip", arch="edm2-img64-xs", recipe="edm2")).augment == 0.0
    assert resolve(TrainOptions(path="x.zip", arch="ddpmpp")).augment == 0.12
    assert resolve(TrainOptions(path="x.zip", arch="dalle2")).augment == 0.12
    assert resolve(TrainOptions(path="x.zip", arch="edm2-img64-xs", augment=0.2)).augment == 0.2
