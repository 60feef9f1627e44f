"""Fast inference paths (vcdm.perf): settings do what they say, stay close to float32, leave the sample
distribution alone, reach the generation path; the benchmark scripts run (tiny configurations)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from vcdm import perf
from vcdm.checkpoints import CheckpointConfig, save_checkpoint
from vcdm.data.structure import Structure
from vcdm.diffusion.sampling import sample
from vcdm.metrics.fid import frechet_distance
from vcdm.nets import build_network
from vcdm.nets.layers import Conv2d
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import preset
from vcdm.perf import FP32, InferenceSettings

REPO = Path(__file__).resolve().parents[1]
BF16 = InferenceSettings(autocast_dtype=torch.bfloat16)
CL_BF16 = InferenceSettings(channels_last=True, autocast_dtype=torch.bfloat16)


pytestmark = pytest.mark.usefixtures("one_thread")


def unet(res: int = 16, label_dim: int = 0, seed: int = 0) -> Denoiser:
    """A small DDPM++ whose 1e-5-initialised output layers are rescaled, so every block contributes."""
    names = {"image": (3, res, res), **({"embedding": (label_dim,)} if label_dim else {})}
    structure = Structure.from_flags(names, "1,1" if label_dim else "1", "0,1" if label_dim else "0")
    cls, kwargs = preset("ddpmpp", resolution=res, channels=3, embed_dim=0, label_dim=label_dim, augment_dim=0,
                         cbase=16, cres=[1, 2], dropout=0.0)
    kwargs.update(num_blocks=1, attn_resolutions=[res // 2])
    torch.manual_seed(seed)
    net = build_network(cls, kwargs)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, Conv2d) and m.weight is not None and m.weight.abs().max() < 1e-3:
                m.weight.mul_(1e5)
    return Denoiser(net, structure).eval()


def evaluate(denoiser: nn.Module, settings: InferenceSettings, x, sigma, y=None) -> torch.Tensor:
    with torch.no_grad(), perf.autocast(settings, "cpu"):
        return denoiser(x, sigma, y)


def test_inference_settings_are_named_and_resolved_from_flags():
    assert [s.name for s in (FP32, InferenceSettings(channels_last=True), BF16, CL_BF16,
                             CL_BF16.replace(compile=True), FP32.replace(compile=True))] == \
        ["fp32", "channels_last", "bf16", "channels_last+bf16", "channels_last+bf16+compile", "fp32+compile"]
    assert CL_BF16.to_dict() == {"channels_last": True, "autocast_dtype": "bfloat16", "compile": False}
    s = perf.resolve_settings("cpu", unet(), bf16=True, channels_last=False, compile=True)
    assert s == InferenceSettings(channels_last=False, autocast_dtype=torch.bfloat16, compile=True)
    assert perf.resolve_settings("cpu", unet(), bf16=False).autocast_dtype is None
    with pytest.raises(ValueError, match="autocast_dtype"):
        InferenceSettings(autocast_dtype=torch.float64)


@pytest.mark.parametrize("native", [True, False])
def test_default_settings_follow_the_measurements(monkeypatch, native):
    monkeypatch.setattr(perf, "bf16_is_fast", lambda device: native)
    bf16 = torch.bfloat16 if native else None
    nets = {res: nn.Module() for res in (16, 32, 64, 256)}  # a U-Net is told apart by its img_resolution
    for res, net in nets.items():
        net.img_resolution = res
    assert perf.default_settings("cpu", nets[16]) == FP32  # small convolutions: casts cost more than they save
    assert perf.default_settings("cpu", nets[32]) == InferenceSettings(channels_last=not native, autocast_dtype=bf16)
    assert perf.default_settings("cpu", nets[64]) == perf.default_settings("cpu", nets[256]) == \
        InferenceSettings(channels_last=True, autocast_dtype=bf16)
    prior = nn.Linear(2, 2)  # no img_resolution: a model of vectors
    assert perf.default_settings("cpu", prior) == FP32
    assert perf.default_settings("cuda", prior) == InferenceSettings(autocast_dtype=bf16)
    assert perf.default_settings("cuda", nets[16]) == InferenceSettings(channels_last=True, autocast_dtype=bf16)
    assert perf.default_settings("mps", nets[64]) == FP32
    assert not any(perf.default_settings(d, n).compile for d in ("cpu", "cuda") for n in nets.values())


AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512_BF16 = AVX2 | {"avx512f", "avx512_bf16"}
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16"}


@pytest.mark.parametrize("flags,env,expected", [
    (AMX, {}, "amx"), (AVX512_BF16, {}, "avx512_bf16"), (AVX2, {}, "avx2"), (frozenset({"sse4_2"}), {}, "baseline"),
    (AMX, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "avx512_bf16"),  # emulating the others on an AMX CPU
    (AMX, {"ONEDNN_MAX_CPU_ISA": "avx2"}, "avx2"), (AVX512_BF16, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, "avx2"),
    (AMX, {"ONEDNN_MAX_CPU_ISA": "ALL"}, "amx"), (AVX2, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "avx2"),
    (AVX2, {"ATEN_CPU_CAPABILITY": "default"}, "baseline"), (AVX2, {"ONEDNN_MAX_CPU_ISA": "AVX"}, "baseline"),
])
def test_cpu_path_from_flags_and_isa_caps(flags, env, expected):
    assert perf.cpu_path(flags, env) == expected


@pytest.mark.parametrize("flags,native", [(AMX, True), (AVX512_BF16, True), (AVX2, False), (frozenset(), False)])
def test_cpu_defaults_per_path(monkeypatch, flags, native):
    """The choice per CPU: bf16 only where the CPU multiplies it natively (and oneDNN is allowed to)."""
    monkeypatch.setattr(perf, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    big = nn.Module()
    big.img_resolution = 64
    assert perf.bf16_is_fast("cpu") is native
    assert perf.default_settings("cpu", big) == InferenceSettings(
        channels_last=True, autocast_dtype=torch.bfloat16 if native else None)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # capped: the AVX2-only choice on any CPU
    assert perf.default_settings("cpu", big) == InferenceSettings(channels_last=True)


def test_prepare_sets_and_resets_channels_last():
    d = unet()
    weights = [p for p in d.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert weights and all(p.is_contiguous() for p in weights)
    assert perf.prepare(d, InferenceSettings(channels_last=True)) is d
    assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in weights)
    perf.prepare(d, FP32)
    assert all(p.is_contiguous() for p in weights)


def test_autocast_runs_only_the_network_in_bf16():
    d = unet(label_dim=8)
    seen = []
    d.net.enc["16x16_conv"].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x, y = torch.randn(2, d.structure.latent_dim), torch.randn(2, 8)
    for settings, dtype in ((FP32, torch.float32), (BF16, torch.bfloat16)):
        out = evaluate(d, settings, x, torch.tensor(1.0), y)
        assert seen.pop() == dtype and out.dtype == torch.float32
    with perf.autocast(BF16, "cpu"):
        assert torch.is_autocast_enabled("cpu")
        x64 = sample(d, torch.randn(2, d.structure.latent_dim, dtype=torch.float64), y, num_steps=2)
    assert x64.dtype == torch.float64  # the sampler state stays float64
    with perf.autocast(FP32, "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_fast_paths_close_to_fp32():
    d = unet(label_dim=8)
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.002, 0.1, 1.0, 80.0])
    x = torch.randn(4, d.structure.latent_dim, generator=g) * (0.25 + sigma[:, None] ** 2).sqrt()
    y = torch.randn(4, 8, generator=g)
    ref = evaluate(d, FP32, x, sigma, y)
    c_skip, c_out, _, _ = d.coefficients(sigma[:, None])
    f_ref = (ref - c_skip * x) / c_out  # the network's own output, about unit scale
    assert 0.3 < f_ref.std() < 30
    errors = {}
    for settings in (InferenceSettings(channels_last=True), BF16, CL_BF16):
        out = evaluate(perf.prepare(unet(label_dim=8), settings), settings, x, sigma, y)
        errors[settings.name] = ((out - ref) / c_out).square().mean().sqrt().item() / f_ref.square().mean().sqrt().item()
        assert (out - ref).abs().max() < 0.1  # data units: images in [-1, 1]
    assert errors["channels_last"] < 1e-5
    assert 1e-4 < errors["bf16"] < 0.05 and 1e-4 < errors["channels_last+bf16"] < 0.05  # bf16 really ran, and is close


class GaussianDenoiser(nn.Module):
    """Exact denoiser of N(mu, cov): D(x; sigma) = mu + U diag(lam / (lam + sigma^2)) U^T (x - mu), with the
    two products as matmuls, so bfloat16 autocast rounds them as it rounds a network's."""

    def __init__(self, mu: torch.Tensor, cov: torch.Tensor):
        super().__init__()
        lam, u = torch.linalg.eigh(cov)
        self.register_buffer("mu", mu.float())
        self.register_buffer("lam", lam.float())
        self.register_buffer("u", u.float())

    def forward(self, x: torch.Tensor, sigma, y=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1)
        z = ((x.float() - self.mu) @ self.u) * (self.lam / (self.lam + sigma ** 2))
        return (self.mu + z @ self.u.T).float()


