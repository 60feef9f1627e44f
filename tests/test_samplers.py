"""Samplers: outputs pinned to numbers saved before the sampler redesign (tests/data/samplers-golden.json).

The golden numbers were written by the samplers as they were before the one-contract redesign, on
a toy denoiser and a pseudo-noise source that use only +, -, *, / and fmod on float64, so that no
vectorised transcendental function (which may round differently per CPU) enters the inputs. The
schedules themselves use pow/exp/log/sqrt; those kernels may differ in the last bit between CPUs,
which is why the comparison allows a few ulps of float64 on a CPU other than the one that wrote them
and on this one demands exact equality wherever the computation was not reorganised (EXACT).

Regenerate (only when a change of outputs is intended): python tests/test_samplers.py --write
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from vcdm.diffusion import sample

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
def test_outputs_match_the_numbers_saved_before_the_redesign(name):
    golden = json.loads(GOLDEN.read_text())
    want = torch.tensor([float.fromhex(v) for v in golden["outputs"][name]], dtype=F64)
    got = run(name).flatten()
    assert got.dtype == F64 and got.shape == want.shape and want.isfinite().all()
    if name in EXACT and golden["cpu_capability"] == torch.backends.cpu.get_cpu_capability():
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def write() -> None:
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
           "outputs": {name: encode(run(name)) for name in sorted(SCENARIOS)}}
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        torch.set_num_threads(1)
        write()
