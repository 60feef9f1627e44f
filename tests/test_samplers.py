"""Samplers: outputs pinned to numbers saved before the sampler redesign (tests/data/samplers-golden.json),
and the convergence order of every sampler against the exact denoiser of a Gaussian.

The golden numbers were written by the samplers as they were before the one-contract redesign, on
a toy denoiser and a pseudo-noise source that use only +, -, *, / and fmod on float64, so that no
vectorised transcendental function (which may round differently per CPU) enters the inputs. The
schedules themselves use pow/exp/log/sqrt; those kernels may differ in the last bit between CPUs,
which is why the comparison allows a few ulps of float64 on a CPU other than the one that wrote them
and on this one demands exact equality wherever the computation was not reorganised (EXACT).

Regenerate (only when a change of outputs is intended): python tests/test_samplers.py --write
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from vcdm.checkpoints import load_tensors, read_checkpoint_config, save_checkpoint
from vcdm.cli.errors import user_errors
from vcdm.cli.generate import FLAGS as CLI_FLAGS, SAMPLER_FLAGS, pop_sampler_options, preset_option, sampler_flags
from vcdm.cli.generate import command as generate_cmd
from vcdm.diffusion import karras_sigmas, sample, samplers
from vcdm.diffusion.sampling import FUNCTIONS
from vcdm.diffusion.schedules import append_zero
from vcdm.diffusion.settings import PRESETS, RELEASE_DEFAULTS, SAMPLERS, TAKES, SamplerOptionError, SamplerOptions
from vcdm.generate.files import read_tensors
from vcdm.generate.options import FlagError
from vcdm.pipeline import ARGUMENTS as API_NAMES, pop_api_sampler_options

F64 = torch.float64
GOLDEN = Path(__file__).parent / "data" / "samplers-golden.json"
pytestmark = pytest.mark.usefixtures("one_thread")


class Toy:
    """A nonlinear denoiser-like function built from exact IEEE operations only."""

    def __init__(self, noise_scale=None, round_sigma=None, sigma_min=0.0, sigma_max=math.inf):
        self.noise_scale, self.sigma_min, self.sigma_max = noise_scale, sigma_min, sigma_max
        if round_sigma is not None:
            self.round_sigma = round_sigma

    def __call__(self, x, sigma, y=None):
        s2 = torch.as_tensor(sigma, dtype=F64) ** 2
        d = 0.25 + (x - 0.25) * (0.3 / (0.3 + s2)) + 0.1 * x / (1 + x.abs()) / (1 + s2)
        return d if y is None else d + 0.2 * y.sum(1, keepdim=True) / (1 + s2)


class PseudoNoise:
    """A deterministic stand-in for randn_like: zero-mean, unit-variance, arithmetic only."""

    def __init__(self):
        self.k = 0

    def __call__(self, x):
        self.k += 1
        i = torch.arange(1, x.numel() + 1, dtype=F64).reshape(x.shape)
        u = torch.remainder(i * 0.7548776662466927 + self.k * 0.5698402909980532, 1.0)
        return (u - 0.5) * 3.4641016151377544


def latents(b: int = 3, n: int = 5) -> torch.Tensor:
    return PseudoNoise()(torch.empty(b, n, dtype=F64)) * 1.0


def float32_round(sigma):
    return torch.as_tensor(sigma, dtype=F64).float().double()


ABLATION = [dict(sampler="ablation", solver=solver, discretization=disc, schedule=sched, scaling=scaling, num_steps=5)
            for solver in ("euler", "heun") for disc in ("vp", "ve", "iddpm", "edm")
            for sched in ("vp", "ve", "linear") for scaling in ("vp", "none")]
SCENARIOS: dict[str, tuple[dict, dict]] = {  # name: (Toy arguments, sample() options)
    "edm-default": ({}, {}),
    "edm-6-churn": ({}, dict(num_steps=6, S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.007)),
    "edm-release-40": ({}, dict(num_steps=40, S_churn=50.0, S_noise=1.007)),
    "euler-7": ({}, dict(num_steps=7, solver="euler", S_churn=10.0)),
    "edm-1-step": ({}, dict(num_steps=1)),
    "edm-range-rho": ({}, dict(num_steps=5, sigma_min=0.01, sigma_max=20.0, rho=5.0)),
    "edm-net-range": (dict(sigma_min=0.02, sigma_max=40.0), dict(num_steps=5)),
    "edm-noise-scale": (dict(noise_scale="half"), dict(num_steps=6, S_churn=30.0)),
    "edm-round-sigma": (dict(round_sigma=float32_round), dict(num_steps=6, S_churn=30.0)),
    "edm-guidance": ({}, dict(num_steps=5, guidance=2.0, y=True)),
    "dpm2m-10": ({}, dict(sampler="dpm2m", num_steps=10)),
    "dpm2m-1": ({}, dict(sampler="dpm2m", num_steps=1)),
    "dpm2m-noise-scale": (dict(noise_scale="half"), dict(sampler="dpm2m", num_steps=6)),
    "ablation-alpha-churn": ({}, dict(sampler="ablation", num_steps=6, alpha=0.5, S_churn=20.0)),
    "ablation-noise-scale": (dict(noise_scale="half"), dict(sampler="ablation", discretization="vp", schedule="vp",
                                                             scaling="vp", num_steps=5, S_churn=20.0)),
    "ablation-iddpm-range": (dict(sigma_min=0.01), dict(sampler="ablation", discretization="iddpm", num_steps=5,
                                                        M=200, C_1=0.002, C_2=0.01)),
    "ablation-ve-eps": ({}, dict(sampler="ablation", discretization="vp", schedule="vp", num_steps=5, epsilon_s=0.01)),
    **{"ablation-{solver}-{discretization}-{schedule}-{scaling}".format(**o): ({}, o) for o in ABLATION},
}
# Scenarios whose arithmetic the redesign keeps operation for operation: exact on any CPU that computes
# the same schedule. The others reorganise a product or a change of variables (few-ulp differences).
EXACT = {"edm-default", "edm-6-churn", "edm-release-40", "euler-7", "edm-1-step", "edm-range-rho", "edm-net-range",
         "edm-round-sigma", "edm-guidance", "dpm2m-10", "dpm2m-1", "ablation-alpha-churn",
         *(f"ablation-{s}-edm-linear-none" for s in ("euler", "heun")),
         *(f"ablation-{s}-{d}-linear-none" for s in ("euler", "heun") for d in ("vp", "ve", "iddpm"))}


def run(name: str) -> torch.Tensor:
    toy_args, opts = SCENARIOS[name]
    toy_args, opts = dict(toy_args), dict(opts)
    if toy_args.get("noise_scale") == "half":
        toy_args["noise_scale"] = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5])
    z = latents()
    y = z[:, :2] * 0.5 if opts.pop("y", False) else None
    return sample(Toy(**toy_args), z, y, randn_like=PseudoNoise(), **opts)


def encode(x: torch.Tensor) -> list[str]:
    return [float(v).hex() for v in x.flatten().tolist()]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.determinism
def test_outputs_match_the_numbers_saved_before_the_redesign(name):
    golden = json.loads(GOLDEN.read_text())
    want = torch.tensor([float.fromhex(v) for v in golden["outputs"][name]], dtype=F64)
    got = run(name).flatten()
    assert got.dtype == F64 and got.shape == want.shape and want.isfinite().all()
    if name in EXACT and golden["cpu_capability"] == torch.backends.cpu.get_cpu_capability():
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------------------
# Convergence order. Data x0 ~ N(mu, cov): the exact denoiser is affine, so is every sampler step, and
# the output is Gaussian. The start is drawn from the exact marginal at sigma_max and the latents and
# every noise draw are jointly whitened over the batch (sample mean 0, sample covariance exactly I), so
# the sample mean and covariance of the output are the exact moments of what the sampler computes:
# their error is the discretisation error alone, and halving the step shows its order.

D = 3
MU = torch.tensor([0.3, -0.2, 0.1], dtype=F64)


def _cov() -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0), dtype=F64))
    return q @ torch.diag(torch.tensor([0.1, 0.3, 0.5], dtype=F64)) @ q.T


COV = _cov()


class Exact:
    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma):
        self.calls += 1
        return MU + (x - MU) @ torch.linalg.solve(COV + sigma ** 2 * torch.eye(D, dtype=F64), COV)


def moment_error(fn, num_steps: int, **kwargs) -> tuple[float, int]:
    """|mean - mu| + |cov - COV| / |COV| of the sampler's output, and its number of network evaluations."""
    z = torch.randn(4000, D * (num_steps + 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / len(z))).T
    draws = iter(z.split(D, 1))
    sigmas = append_zero(karras_sigmas(num_steps, 1e-4, 80.0))
    x = MU + next(draws) @ torch.linalg.cholesky(COV + sigmas[0] ** 2 * torch.eye(D, dtype=F64)).T
    den = Exact()
    out = fn(den, x, sigmas, randn_like=lambda x: next(draws), **kwargs)
    mean, cov = out.mean(0), torch.cov(out.T, correction=0)
    return ((mean - MU).norm() + (cov - COV).norm() / COV.norm()).item(), den.calls