def test_bf16_sampling_leaves_the_distribution_alone():
    """18-step Heun on an exact Gaussian denoiser: bf16 moves each sample a little (measured: 1.2 8-bit levels
    RMS), but moves the sample set (Frechet distance) far less than drawing it with other seeds does, and
    leaves its distance to the true N(mu, cov) where float32's is."""
    dim, n = 8, 4000
    g = torch.Generator().manual_seed(0)
    a = torch.randn(dim, dim, generator=g)
    cov = (a @ a.T / dim * 0.2 + 0.02 * torch.eye(dim)).double()
    mu = (torch.randn(dim, generator=g) * 0.3).double()
    den = GaussianDenoiser(mu, cov)
    latents = torch.randn(2 * n, dim, generator=g, dtype=torch.float64)

    def draw(settings, z):
        with torch.no_grad(), perf.autocast(settings, "cpu"):
            return sample(den, z, num_steps=18).numpy()

    fp32_a, fp32_b, bf16_a = draw(FP32, latents[:n]), draw(FP32, latents[n:]), draw(BF16, latents[:n])
    stats = lambda s: (s.mean(0), np.cov(s, rowvar=False))
    rms_moved = np.sqrt(np.square(bf16_a - fp32_a).mean())
    assert 1e-4 < rms_moved < 2 * 2 / 255  # bf16 really ran; samples move by under two 8-bit levels RMS
    redraw = frechet_distance(*stats(fp32_a), *stats(fp32_b))
    assert frechet_distance(*stats(fp32_a), *stats(bf16_a)) < 0.5 * redraw
    truth = (mu.numpy(), cov.numpy())
    assert abs(frechet_distance(*stats(bf16_a), *truth) - frechet_distance(*stats(fp32_a), *truth)) < 0.5 * redraw


