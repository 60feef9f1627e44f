"""Post-hoc EMA: power-function profiles in training, EDM2's coefficients, reconstruction against profiles
tracked directly, bit-identical resume with profiles, `vcdm phema` and its one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from edm_fakes import edm2_pickle
from test_train_resume import _interrupt_after
from tiny_runs import PRIOR, TINY_UNET, assert_same_weights, base_args, error_lines, last_state, run, run_dir
from vcdm.checkpoints import load_checkpoint, read_checkpoint_config
from vcdm.data.structure import Structure
from vcdm.nets import build_network
from vcdm.nets.presets import preset
from vcdm.train.build import make_denoiser
from vcdm.cli.phema import command as phema_command
from vcdm.train.ema import PowerFunctionEMA
from vcdm.train.options import TrainOptions
from vcdm.train.phema import (Snapshot, gamma_to_std, power_beta, reconstruct, solve_coefficients,
                              std_to_gamma)
from vcdm.train.state import TrainState, load_state

EDM2 = json.loads((Path(__file__).parent / "data" / "edm2-phema.json").read_text())

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- parity with EDM2

@pytest.mark.determinism
def test_exponents_and_betas_equal_edm2s():
    for std, gamma in zip(EDM2["std_to_exp"]["std"], EDM2["std_to_exp"]["exp"]):
        assert std_to_gamma(std) == pytest.approx(gamma, rel=1e-12)
    for gamma, std in zip(EDM2["exp_to_std"]["exp"], EDM2["exp_to_std"]["std"]):
        assert gamma_to_std(gamma) == pytest.approx(std, rel=1e-12)
    for b in EDM2["beta"]:
        assert power_beta(std_to_gamma(b["std"]), b["t_next"], b["t_delta"]) == pytest.approx(b["beta"], rel=1e-12, abs=0)


@pytest.mark.determinism
@pytest.mark.parametrize("case", range(len(EDM2["cases"])))
def test_coefficients_equal_edm2s_solver(case):
    c = EDM2["cases"][case]
    x = solve_coefficients(c["in_nimg"], c["in_std"], c["out_nimg"], c["out_std"])
    np.testing.assert_allclose(x, np.array(c["coefficients"]), rtol=0, atol=1e-6)


# ------------------------------------------------------------------- the profiles and reconstruction

class Trajectory(torch.nn.Module):
    """A "network" whose weights at step s are (one-hot e_s, a random walk): an average's one-hot part is its
    response (the weight it gives each step), the walk a trained weight's typical drift and noise."""

    def __init__(self, steps: int, walk: torch.Tensor):
        super().__init__()
        self.steps, self.walk = steps, walk
        self.w = torch.nn.Parameter(torch.zeros(steps + walk.shape[1]))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def set_step(self, s: int) -> None:
        with torch.no_grad():
            self.w.zero_()
            self.w[s] = 1
            self.w[self.steps:] = self.walk[s]
            self.step.fill_(s)


def tracked(stds, steps=400, batch=8, every=40, seed=0):
    """Train a Trajectory for `steps` steps, tracking profiles `stds`; return the net, the EMA and the
    snapshots (every `every` steps, one per std) as reconstruction inputs."""
    g = torch.Generator().manual_seed(seed)
    walk = torch.cumsum(torch.randn(steps, 64, generator=g, dtype=torch.float64), 0).float() / steps ** 0.5
    walk += torch.linspace(0, 2, steps)[:, None]  # a drift, as weights have early in training
    net = Trajectory(steps, walk)
    ema = PowerFunctionEMA(net, stds)
    snaps = []
    for s in range(steps):
        net.set_step(s)
        ema.update(s * batch, batch)
        if (s + 1) % every == 0:
            for std, profile in zip(ema.stds, ema.emas):
                state = {k: v.clone() for k, v in profile.state_dict().items()}
                snaps.append(Snapshot(f"{s + 1}-{std}", (s + 1) * batch, std, lambda st=state: st.items()))
    return net, ema, snaps