# (sampler, options, lowest and highest accepted order, evaluations per step). Measured orders between
# 16, 32 and 64 steps: Heun 2.25/2.11, Euler 0.90/0.95, DPM++(2M) 2.41/2.18, Euler ancestral 0.69/0.83,
# DPM++(2M) SDE 2.00/2.17, DPM++(3M) SDE 2.53/1.87, UniPC-2 3.26/3.12, UniPC-3 5.02/4.08.
ORDERS = [
    (samplers.sample_heun, {}, 1.8, 2.8, 2),
    (samplers.sample_euler, {}, 0.8, 1.3, 1),
    (samplers.sample_dpmpp_2m, {}, 1.8, 2.8, 1),
    (samplers.sample_euler_ancestral, {}, 0.6, 1.3, 1),
    (samplers.sample_dpmpp_2m_sde, {}, 1.7, 2.8, 1),
    (samplers.sample_dpmpp_3m_sde, {}, 1.7, 3.2, 1),
    (samplers.sample_unipc, {}, 2.7, 3.8, 1),
    (samplers.sample_unipc, dict(order=3), 3.5, 5.5, 1),
]


@pytest.mark.parametrize("fn,kwargs,low,high,per_step", ORDERS, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_convergence_order_on_the_exact_gaussian_denoiser(fn, kwargs, low, high, per_step):
    (e16, n16), (e32, _), (e64, n64) = [moment_error(fn, n, **kwargs) for n in (16, 32, 64)]
    orders = math.log2(e16 / e32), math.log2(e32 / e64)
    assert e64 < 0.2 and all(low <= p <= high for p in orders), (e16, e32, e64, orders)
    assert n16 == per_step * 16 - (per_step - 1) and n64 == per_step * 64 - (per_step - 1)  # Heun: Euler last


def test_new_samplers_through_the_dispatcher_with_callback():
    seen = []
    for name in ("euler_a", "dpm2m_sde", "dpm3m_sde", "unipc"):
        x = sample(Toy(), latents(), sampler=name, num_steps=8, randn_like=PseudoNoise(), callback=seen.append)
        assert x.shape == (3, 5) and x.isfinite().all()
    assert [info["i"] for info in seen] == list(range(8)) * 4 and set(seen[0]) >= {"x", "denoised", "sigma"}
    with pytest.raises(ValueError, match="^sampler unipc is deterministic: drop S_churn/S_min/S_max/S_noise$"):
        sample(Toy(), latents(), sampler="unipc", S_churn=1.0)


# ---------------------------------------------------------------------------------------------------
# The fast preset and the command line.

def test_fast_preset_settings_and_flags():
    assert PRESETS["fast"] == dict(sampler="unipc", num_steps=12)  # 12 NFE <= 79 / 6 (benchmarks/solvers.py)
    assert {flag for flag, *_ in SAMPLER_FLAGS} >= {"steps", "sampler", "S_churn", "disc", "guidance-interval"}
    got = {}

    @click.command()
    @sampler_flags()
    @sampler_flags("image-", RELEASE_DEFAULTS)
    @preset_option(both_stages=True)
    def cmd(**kwargs):
        preset = kwargs.pop("preset")
        with user_errors():
            got["generate"] = pop_sampler_options(kwargs, preset=preset)
            got["image"] = pop_sampler_options(kwargs, "image-", preset)

    def run(*args):
        result = CliRunner().invoke(cmd, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return got["generate"], got["image"]

    for opts in run("--preset", "fast"):
        assert (opts.resolved_sampler, opts.num_steps, opts.S_churn, opts.S_noise) == ("unipc", 12, 0.0, 1.0)
        assert (opts.guidance, opts.rho, opts.sigma_min, opts.sigma_max) == (1.0, 7.0, None, None)
    plain, image = run("--preset", "fast", "--steps", "30", "--image-sampler", "dpm2m")
    assert (plain.num_steps, plain.sampler, image.num_steps, image.sampler) == (30, "unipc", 12, "dpm2m")
    plain, image = run()
    assert (plain.resolved_sampler, plain.num_steps, image.num_steps, image.S_churn) == ("edm", 18, 40, 50.0)
    plain, image = run("--preset", "fast", "--image-sampler", "edm")  # the preset's churn (none) stays
    assert (image.sampler, image.num_steps, image.S_churn, image.S_noise) == ("edm", 12, 0.0, 1.0)
    result = CliRunner().invoke(cmd, ["--preset", "slow"])
    assert result.exit_code == 2 and "Error: --preset: expected one of fast, got 'slow'" in result.output


# ---------------------------------------------------------------------------------------------------
# Sampler settings: one resolution rule and one set of checks for the commands, the API and sample().

def test_sampler_settings_and_flags_load_without_torch():
    """The commands' --help (and their flags' checks) stay instant: no torch behind the settings."""
    code = "import sys, vcdm.cli.generate, vcdm.cli.sample, vcdm.cli.variations; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_every_sampler_name_has_one_function_and_its_options():
    assert set(FUNCTIONS) == set(SAMPLERS) == set(TAKES)
    for name in ("euler_a", "dpm2m_sde", "dpm3m_sde"):
        assert "eta" in inspect.signature(FUNCTIONS[name]).parameters and "eta" in TAKES[name]
    assert "order" in inspect.signature(FUNCTIONS["unipc"]).parameters and "order" in TAKES["unipc"]


TUNED = {"sampler": "consistency", "num_steps": 2, "S_churn": 0.0, "S_noise": 1.0}  # recorded_defaults of a tuned model


@pytest.mark.parametrize("given, preset, recorded, want", [
    ({}, None, None, (None, 40, 50.0, 1.007)),  # the command's defaults
    ({"sampler": "dpm2m"}, None, None, ("dpm2m", 40, 0.0, 1.0)),  # no churn: its defaults dropped
    ({"sampler": "ablation"}, None, None, ("ablation", 40, 50.0, 1.007)),  # ablation takes churn: kept
    ({"sampler": "consistency"}, None, None, ("consistency", 2, 0.0, 1.0)),  # its own default steps
    ({"sampler": "consistency", "num_steps": 3}, None, None, ("consistency", 3, 0.0, 1.0)),
    ({}, "fast", None, ("unipc", 12, 0.0, 1.0)),
    ({"num_steps": 30}, "fast", None, ("unipc", 30, 0.0, 1.0)),
    ({}, None, {"sampler": "consistency", "num_steps": 4, "S_churn": 0.0, "S_noise": 1.0}, ("consistency", 4, 0.0, 1.0)),
    ({"sampler": "edm"}, None, {"sampler": "consistency", "num_steps": 4}, ("edm", 40, 50.0, 1.007)),  # given wins
    ({}, None, {**TUNED, "levels": (80.0, 0.15)}, ("consistency", 2, 0.0, 1.0)),
    ({"num_steps": 1}, None, {**TUNED, "levels": (80.0, 0.15)},
     ("consistency", 1, 0.0, 1.0)),  # steps given: the recorded levels go
    ({"levels": (80.0, 9.0, 0.5)}, None, {**TUNED, "levels": (80.0, 0.15)},
     ("consistency", 3, 0.0, 1.0)),  # levels given: they set the steps
])
def test_resolve_the_release_defaults(given, preset, recorded, want):
    opts = SamplerOptions.resolve(given, RELEASE_DEFAULTS, preset, recorded)
    assert (opts.sampler, opts.num_steps, opts.S_churn, opts.S_noise) == want
    assert opts.levels == given.get("levels", (recorded or {}).get("levels") if "num_steps" not in given else None)


def test_the_commands_and_the_api_resolve_alike():
    """`vcdm sample`'s flags and TwoStagePipeline's arguments give the same settings (they once had two
    churn rules: --image-sampler ablation dropped the churn on the command line only)."""
    got = {}

    @click.command()
    @sampler_flags("image-", RELEASE_DEFAULTS)
    def cmd(**kwargs):
        got["cli"] = pop_sampler_options(kwargs, "image-")

    for sampler in ("edm", "ablation", "dpm2m", "unipc", "euler_a"):
        assert CliRunner().invoke(cmd, ["--image-sampler", sampler]).exit_code == 0
        api = pop_api_sampler_options({"image_sampler": sampler}, "image_", RELEASE_DEFAULTS)
        assert api == got["cli"] and (api.S_churn == 50.0) == (sampler in ("edm", "ablation"))


@pytest.mark.parametrize("settings, field_message", [
    (dict(num_steps=0), "{num_steps}: expected 1..10000 steps, got 0"),
    (dict(sampler="ddim"), "{sampler}: expected one of edm, ablation, dpm2m, euler_a, dpm2m_sde, dpm3m_sde, unipc, "
                           "consistency, got 'ddim'"),
    (dict(discretization="cosine"), "{discretization}: expected one of edm, vp, ve, iddpm, got 'cosine'"),
    (dict(solver="rk4"), "{solver}: expected one of euler, heun, got 'rk4'"),
    (dict(sampler="dpm2m", solver="euler"), "{sampler} dpm2m does not take {solver} (those select the ablation sampler)"),
    (dict(sampler="euler_a", S_noise=1.1), "{sampler} euler_a has no churn: drop {S_churn}/{S_min}/{S_max}/{S_noise}"),
    (dict(sampler="consistency", S_churn=1.0),
     "{sampler} consistency has no churn: drop {S_churn}/{S_min}/{S_max}/{S_noise}"),
    (dict(sampler="unipc", order=4), "{order}: expected 1..3, got 4"),
    (dict(sampler="edm", eta=0.5), "{sampler} edm does not take {eta}"),
    (dict(sigma_min=2.0, sigma_max=1.0), "{sigma_min} 2.0 must be below {sigma_max} 1.0"),
    (dict(rho=float("nan")), "{rho}: expected a finite positive number, got nan"),
    (dict(guidance=2.0, guidance_interval=(3, 1)),
     "{guidance_interval}: expected SIGMA_LO,SIGMA_HI with 0 <= SIGMA_LO < SIGMA_HI, got 3.0,1.0"),
    (dict(guidance_interval=(3, 1)),  # unguided too (the interval is dropped only once it is valid)
     "{guidance_interval}: expected SIGMA_LO,SIGMA_HI with 0 <= SIGMA_LO < SIGMA_HI, got 3.0,1.0"),
    (dict(sampler="consistency", levels=(0.15, 80)),
     "{levels}: expected 1..4 finite positive noise levels, falling (e.g. 80,0.15), got 0.15,80.0"),
    (dict(sampler="consistency", levels=(80, 9, 0.8, 0.05, 0.01)),
     "{levels}: expected 1..4 finite positive noise levels, falling (e.g. 80,0.15), got 80.0,9.0,0.8,0.05,0.01"),
    (dict(sampler="consistency", levels=(80, 0.15), num_steps=3),
     "{levels}: 2 noise levels for 3 {num_steps}; give one level per step (or leave the steps out)"),
    (dict(sampler="edm", levels=(80, 0.15)), "{sampler} edm does not take {levels}"),
])
def test_one_check_per_setting_named_by_each_layer(settings, field_message):
    """The checks live in SamplerOptions alone: sample() says them in field names, the commands in their
    flags, the API in its argument names."""
    def named(name):
        return re.sub(r"\{(\w+)\}", lambda m: name(m.group(1)), field_message)

    with pytest.raises(SamplerOptionError) as err:
        SamplerOptions(**settings)
    assert str(err.value) == named(str)
    with pytest.raises(ValueError, match=f"^{re.escape(named(str))}$"):
        sample(Toy(), latents(), **{"sampler": None, **settings})
    api = {f"prior_{API_NAMES[k]}": v for k, v in settings.items()}
    with pytest.raises(FlagError, match=f"^{re.escape(named(lambda k: 'prior_' + API_NAMES[k]))}$"):
        pop_api_sampler_options(api, "prior_")
    if all(k in CLI_FLAGS for k in settings):
        args = [a for k, v in settings.items() for a in (f"--{CLI_FLAGS[k]}", ",".join(map(str, v))
                                                         if isinstance(v, tuple) else str(v))]
        result = CliRunner().invoke(generate_cmd, ["--network", "missing.safetensors", *args])
        assert result.exit_code == 2 and f"Error: {named(lambda k: '--' + CLI_FLAGS[k])}" in result.output, result.output


def test_sample_takes_the_settings_object_or_its_keywords():
    for name in ("edm-6-churn", "ablation-alpha-churn", "dpm2m-10"):
        opts = SamplerOptions(**{"sampler": "edm", **SCENARIOS[name][1]})
        assert torch.equal(sample(Toy(), latents(), options=opts, randn_like=PseudoNoise()), run(name))
    with pytest.raises(TypeError, match="not both"):
        sample(Toy(), latents(), options=SamplerOptions(), num_steps=3)


# ---------------------------------------------------------------------------------------------------
# --class NAME: a class by the name its training data recorded.

def test_class_flag_takes_a_recorded_name(models, tmp_path):
    config = read_checkpoint_config(models["cond_prior"])
    config.data["class_names"] = ["cat", "dog", "zebra"]
    named = tmp_path / "named.safetensors"
    save_checkpoint(named, load_tensors(models["cond_prior"]), config)

    def generate(network, cls, out):
        return CliRunner().invoke(generate_cmd, ["--network", str(network), "--class", cls, "--seeds", "0-1", "--steps", "1",
                                           "--outdir", str(tmp_path / out), "--no-progress", "--device", "cpu"])

    by_name, by_index = generate(named, "dog", "name"), generate(named, "1", "index")
    assert by_name.exit_code == 0 and by_index.exit_code == 0, by_name.output + by_index.output
    for seed in ("000000.pt", "000001.pt"):
        a, b = read_tensors(tmp_path / "name" / seed), read_tensors(tmp_path / "index" / seed)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(a["label"], torch.tensor([0.0, 1.0, 0.0]))
    bad = generate(named, "horse", "bad")
    assert bad.exit_code == 2 and [line for line in bad.output.splitlines() if line.startswith("Error")] == [
        "Error: --class: expected a class index or one of the model's class names (cat, dog, zebra), got 'horse'"]
    unnamed = generate(models["cond_prior"], "dog", "unnamed")
    assert unnamed.exit_code == 2 and "Error: --class: expected a class index (the model records no class names), " \
        "got 'dog'" in unnamed.output
    assert generate(named, "5", "range").exit_code == 2  # an index outside 0..2: the model's own check


def test_solvers_benchmark_grid_and_report(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))  # its shared helpers (common.py)
    spec = importlib.util.spec_from_file_location("solvers_bench", Path(__file__).parents[1] / "benchmarks" / "solvers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    grid = {label: (sampler, bench.nfe(sampler, opts)) for label, sampler, opts in bench.settings((24, 12))}
    assert grid["reference"] == ("edm", 79) and grid["heun-12"] == ("edm", 23) and grid["unipc-24"] == ("unipc", 24)
    churn = {label: opts for label, _, opts in bench.settings((24,))}["heun_churn-12"]
    assert churn == dict(num_steps=12, S_churn=15.0, S_noise=1.007)
    assert len(grid) == 1 + 2 * len(bench.SAMPLERS) and all(n <= 25 for lab, (_, n) in grid.items() if lab != "reference")
    rows = [dict(label=lab, sampler=grid[lab][0], nfe=grid[lab][1], model=m, seed=s, fd=fd)
            for lab, fds in (("reference", (10.0, 12.0)), ("unipc-24", (11.0, 12.0))) for m in ("uncond",)
            for s, fd in enumerate(fds)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text, _ = bench.write_table(tmp_path)
    assert "| reference | 79 | 11.0 ± 1.4 (n=2) | - |" in text and "| unipc-24 | 24 | 11.5 ± 0.7 (n=2) | 0.5 ± 0.7 |" in text
    assert (tmp_path / "fd-vs-nfe.png").stat().st_size > 0 and (tmp_path / "table.md").is_file()


def write() -> None:
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
           "outputs": {name: encode(run(name)) for name in sorted(SCENARIOS)}}
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        torch.set_num_threads(1)
        write()