@pytest.fixture(scope="module")
def checkpoint32(tmp_path_factory) -> Path:
    """A tiny unconditional 32x32 image model: large enough for the CPU default to pick bf16 (where native)."""
    structure = Structure.from_flags({"image": (3, 32, 32)}, "1", "0")
    cls, kwargs = preset("ddpmpp", resolution=32, channels=3, embed_dim=0, label_dim=0, augment_dim=0,
                         cbase=16, cres=[1], dropout=0.0)
    kwargs.update(num_blocks=1, attn_resolutions=[])
    torch.manual_seed(0)
    net = build_network(cls, kwargs)
    config = CheckpointConfig(cls, kwargs, Denoiser(net, structure).config(), structure.to_dict())
    path = tmp_path_factory.mktemp("perf") / "run" / "network-snapshot-000000.safetensors"
    path.parent.mkdir()
    save_checkpoint(path, {"net": net.state_dict()}, config)
    return path


def test_generate_applies_settings_batch_invariantly(checkpoint32, tmp_path):
    from vcdm.generate import InferenceChoices, RunOptions, SamplerOptions, generate, load_model, results_dir

    opts = SamplerOptions(num_steps=2)
    default = generate(checkpoint32, range(3), opts=opts, run=RunOptions(tmp_path / "default", progress=False),
                       device="cpu")
    assert default.settings == perf.default_settings("cpu", load_model(checkpoint32).denoiser)
    outs = {}
    for batch in (1, 3):
        res = generate(checkpoint32, range(3), opts=opts, run=RunOptions(tmp_path / f"b{batch}", batch, progress=False),
                       device="cpu", inference=InferenceChoices(bf16=True, channels_last=True))
        assert res.settings == CL_BF16
        outs[batch] = [p.read_bytes() for p in sorted((tmp_path / f"b{batch}").glob("*.png"))]
    assert len(outs[1]) == 3 and outs[1] == outs[3]  # one seed, one image, whatever the batch, in bf16 too
    fp32 = generate(checkpoint32, range(3), opts=opts, run=RunOptions(tmp_path / "fp32", progress=False),
                    device="cpu", inference=InferenceChoices(bf16=False, channels_last=False))
    assert fp32.settings == FP32
    assert "bf16" not in str(results_dir(checkpoint32, opts, [0, 1, 2]))  # execution details stay out of the layout