@pytest.mark.determinism
def test_profile_weights_follow_the_power_function():
    """The discrete update gives each step of b images ending at t exactly the continuous profile's weight
    over that step: prod of later betas times (1 - beta) = (t**(gamma+1) - (t-b)**(gamma+1)) / T**(gamma+1)
    (EDM2's profile (gamma + 1) t**gamma / T**(gamma + 1) integrated); the first step replaces the initial copy."""
    steps, batch = 400, 8
    net, ema, _ = tracked([0.05, 0.1], steps=steps, batch=batch)
    t = (np.arange(steps) + 1.0) * batch
    for gamma, profile in zip(ema.gammas, ema.emas):
        got = profile.w.detach().double()[:steps].numpy()
        want = (t ** (gamma + 1) - (t - batch) ** (gamma + 1)) / t[-1] ** (gamma + 1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
        assert got.sum() == pytest.approx(1, abs=1e-5)
    assert int(ema.emas[0].step) == steps - 1  # buffers copied


@pytest.mark.determinism
def test_reconstruction_matches_profiles_tracked_directly():
    """Reconstruct lengths 0.07 and 0.15 from snapshots of 0.05 and 0.10 and compare with the same profiles
    tracked during the run. All is linear, so the error of every weight is sum_s dw(s) (p_s - c) over steps s,
    dw being the response error read off the one-hot part: it is at most |dw|_1 * max_s |p_s - c|, c the
    walk's mid-range. |dw|_1 itself must be a small fraction of how far the nearest input profile is."""
    steps = 400
    _, direct, _ = tracked([0.07, 0.15], steps=steps)
    net, inputs, snaps = tracked([0.05, 0.1], steps=steps)
    out = dict(reconstruct(snaps, [0.07, 0.15], 8 * steps, copied={"step"}))
    walk = net.walk
    for std, profile in zip(direct.stds, direct.emas):
        want, got = profile.w.detach(), out[std]["w"]
        dw = (got[:steps] - want[:steps]).double().abs().sum().item()
        nearest = min((p.w.detach()[:steps] - want[:steps]).double().abs().sum().item() for p in inputs.emas)
        assert dw < 0.1 * nearest, (std, dw, nearest)
        spread = (walk.max(0).values - walk.min(0).values) / 2
        assert torch.all((got[steps:] - want[steps:]).abs() <= dw * spread + 1e-5)
        assert got[:steps].sum().item() == pytest.approx(1, abs=1e-5)
        assert int(out[std]["step"]) == steps - 1
    one_pass_each = dict(reconstruct(snaps, [0.07, 0.15], 8 * steps, copied={"step"}, group=1))
    for std in out:
        assert torch.equal(one_pass_each[std]["w"], out[std]["w"])


def test_largest_img64_preset_trains_in_edm2s_memory():
    """--arch edm2-img64-xl --recipe edm2 --ema-std 0.05,0.1 on ImageNet-64's classes holds what EDM2's loop holds
    (network, gradients, Adam's moments, one copy per profile; numbers from EDM2's code on the meta device),
    and the training state written is those tensors less the gradients. Built on the meta device: no memory."""
    want = EDM2["memory_img64_xl"]
    structure = Structure.from_flags({"image": (3, 64, 64), "label": (1000,)}, "1,1", "0,1")
    cls, kwargs = preset("edm2-img64-xl", resolution=64, channels=3, embed_dim=0, label_dim=1000, augment_dim=0)
    with torch.device("meta"):
        net = build_network(cls, kwargs)
    net = make_denoiser(TrainOptions(precond="edm2"), net, structure).net.to("meta")
    with torch.device("meta"):
        ema = PowerFunctionEMA(net, [0.05, 0.1])
        optimizer = torch.optim.Adam(net.parameters(), foreach=False)
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    adam = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    got = {"parameters": sum(p.numel() for p in net.parameters()), "net": size(net.state_dict().values()),
           "grads": size(p.grad for p in net.parameters()), "adam": size(adam), "ema": size(ema.state_dict().values())}
    assert got == {k: want[k] for k in got}
    assert sum(got[k] for k in ("net", "grads", "adam", "ema")) == want["total"]
    state = TrainState(net, ema, optimizer).state_dict()
    saved = [*state["net"].values(), *state["ema"].values(),
             *(t for s in state["optimizer"]["state"].values() for k, t in s.items() if k != "step")]
    assert size(saved) == want["total"] - want["grads"]


def test_profiles_refuse_a_state_of_other_lengths():
    net = torch.nn.Linear(2, 2)
    state = PowerFunctionEMA(net, [0.05, 0.1]).state_dict()
    with pytest.raises(ValueError, match="profiles 0.050,0.100.*profiles 0.050,0.200"):
        PowerFunctionEMA(net, [0.05, 0.2]).load_state_dict(state)


# ------------------------------------------------------------------------------ training and the CLI

PROFILES = ["--ema-std", "0.05,0.07,0.1"]


@pytest.fixture(scope="module")
def profile_run(tmp_path_factory, data) -> Path:
    """A tiny prior trained for 3 kimg, snapshots of three profiles (0.07 to compare against) after the first
    step and every kimg."""
    out = tmp_path_factory.mktemp("phema-run")
    run(base_args(data, out, *PRIOR, "--duration", "0.003", "--tick", "1", "--snap", "1", "--dump", "0",
                  "--batch", "8", *PROFILES))
    return run_dir(out)


def phema(*args: str, code: int = 0):
    result = CliRunner().invoke(phema_command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def test_training_writes_a_snapshot_per_profile(profile_run):
    names = sorted(p.name for p in profile_run.glob("network-snapshot-*.safetensors"))
    assert names == [f"network-snapshot-{k:06d}-{s}.safetensors" for k in (0, 1, 2, 3) for s in ("0.050", "0.070", "0.100")]
    training = read_checkpoint_config(profile_run / "network-snapshot-000002-0.070.safetensors").training
    assert training["ema_profile"] == {"std": 0.07, "gamma": pytest.approx(std_to_gamma(0.07))}
    assert training["nimg"] == 2008 and training["batch"] == 8  # ticks after the first step
    assert training["ema_std"] == [0.05, 0.07, 0.1]
    path = profile_run / "network-snapshot-000002-0.070.safetensors"
    params = {"net." + name for name, _ in load_checkpoint(path)[0].net.named_parameters()}
    with safe_open(str(path), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {dtypes[k] for k in params} == {"F16"}  # parameters in float16, as EDM2 writes them; buffers as they are
    assert {d for k, d in dtypes.items() if k not in params} == {"F32"}


def test_phema_reconstructs_a_tracked_profile_and_samples(profile_run, tmp_path):
    """0.07 from the 0.05 and 0.10 snapshots, against 0.07 tracked directly. Four snapshot times of a short
    run fit the response less well than EDM2's dozens (the error is 0.22 of the distance to the nearest
    input here, 0.06 with snapshots at 0.5, 1.5, 2.5, 3 kimg; the nearest input itself is at 1)."""
    r = phema("--run", profile_run, "--std", "0.07", "--in-std", "0.05,0.1", "--outdir", tmp_path)
    assert "8 snapshots, kimg 0 to 3" in r.output
    got, config, _ = load_checkpoint(tmp_path / "phema-000003-0.070.safetensors")
    want = load_checkpoint(profile_run / "network-snapshot-000003-0.070.safetensors")[0]
    nearest = load_checkpoint(profile_run / "network-snapshot-000003-0.050.safetensors")[0]
    flat = lambda d: torch.cat([p.flatten() for p in d.net.parameters()])  # noqa: E731
    err, gap = (flat(got) - flat(want)).norm(), (flat(nearest) - flat(want)).norm()
    assert err < 0.35 * gap, (err, gap)
    assert config.training["posthoc_ema"]["std"] == 0.07 and config.training["nimg"] == 3000
    assert "ema_profile" not in config.training
    assert len(config.training["posthoc_ema"]["inputs"]) == 8
    from vcdm.cli.generate import command as generate
    out = tmp_path / "samples"
    result = CliRunner().invoke(generate, ["--network", str(tmp_path / "phema-000003-0.070.safetensors"),
                                           "--seeds", "0-1", "--steps", "4", "--outdir", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.rglob("*.pt")) == ["000000.pt", "000001.pt"]


def test_phema_at_an_earlier_snapshot_uses_only_earlier_inputs(profile_run, tmp_path):
    r = phema("--run", profile_run, "--std", "0.05,0.06,...,0.08", "--kimg", "2", "--outdir", tmp_path)
    assert "9 snapshots, kimg 0 to 2" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"phema-000002-0.0{k}0.safetensors" for k in (5, 6, 7, 8)]
    # A tracked length is reproduced from its own snapshot (coefficient 1, the others 0).
    got = load_checkpoint(tmp_path / "phema-000002-0.050.safetensors")[0].net.state_dict()
    want = load_checkpoint(profile_run / "network-snapshot-000002-0.050.safetensors")[0].net.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--std", "0.3"], "--std: 0.3 is not a length in (0, 0.289)"),
    (["--std", "0.1", "--kimg", "7"], "--kimg 7: no snapshot of that time; there are kimg 0, 1, 2, 3"),
    (["--std", "0.1,...,0.2"], "'...' needs two increasing numbers"),
    (["--std", "0.1,0.1002"], "--std: [0.1, 0.1002] are not distinct to three decimals"),
])
def test_phema_bad_flags_give_one_line_errors(profile_run, tmp_path, args, message):
    r = phema("--run", profile_run, *args, "--outdir", tmp_path, code=2)
    (err,) = error_lines(r.output)
    assert message in err, err


def test_phema_input_errors_are_one_line(profile_run, tmp_path, data):
    (err,) = error_lines(phema("--std", "0.1", "--outdir", tmp_path, code=2).output)
    assert "--run DIR" in err
    (err,) = error_lines(phema("--run", tmp_path, "--std", "0.1", "--outdir", tmp_path / "o", code=2).output)
    assert "no network-snapshot-<kimg>-<std>.safetensors" in err and "--ema-std" in err
    (err,) = error_lines(phema(tmp_path / "nowhere.safetensors", "--std", "0.1", "--outdir", tmp_path, code=2).output)
    assert "nowhere.safetensors: no such checkpoint file" in err
    damaged = tmp_path / "network-snapshot-000003-0.100.safetensors"
    damaged.write_bytes((profile_run / damaged.name).read_bytes()[:-100])
    (err,) = error_lines(phema(damaged, "--std", "0.1", "--outdir", tmp_path / "o", code=2).output)
    assert f"{damaged}: not a safetensors file" in err
    classic = tmp_path / "classic"
    run(base_args(data, classic, *PRIOR, "--duration", "0.000004"))
    snap = run_dir(classic) / "network-snapshot-000000.safetensors"
    (err,) = error_lines(phema(snap, "--std", "0.1", "--outdir", tmp_path, code=2).output)
    assert f"{snap}: not a power-function EMA snapshot" in err
    other = tmp_path / "other"
    run(base_args(data, other, *PRIOR[:-4], "--prior-dim", "16", *PRIOR[-4:], "--duration", "0.000004",
                  "--ema-std", "0.1"))
    mixed = [profile_run / "network-snapshot-000001-0.050.safetensors", *run_dir(other).glob("network-snapshot-*")]
    (err,) = error_lines(phema(*mixed, "--std", "0.1", "--outdir", tmp_path, code=2).output)
    assert "net_kwargs differs" in err


def test_phema_reads_edm2_raw_snapshots(fake_modules, marker, tmp_path):
    """EDM2's raw snapshots (<prefix>-<kimg>-<std>.pkl) through the restricted unpickler; EDM2's own
    reconstructions (phema-*.pkl) in the same folder are not inputs. The fake snapshots all hold the same
    weights, so any reconstruction (coefficients summing to 1) gives them back, to float16 rounding."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for kimg, std in ((4194, 0.05), (4194, 0.1), (8388, 0.05), (8388, 0.1)):
        state = edm2_pickle(raw / f"edm2-img16-t-{kimg:07d}-{std:.3f}.pkl", marker)
    edm2_pickle(raw / "phema-0008388-0.150.pkl", marker)
    r = phema("--run", raw, "--std", "0.07", "--outdir", tmp_path / "out")
    assert "4 snapshots, kimg 4194 to 8388" in r.output and not marker.exists()
    denoiser, config, _ = load_checkpoint(tmp_path / "out" / "phema-008388-0.070.safetensors")
    assert config.training["nimg"] == 8388608 and config.training["posthoc_ema"]["std"] == 0.07
    got = denoiser.net.state_dict()
    for k, v in state.items():
        torch.testing.assert_close(got[k], v.float(), rtol=0, atol=2e-3 * max(1.0, v.float().abs().max().item()))


def test_phema_refuses_to_overwrite(profile_run, tmp_path):
    phema("--run", profile_run, "--std", "0.1", "--outdir", tmp_path)
    path = tmp_path / "phema-000003-0.100.safetensors"
    before = path.read_bytes()
    (err,) = error_lines(phema("--run", profile_run, "--std", "0.1,0.2", "--outdir", tmp_path, code=2).output)
    assert f"{path} exists; pass --overwrite" in err and not (tmp_path / "phema-000003-0.200.safetensors").exists()
    assert path.read_bytes() == before
    phema("--run", profile_run, "--std", "0.1,0.2", "--outdir", tmp_path, "--overwrite")
    assert (tmp_path / "phema-000003-0.200.safetensors").is_file()


def test_train_refuses_bad_profile_lengths(data, tmp_path):
    for value, message in (("0.3", "--ema-std: expected relative standard deviations in (0, 0.289)"),
                           ("0.1,0.1001", "not distinct to three decimals")):
        r = run(base_args(data, tmp_path, *PRIOR, "--ema-std", value), code=2)
        (err,) = error_lines(r.output)
        assert message in err, err


@pytest.mark.determinism
def test_resume_with_profiles_is_bit_identical(data, tmp_path, monkeypatch):
    args = ["--exist", "1,1", "--observed", "0,1", *TINY_UNET, "--augment", "0.3", "--dropout", "0.2",
            "--duration", "0.000024", "--sample", "100", "--snap", "100", "--dump", "100", "--ema-std", "0.05,0.1"]
    straight = tmp_path / "straight"
    run(base_args(data, straight, *args))
    reference = last_state(run_dir(straight))
    assert sorted({k.split("/")[0] for k in reference["ema"]}) == ["0.050", "0.100"]

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        run(base_args(data, interrupted, *args))
    d = run_dir(interrupted)
    assert load_state(d / "training-state-000000.pt")["counters"]["nimg"] == 12
    r = run(["--resume", str(d), "--workers", "0", "--device", "cpu"])
    assert "Resuming from" in r.output
    assert_same_weights(reference, last_state(d))
    r = run(["--resume", str(d), "--ema-std", "0.05,0.2", "--duration", "0.000032", "--workers", "0",
             "--device", "cpu"], code=2)
    (err,) = error_lines(r.output)
    assert "does not fit" in err and "--ema-std" in err