def test_precision_flags_are_listed_and_reach_the_network(checkpoint32, tmp_path):
    from vcdm.cli.generate import command

    help_text = CliRunner().invoke(command, ["--help"]).output
    for flag in ("--bf16 / --fp32", "--channels-last / --no-channels-last", "--compile / --no-compile"):
        assert flag in help_text
    result = CliRunner().invoke(command, ["--network", str(checkpoint32), "--outdir", str(tmp_path), "--seeds", "0",
                                          "--steps", "1", "--fp32", "--no-channels-last", "--no-progress",
                                          "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "(network: fp32)" in result.output and (tmp_path / "000000.png").is_file()


@pytest.fixture
def benchmarks(monkeypatch):
    """The benchmark scripts as modules (they import their shared ``common`` from their folder)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import denoiser
    import run_all
    return denoiser, run_all


def test_denoiser_benchmark_reports_every_setting_once(benchmarks, tmp_path, monkeypatch, capsys):
    denoiser, _ = benchmarks
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # the script points it at a fresh folder
    monkeypatch.setattr(sys, "argv", ["denoiser.py", "--tiny", "--quick", "--compile", "none", "--reps", "1",
                                      "--json", str(tmp_path / "d.json")])
    denoiser.main()
    rows = {r["metric"]: r for r in json.loads((tmp_path / "d.json").read_text())["rows"]}
    assert set(rows) == {"denoiser b8 fp32", "denoiser b8 channels_last", "denoiser b8 bf16",
                         "denoiser b8 channels_last+bf16", "prior b8 fp32", "prior b8 bf16"}
    assert rows["denoiser b8 fp32"]["ratio"] is None and all(r["value"] > 0 for r in rows.values())
    assert rows["denoiser b8 bf16"]["reference"] == "denoiser b8 fp32" and rows["denoiser b8 bf16"]["ratio"] > 0
    assert "| DDPM++ image model | 8 | channels_last+bf16 |" in capsys.readouterr().out


def test_run_all_reports_failures_in_the_table(benchmarks, tmp_path, monkeypatch):
    _, run_all = benchmarks
    (tmp_path / "good.py").write_text(
        "import json, sys\n"
        "path = sys.argv[sys.argv.index('--json') + 1]\n"
        "rows = [{'metric': 'ref', 'value': 2.0, 'unit': 'images/s', 'reference': None, 'ratio': None, 'note': ''},\n"
        "        {'metric': 'fast', 'value': 5.0, 'unit': 'images/s', 'reference': 'ref', 'ratio': 2.5,\n"
        "         'note': 'quick' if '--quick' in sys.argv else 'full'}]\n"
        "json.dump({'benchmark': 'good', 'machine': {}, 'rows': rows}, open(path, 'w'))\n")
    (tmp_path / "bad.py").write_text("raise SystemExit('boom: no such dataset')\n")
    (tmp_path / "silent.py").write_text("print('forgot the json')\n")
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    monkeypatch.setattr(run_all, "SCRIPTS", {name: (f"{name}.py", name) for name in ("good", "bad", "silent", "gone")})
    (tmp_path / "solvers").mkdir()
    (tmp_path / "solvers" / "table.md").write_text("| sampler | NFE |\n|---|---|\n| unipc-24 | 24 |\n")
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--quick", "--out", str(tmp_path / "out"),
                                      "--solvers", str(tmp_path / "solvers")])
    run_all.main()
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| unipc-24 | 24 |" in md  # quoted from benchmarks/solvers.py's results, not re-run
    assert "| good | fast | 5 | images/s | ref | 2.50x | quick |" in md
    from vcdm.perf import cpu_path
    assert f"| quick | {cpu_path()}, kernels " in md  # every figure names the CPU path it ran on
    assert "| bad | FAILED |" in md and "boom: no such dataset" in md
    assert "| silent | FAILED |" in md and "no usable --json output" in md
    assert "| gone | FAILED |" in md and "not found" in md
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert results["good"]["rows"][1]["ratio"] == 2.5 and results["bad"]["error"].startswith("exit code 1")
    assert "boom" in (tmp_path / "out" / "logs" / "bad.log").read_text()


def test_whole_process_cases_and_summary(benchmarks, tmp_path, monkeypatch):
    """sample.py --load: the reference runs as EDM's process would (OMP_WAIT_POLICY unset); ratios of medians."""
    import wholeprocess

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    cases = wholeprocess.commands(tmp_path / "m.safetensors", tmp_path, images=8, steps=4)
    assert list(cases) == ["fp32 eager baseline", "vcdm defaults"]
    (base_cmd, base_env), (vcdm_cmd, vcdm_env) = cases["fp32 eager baseline"], cases["vcdm defaults"]
    assert "OMP_WAIT_POLICY" not in base_env and "OMP_WAIT_POLICY" not in vcdm_env
    assert base_cmd[base_cmd.index("--steps") + 1] == vcdm_cmd[vcdm_cmd.index("--steps") + 1] == "4"
    assert vcdm_cmd[vcdm_cmd.index("--seeds") + 1] == "0-7" and "generate" in vcdm_cmd
    policy = wholeprocess.commands(tmp_path / "m", tmp_path, 8, 4, "PASSIVE")["fp32 eager baseline"][1]
    assert policy["OMP_WAIT_POLICY"] == "PASSIVE"
    edm = wholeprocess.commands(tmp_path / "m", tmp_path, 8, 4, edm=(tmp_path / "edm", tmp_path / "n.pkl"))
    edm_cmd = edm["EDM generate.py"][0]
    assert list(edm) == ["EDM generate.py", "vcdm defaults"] and edm_cmd[edm_cmd.index("--network") + 1].endswith("n.pkl")
    assert edm_cmd[edm_cmd.index("--edm-root") + 1] == str(tmp_path / "edm") and "generate" in edm_cmd
    from common import Timing

    times = {"idle": {"fp32 eager baseline": Timing((10.0, 12.0, 30.0)), "vcdm defaults": Timing((5.0, 4.0, 6.0))},
             "loaded": {"fp32 eager baseline": Timing((20.0, 20.0, 20.0)), "vcdm defaults": Timing((10.0, 40.0, 8.0))}}
    rows = {r["metric"]: r for r in wholeprocess.summary(times, images=8, steps=4, pixels=(0.25, 3))}
    idle = rows["whole-process sampling, vcdm defaults (idle)"]
    assert idle["value"] == 8 / 5.0 and idle["ratio"] == 12.0 / 5.0
    assert (idle["min"], idle["max"], idle["reps"]) == (8 / 6.0, 8 / 4.0, 3)  # images/s: the slowest run is the min
    assert "min/median/max 4.0/5.0/6.0 s" in idle["note"] and "paired speedups 2.00-5.00x" in idle["note"]
    assert "mean |diff| 0.250, max 3 levels" in idle["note"]
    assert rows["whole-process sampling, vcdm defaults (loaded)"]["ratio"] == 2.0
    assert rows["whole-process sampling, fp32 eager baseline (loaded)"]["ratio"] is None


def test_whole_process_pixel_difference(benchmarks, tmp_path):
    """The two outputs are compared seed by seed, in 8-bit levels."""
    import PIL.Image
    import wholeprocess

    cases = wholeprocess.commands(tmp_path / "m", tmp_path, images=2, steps=4)
    folders = [Path(cmd[cmd.index("--outdir") + 1]) for cmd, _ in cases.values()]
    rng = np.random.default_rng(0)
    for seed in range(2):
        ref = rng.integers(0, 250, (8, 8, 3), dtype=np.uint8)
        ours = ref.copy()
        ours[0, 0, 0] += 5 * seed  # seed 1 differs by 5 levels in one value
        for folder, img in zip(folders, (ref, ours)):
            folder.mkdir(exist_ok=True)
            PIL.Image.fromarray(img).save(folder / f"{seed:06d}.png")
    mean, worst = wholeprocess.pixel_difference(cases)
    assert worst == 5 and mean == pytest.approx(5 / (2 * 8 * 8 * 3))


def test_edm_reference_refuses_a_folder_that_is_not_edm(benchmarks, tmp_path):
    import edm

    with pytest.raises(SystemExit, match="not a clone of NVlabs/edm"):
        edm.generate(tmp_path, tmp_path / "n.pkl", tmp_path / "out", seeds=1, steps=2, batch=1)


@pytest.mark.parametrize("env,expected", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")])
def test_command_line_sets_passive_omp_wait_unless_set(env, expected):
    """Busy-waiting OpenMP threads stall under load (vcdm.perf); the CLI opts out before torch loads."""
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import sys, os, vcdm.cli; assert 'torch' not in sys.modules; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_benchmark_timer_interleaves_and_rows_invert_rates(benchmarks):
    """common.measure: warm-up rounds, then repetitions round-robin (alternate: every other round reversed),
    warm-up calls before each timed call; timing_row: a rate's min comes from the slowest repetition."""
    from common import Timing, measure, timing_row

    calls = []
    cases = {name: (lambda name=name: calls.append(name)) for name in "AB"}
    times = measure(cases, reps=3, warmup=1, alternate=True)
    assert calls == ["A", "B", "A", "B", "B", "A", "A", "B"] and [len(t.seconds) for t in times.values()] == [3, 3]
    calls.clear()
    measure(cases, reps=2, warmup=0, warmup_each=1)
    assert calls == ["A", "A", "B", "B"] * 2
    r = timing_row("x", Timing((2.0, 4.0, 1.0)), count=8, unit="images/s", reference="y", ratio=1.5)
    assert (r["value"], r["min"], r["max"], r["reps"], r["ratio"]) == (4.0, 2.0, 8.0, 3, 1.5)
    ms = timing_row("y", Timing((0.002, 0.001)), scale=1e3, unit="ms")
    assert (ms["value"], ms["min"], ms["max"]) == pytest.approx((1.5, 1.0, 2.0))
