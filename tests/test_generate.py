"""Generation: the original release's results layout, per-seed determinism, resume, two-stage, variations."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from tiny_models import EMB, REPO, RES, run
from vcdm.checkpoints import load_checkpoint
from vcdm.cli.generate import command as generate_cmd
from vcdm.cli.sample import command as sample_cmd
from vcdm.cli.variations import command as variations_cmd
from vcdm.diffusion import StackedRandomGenerator, sample
from vcdm.generate import RunOptions, SamplerOptions, generate, results_dir
from vcdm.data.structure import Structure
from vcdm.generate.core import ChunkedDenoiser
from vcdm.generate.files import read_tensors
from vcdm.nets import build_network
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import preset

SEED_ARGS = "S_churn-50.0_S_max-inf_S_min-0.0_S_noise-1.007_class-None_discretization-None_num_steps-40_rho-7.0_" \
            "scaling-None_schedule-None_sigma_max-None_sigma_min-None_solver-None"
FAST = ["--steps", "2", "--S_churn", "50", "--S_noise", "1.007"]


def files(root: Path, manifests: bool = True) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and (manifests or p.name != "vcdm-manifest.json")}


def test_results_dir_matches_seed_readme():
    opts = SamplerOptions(num_steps=40, S_churn=50, S_noise=1.007)
    prior = "training-runs/<AUX ID>/network-snapshot-<AUX KIMG>.pkl"
    emb_dir = results_dir(prior, opts, range(20000))
    assert str(emb_dir) == f"results/<AUX ID>/network-snapshot-<AUX KIMG>/{SEED_ARGS}/samples-0-19999"
    img_dir = results_dir("training-runs/<IMG ID>/network-snapshot-<IMG KIMG>.pkl", opts, range(20000),
                          load_obs_from=f"{emb_dir}/")
    assert str(img_dir) == (f"results/<IMG ID>/network-snapshot-<IMG KIMG>/{SEED_ARGS}/results_<AUX ID>_"
                            f"network-snapshot-<AUX KIMG>_{SEED_ARGS}_samples-0-19999/samples-0-19999")
    # New options enter the name only when set; --increment_seeds is appended as in the original release.
    dpm = results_dir(prior, opts.replace(sampler="dpm2m", S_churn=0, S_noise=1), [3, 5], increment_seeds=2)
    assert dpm.name == "samples-3-5" and dpm.parent.name == (
        "S_churn-0.0_S_max-inf_S_min-0.0_S_noise-1.0_class-None_discretization-None_num_steps-40_rho-7.0_"
        "sampler-dpm2m_scaling-None_schedule-None_sigma_max-None_sigma_min-None_solver-None_2")
    assert "guidance-2.0" in results_dir(prior, opts.replace(guidance=2), [0]).parts[3]


@pytest.mark.slow
def test_seed_readme_commands_then_sample_gives_identical_files(models, tmp_path, monkeypatch):
    """The README's two generate commands (paths/sizes adapted) → the README's layout; `vcdm sample` → same bytes."""
    runs = models["prior"].parents[1]
    work_a, work_b = tmp_path / "a", tmp_path / "b"
    for work in (work_a, work_b):
        work.mkdir()
        (work / "training-runs").symlink_to(runs)
    monkeypatch.chdir(work_a)
    prior, image = "training-runs/prior01/network-snapshot-000000.safetensors", \
        "training-runs/image01/network-snapshot-000000.safetensors"
    run(generate_cmd, ["--seeds=0-4", "--batch=2", f"--network={prior}", *FAST])
    args = SEED_ARGS.replace("num_steps-40", "num_steps-2")
    emb_dir = f"results/prior01/network-snapshot-000000/{args}/samples-0-4"
    assert sorted(os.listdir(emb_dir)) == [f"{s:06d}.pt" for s in range(5)] + ["vcdm-manifest.json"]
    obs = torch.load(f"{emb_dir}/000003.pt", weights_only=True)  # the release's form: a list over (image, embedding)
    assert obs[0] is None and obs[1].shape == (EMB,) and obs[1].dtype == torch.float32 and len(obs) == 2

    run(generate_cmd, ["--seeds=0-4", "--batch=2", f"--network={image}", *FAST, "--load_obs_from", emb_dir + "/"])
    img_dir = Path(f"results/image01/network-snapshot-000000/{args}/{emb_dir.replace('/', '_')}/samples-0-4")
    assert sorted(os.listdir(img_dir)) == [f"{s:06d}.png" for s in range(5)] + ["vcdm-manifest.json"]
    assert np.asarray(PIL.Image.open(img_dir / "000000.png")).shape == (RES, RES, 3)

    monkeypatch.chdir(work_b)
    run(sample_cmd, ["--prior", prior, "--image-model", image, "--seeds", "0-4", "--batch", "3",
                     "--prior-steps", 2, "--image-steps", 2])
    assert files(work_b / "results") == files(work_a / "results")
    # With --outdir: embeddings/ and images/ hold the same files.
    run(sample_cmd, ["--prior", prior, "--image-model", image, "--seeds", "0-4", "--outdir", "out",
                     "--prior-steps", 2, "--image-steps", 2])
    assert files(Path("out/images")) == files(work_a / img_dir)
    assert files(Path("out/embeddings")) == files(work_a / emb_dir)


@pytest.mark.slow
@pytest.mark.determinism
def test_same_seed_same_bytes_whatever_batch(models, tmp_path):
    outs = {}
    for batch in (1, 3, 7):
        for kind in ("uncond", "prior"):
            run(generate_cmd, ["--network", models[kind], "--outdir", tmp_path / f"{kind}{batch}", "--seeds", "0-6",
                               "--batch", batch, *FAST])
            outs[kind, batch] = files(tmp_path / f"{kind}{batch}")
    for kind, ext in (("uncond", "png"), ("prior", "pt")):
        assert sorted(outs[kind, 1]) == [f"{s:06d}.{ext}" for s in range(7)] + ["vcdm-manifest.json"]
        assert outs[kind, 1] == outs[kind, 3] == outs[kind, 7]
    assert len(set(outs["uncond", 1].values())) == 8  # seeds differ from each other


@pytest.mark.determinism
def test_same_seed_same_pixels_at_batch_1_2_and_5(models, tmp_path):
    for kind in ("uncond", "prior"):
        outs = [files(generate(models[kind], range(5), opts=SamplerOptions(num_steps=2),
                               run=RunOptions(tmp_path / f"{kind}{b}", max_batch_size=b, progress=False)).outdir)
                for b in (1, 2, 5)]
        assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 6  # 5 samples and the manifest


@pytest.mark.determinism
def test_chunked_evaluation_gives_a_sample_the_same_bits_in_any_batch(one_thread):
    """A 32x32 DDPM++ (one call per batch padded to a multiple of 8, as vcdm did, gives a sample other bits
    among 8 than among 16 here) evaluated in calls of CHUNK samples: the same bits at --batch 1, 2, 5, 16."""
    structure = Structure.from_flags({"image": (3, 32, 32), "embedding": (16,)}, "1,1", "0,1")
    cls, kwargs = preset("ddpmpp", resolution=32, channels=3, embed_dim=0, label_dim=16, augment_dim=0, cbase=32,
                         cres=[1, 2, 2], dropout=0.0)
    torch.manual_seed(0)
    denoiser = Denoiser(build_network(cls, kwargs), structure).eval().requires_grad_(False)
    for p in denoiser.parameters():  # away from the zero-initialised output layers
        p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, structure.latent_dim, generator=g) * 3, torch.randn(16, 16, generator=g)
    sigma = torch.randn(16, generator=g).exp()
    chunked = ChunkedDenoiser(denoiser)
    with torch.no_grad():
        outs = [torch.cat([chunked(x[p], sigma[p], y[p]) for p in torch.arange(16).tensor_split(-(-16 // b))])
                for b in (1, 2, 5, 16)]
    assert all(torch.equal(out, outs[0]) for out in outs[1:])
    assert not torch.equal(outs[0][:8], outs[0][8:])  # the samples differ from each other


def test_resume_writes_only_missing_files(models, tmp_path):
    out = tmp_path / "out"
    first = generate(models["uncond"], range(10), opts=SamplerOptions(num_steps=2),
                     run=RunOptions(out, max_batch_size=4, progress=False))
    assert sorted(first.written) == list(range(10))
    before = files(out)
    for seed in (2, 3, 8):
        (out / f"{seed:06d}.png").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = generate(models["uncond"], range(10), opts=SamplerOptions(num_steps=2),
                     run=RunOptions(out, max_batch_size=4, progress=False))
    assert sorted(again.written) == [2, 3, 8] and again.skipped == 7
    assert files(out) == before
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in kept} == kept
    assert not list(out.glob(".*"))  # no temp or claim files left behind
    assert generate(models["uncond"], range(10), opts=SamplerOptions(num_steps=2),
                    run=RunOptions(out, max_batch_size=3, progress=False)).written == []


def test_subdirs_and_increment_seeds(models, tmp_path):
    emb = tmp_path / "emb"
    run(generate_cmd, ["--network", models["prior"], "--outdir", emb, "--seeds", "998-1001", "--subdirs", "--steps", 1])
    assert sorted(str(p.relative_to(emb)) for p in emb.rglob("*.pt")) == [
        "000000/000998.pt", "000000/000999.pt", "001000/001000.pt", "001000/001001.pt"]
    run(generate_cmd, ["--network", models["image"], "--outdir", tmp_path / "img", "--seeds", "999-1000",
                       "--load_obs_from", emb, "--steps", 1])  # reads the thousands sub-directories
    assert sorted(p.name for p in (tmp_path / "img").glob("*.png")) == ["000999.png", "001000.png"]
    # --increment_seeds shifts the noise seed only: seed 998 + 2 draws what seed 1000 draws.
    run(generate_cmd, ["--network", models["prior"], "--outdir", tmp_path / "inc", "--seeds", "998",
                       "--increment_seeds", 2, "--steps", 1])
    assert (tmp_path / "inc" / "000998.pt").read_bytes() == (emb / "001000" / "001000.pt").read_bytes()


@pytest.mark.slow
def test_torchrun_two_processes_match_one(models, tmp_path):
    single = tmp_path / "single"
    run(generate_cmd, ["--network", models["uncond"], "--outdir", single, "--seeds", "0-6", "--batch", 2, *FAST])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "generate.py"), f"--network={models['uncond']}", f"--outdir={tmp_path / 'multi'}", "--seeds=0-6", "--batch=2", *FAST,
           "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert files(tmp_path / "multi") == files(single)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc")
def test_torchrun_session_leaves_no_gloo_threads(models, tmp_path):
    """A process group that outlives its session keeps gloo threads to interpreter exit, where one can abort
    the process after its work is done (seen as 'terminate called without an active exception')."""
    script = tmp_path / "session.py"
    script.write_text(
        "import os, sys\n"
        "import torch\n"
        "from vcdm import distributed\n"
        "from vcdm.generate.core import load_model\n"
        "with distributed.session('cpu') as device:\n"
        "    load_model(sys.argv[1], device)  # builds the network on the meta device first\n"
        "    distributed.all_sum([1.0], device)\n"
        "    cycle = [torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))]\n"
        "    cycle.append(cycle)  # garbage that holds the group until a collection\n"
        "    del cycle\n"
        "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
        "with open(sys.argv[2] + os.environ['RANK'], 'w') as f:  # one file per rank: torchrun's output interleaves\n"
        "    f.write(str(sum('gloo' in n for n in names)))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(models["uncond"]), str(tmp_path / "gloo-threads-rank")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"gloo-threads-rank{r}").read_text() for r in (0, 1)] == ["0", "0"]


def test_grid_tiles_the_samples_and_is_refused_for_embeddings(models, tmp_path):
    run(generate_cmd, ["--network", models["uncond"], "--outdir", tmp_path / "o", "--seeds", "0-4", "--steps", 2,
                       "--grid", tmp_path / "grid.png"])
    grid = np.asarray(PIL.Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * RES, 3 * RES, 3)
    assert np.array_equal(grid[RES:, :RES], np.asarray(PIL.Image.open(tmp_path / "o" / "000003.png")))
    bad = run(generate_cmd, ["--network", models["prior"], "--outdir", tmp_path / "p", "--seeds", "0", "--grid",
                             tmp_path / "g2.png"], ok=False)
    assert bad.exit_code == 2 and "--grid" in bad.output


def test_refuses_incompatible_prior(models, tmp_path):
    for prior, message in (("other_prior", "embedders differ: fingerprint"), ("wide_prior", "dimension mismatch"),
                           ("image", "generates images, not embeddings")):
        result = run(sample_cmd, ["--prior", models[prior], "--image-model", models["image"], "--seeds", "0-1",
                                  "--outdir", tmp_path / prior], ok=False)
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / prior).exists()


def test_class_conditional_prior_chain(models, tmp_path):
    """A class-conditional prior stores its label with the embedding; --class fixes it."""
    out = tmp_path / "c"
    run(sample_cmd, ["--prior", models["cond_prior"], "--image-model", models["image"], "--seeds", "0-3",
                     "--outdir", out, "--prior-steps", 2, "--image-steps", 2, "--class", 2])
    obs = read_tensors(out / "embeddings" / "000001.pt")
    assert torch.equal(obs["label"], torch.tensor([0.0, 0.0, 1.0])) and obs["embedding"].shape == (EMB,)
    assert len(list((out / "images").glob("*.png"))) == 4
    rnd = generate(models["cond_prior"], range(12), opts=SamplerOptions(num_steps=1),
                   run=RunOptions(tmp_path / "r", progress=False))
    labels = {int(read_tensors(p)["label"].argmax()) for p in rnd.outdir.glob("*.pt")}
    assert len(labels) > 1  # random class per seed without --class
    bad = run(generate_cmd, ["--network", models["cond_prior"], "--outdir", tmp_path / "x", "--class", 3], ok=False)
    assert "--class: expected 0..2" in bad.output


def test_missing_observation_names_seed(models, tmp_path):
    obs = tmp_path / "obs"
    generate(models["prior"], [0, 1, 3], opts=SamplerOptions(num_steps=1), run=RunOptions(obs, progress=False))
    result = run(generate_cmd, ["--network", models["image"], "--outdir", tmp_path / "img", "--seeds", "0-3",
                                "--load_obs_from", obs], ok=False)
    assert result.exit_code == 1
    assert "no observation for seed 2" in result.output and "000002.pt" in result.output
    assert not (tmp_path / "img").exists()
    torch.save({"embedding": torch.zeros(5)}, obs / "000002.pt")
    result = run(generate_cmd, ["--network", models["image"], "--outdir", tmp_path / "img", "--seeds", "2",
                                "--load_obs_from", obs], ok=False)
    assert "'embedding' has shape (5,), the model expects (8,)" in result.output


@pytest.mark.parametrize("seeds", ["1,x", "5-2", "-3"])
def test_bad_seeds_one_line_error(models, tmp_path, seeds):
    result = run(generate_cmd, ["--network", models["uncond"], "--outdir", tmp_path, "--seeds", seeds], ok=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and "'--seeds'" in error[0]


def test_bad_generate_options_and_missing_network_are_refused(models, tmp_path):
    result = run(generate_cmd, ["--network", models["uncond"], "--outdir", tmp_path, "--sampler", "dpm2m",
                                "--S_churn", 10], ok=False)
    assert result.exit_code == 2 and "dpm2m is deterministic" in result.output
    result = run(generate_cmd, ["--network", models["uncond"], "--outdir", tmp_path, "--guidance", 2], ok=False)
    assert "--guidance" in result.output
    result = run(generate_cmd, ["--network", tmp_path / "missing.safetensors"], ok=False)
    assert result.exit_code == 1 and "missing.safetensors" in result.output


@pytest.mark.parametrize("flags, settings, tol", [
    (["--sampler", "dpm2m"], dict(sampler="dpm2m"), 1e-6),
    (["--solver", "euler", "--disc", "vp"], dict(sampler="ablation", solver="euler", discretization="vp"), 1e-6),
    (["--bf16", "--device", "cpu"], dict(), 0.05),  # the network under bfloat16 autocast: within its rounding
])
def test_sampler_flags_give_the_samplers_output_for_each_seeds_noise(models, tmp_path, flags, settings, tol):
    """The prior's files hold what the sampler function gives for each seed's noise (the CLI adds batching,
    padding and float32 files); another sampler gives something else."""
    run(generate_cmd, ["--network", models["prior"], "--outdir", tmp_path / "out", "--seeds", "0-2", "--batch", 2,
                       "--steps", 3, *flags])
    denoiser = load_checkpoint(models["prior"])[0]

    def direct(**settings):
        rnd = StackedRandomGenerator("cpu", [0, 1, 2])
        return sample(denoiser, rnd.randn([3, EMB]), randn_like=rnd.randn_like, num_steps=3, **settings)

    got = torch.stack([read_tensors(tmp_path / "out" / f"{seed:06d}.pt")["embedding"] for seed in range(3)]).double()
    expected = direct(**settings)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    other = direct(sampler="edm" if settings else "dpm2m")
    assert (other - expected).abs().max() > 10 * tol
    if "--bf16" in flags:
        assert not torch.equal(got, expected.float().double())


def test_conditioning_from_data(models, tmp_path):
    """Without --load_obs_from an image model is conditioned on embeddings of random dataset images."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        PIL.Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(data / f"{i}.png")
    result = run(generate_cmd, ["--network", models["image"], "--outdir", tmp_path / "x", "--seeds", "0"], ok=False)
    assert "--load_obs_from" in result.output and "--data_path" in result.output
    for batch in (1, 4):
        result = run(generate_cmd, ["--network", models["image"], "--outdir", tmp_path / f"d{batch}", "--seeds", "0-3",
                                    "--data_path", data, "--batch", batch, "--steps", 2])
        # Says once where the conditioning comes from.
        assert result.output.count(f"Conditioning on ['embedding'] of random items of {data}") == 1, result.output
    assert files(tmp_path / "d1") == files(tmp_path / "d4") and len(files(tmp_path / "d1", manifests=False)) == 4


def test_variations_grid_per_input(models, tmp_path):
    rng = np.random.default_rng(1)
    inputs = []
    for name, size in (("cat", (20, 12)), ("dog", (RES, RES))):
        PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
        inputs.append(tmp_path / f"{name}.png")
    result = run(variations_cmd, ["--image-model", models["image"], "--images", *inputs, "--n", 3, "--steps", 2,
                                  "--outdir", tmp_path / "var", "--device", "cpu"])
    assert sorted(p.name for p in (tmp_path / "var").iterdir()) == ["cat.png", "dog.png"], result.output
    grid = np.asarray(PIL.Image.open(tmp_path / "var" / "dog.png"))
    step = RES + 2  # tiles 1 px apart on each side
    assert grid.shape == (2 * step, 2 * step, 3)
    assert np.array_equal(grid[1:1 + RES, 1:1 + RES], np.asarray(PIL.Image.open(inputs[1])))  # input first
    assert (grid[0, :step] == [255, 64, 0]).all() and (grid[0, step:] == 0).all()  # only the input is framed
    assert not np.array_equal(grid[1:1 + RES, step + 1:step + 1 + RES], grid[step + 1:step + 1 + RES, 1:1 + RES])
    bad = run(variations_cmd, ["--image-model", models["uncond"], "--images", inputs[0], "--outdir", tmp_path / "u"],
              ok=False)
    assert bad.exit_code == 1 and "conditioned on an embedding" in bad.output
    bad = run(variations_cmd, ["--image-model", models["image"], "--images", inputs[0], "--n", 2, "--seeds", "0-4"],
              ok=False)
    assert bad.exit_code == 2 and "--n 2" in bad.output


def test_root_script_help():
    proc = subprocess.run([sys.executable, str(REPO / "generate.py"), "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=60)
    assert proc.returncode == 0
    for flag in ("--network", "--load_obs_from", "--S_churn", "--disc", "--subdirs", "--increment_seeds", "--sampler"):
        assert flag in proc.stdout




@pytest.mark.slow
def test_seed_workflow_on_tiny_trained_models(tmp_path, monkeypatch, one_thread):
    """Train a tiny prior and image model (pixel-pca embeddings), then the README's sampling commands."""
    from vcdm.cli.train import command as train_cmd

    data = tmp_path / "datasets" / "tiny"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(16):
        img = np.full((RES, RES, 3), 30, np.uint8)
        img[..., i % 2] = 200
        PIL.Image.fromarray(img + rng.integers(0, 40, img.shape, dtype=np.uint8)).save(data / f"{i:02d}.png")
    monkeypatch.chdir(tmp_path)
    common = ["--path", "datasets/tiny", "--data_class", "CLIPDataset", "--embedder", "pixel-pca", "--pca-dim", "8",
              "--workers", "0", "--device", "cpu", "--seed", "1", "--batch", "4", "--augment", "0", "--tick", "0.004",
              "--lr-rampup", "0", "--duration", "0.000008"]
    for args in (["--exist", "0,1", "--observed", "0,0", "--arch", "dalle2", "--prior-dim", "32", "--prior-depth", "1",
                  "--pred_x0", "1", "--desc", "prior"],
                 ["--exist", "1,1", "--observed", "0,1", "--arch", "ddpmpp", "--cbase", "8", "--cres", "1,1",
                  "--desc", "image"]):
        result = CliRunner().invoke(train_cmd, common + args)
        assert result.exit_code == 0, result.output
    (prior,) = Path("training-runs").glob("*-prior/network-snapshot-000000.safetensors")
    (image,) = Path("training-runs").glob("*-image/network-snapshot-000000.safetensors")

    steps = ["--steps", "3", "--S_churn", "50", "--S_noise", "1.007"]
    run(generate_cmd, ["--seeds=0-5", "--batch=4", f"--network={prior}", *steps])
    args = SEED_ARGS.replace("num_steps-40", "num_steps-3")
    emb_dir = f"results/{prior.parent.name}/network-snapshot-000000/{args}/samples-0-5"
    run(generate_cmd, ["--seeds=0-5", "--batch=4", f"--network={image}", *steps, "--load_obs_from", emb_dir + "/"])
    img_dir = Path(f"results/{image.parent.name}/network-snapshot-000000/{args}/{emb_dir.replace('/', '_')}") / \
        "samples-0-5"
    assert sorted(p.name for p in img_dir.glob("*.png")) == [f"{s:06d}.png" for s in range(6)]
    # The two runs share their (cached) pixel-pca fit, so `vcdm sample` accepts the pair and agrees.
    run(sample_cmd, ["--prior", prior, "--image-model", image, "--seeds", "0-5", "--outdir", "two-stage",
                     "--prior-steps", 3, "--image-steps", 3])
    assert files(Path("two-stage/images")) == files(img_dir)
    # Without --load_obs_from the image model embeds random training images (the recorded data path).
    run(generate_cmd, ["--seeds=0-1", f"--network={image}", "--steps", 2, "--outdir", "from-data"])
    assert len(list(Path("from-data").glob("*.png"))) == 2


def test_long_load_obs_from_path_gets_a_short_deterministic_folder(models, tmp_path, monkeypatch):
    """A 400-byte --load_obs_from path: the results folder name would pass 255 bytes; it is shortened."""
    monkeypatch.chdir(tmp_path)
    deep = Path(*[f"{i}" + "d" * 98 for i in range(4)])  # 4 × 99 bytes + 3 separators = 399 (+ "/" = 400)
    obs = str(deep) + "/"
    assert len(obs.encode()) == 400
    generate(models["prior"], range(2), opts=SamplerOptions(num_steps=1), run=RunOptions(deep, progress=False))
    result = run(generate_cmd, ["--network", models["image"], "--seeds", "0-1", "--steps", 1, "--load-obs-from", obs])
    out = results_dir(models["image"], SamplerOptions(num_steps=1), [0, 1], load_obs_from=obs)
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"], result.output
    name = out.parent.name
    assert len(name.encode()) == 255 and name.startswith("0ddd") and re.fullmatch(r".*~[0-9a-f]{16}", name)
    assert out == results_dir(models["image"], SamplerOptions(num_steps=1), [0, 1], load_obs_from=obs)  # stable
    short = results_dir(models["image"], SamplerOptions(num_steps=1), [0, 1], load_obs_from="emb/")
    assert short.parent.name == "emb"  # names that fit keep the release's layout


def test_rerun_with_other_settings_is_refused(models, tmp_path):
    out = tmp_path / "out"
    args = ["--network", models["uncond"], "--outdir", out, "--seeds", "0-1", "--fp32"]
    run(generate_cmd, [*args, "--steps", 1])
    manifest = json.loads((out / "vcdm-manifest.json").read_text())["settings"]
    assert manifest["--steps"] == 1 and manifest["precision"] == "fp32" and manifest["network"].startswith("sha256:")
    before = files(out)
    for extra, setting in ((["--steps", 2], "--steps 1, not 2"), (["--steps", 1, "--bf16"], "precision fp32, not bf16"),
                           (["--steps", 1, "--S_churn", 5], "--S_churn 0.0, not 5.0")):
        result = run(generate_cmd, [*args, *extra], ok=False)
        assert result.exit_code == 1 and setting in result.output and "--overwrite" in result.output, result.output
        assert files(out) == before
    run(generate_cmd, [*args, "--steps", 1, "--seeds", "0-2"])  # same settings: resumes
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    run(generate_cmd, [*args, "--steps", 2, "--overwrite"])
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"]  # seed 2 went with the old ones
    assert json.loads((out / "vcdm-manifest.json").read_text())["settings"]["--steps"] == 2
    other = run(sample_cmd, ["--prior", models["prior"], "--image-model", models["image"], "--seeds", "0",
                             "--outdir", tmp_path / "s", "--prior-steps", 1, "--image-steps", 1])
    result = run(sample_cmd, ["--prior", models["prior"], "--image-model", models["image"], "--seeds", "0",
                              "--outdir", tmp_path / "s", "--prior-steps", 1, "--image-steps", 2], ok=False)
    assert "--steps 1, not 2" in result.output and str(tmp_path / "s" / "images") in result.output, other.output


def test_incomplete_files_redone_and_stale_temps_removed(models, tmp_path):
    out = tmp_path / "out"
    opts = SamplerOptions(num_steps=1)
    generate(models["uncond"], range(3), opts=opts, run=RunOptions(out, progress=False))
    good = (out / "000001.png").read_bytes()
    (out / "000001.png").write_bytes(good[:40])  # truncated by something else
    stale = [out / ".000002.png.k3j4.tmp", out / ".claim-000000"]
    for p in stale:
        p.write_bytes(b"x")
    again = generate(models["uncond"], range(3), opts=opts, run=RunOptions(out, progress=False))
    assert again.written == [1] and (out / "000001.png").read_bytes() == good
    assert not any(p.exists() for p in stale)
    prior = tmp_path / "prior"
    generate(models["prior"], range(2), opts=opts, run=RunOptions(prior, progress=False))
    (prior / "000000.pt").write_bytes((prior / "000000.pt").read_bytes()[:100])
    assert generate(models["prior"], range(2), opts=opts, run=RunOptions(prior, progress=False)).written == [0]


def test_samples_skip_the_fsync_and_a_file_a_power_cut_emptied_is_redone(models, tmp_path, monkeypatch):
    """Sample files are renamed into place without an fsync (the manifest keeps its fsync): a power cut can then leave
    a name with none of its bytes, which the next run finds incomplete and writes again."""
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(Path(f"/proc/self/fd/{fd}").readlink().name) or real(fd))
    out, opts = tmp_path / "out", SamplerOptions(num_steps=1)
    generate(models["uncond"], range(3), opts=opts, run=RunOptions(out, progress=False))
    assert synced and all(name.startswith(".vcdm-manifest.json.") for name in synced), synced
    good = (out / "000002.png").read_bytes()
    (out / "000002.png").write_bytes(b"")
    assert generate(models["uncond"], range(3), opts=opts, run=RunOptions(out, progress=False)).written == [2]
    assert (out / "000002.png").read_bytes() == good


def test_concurrent_runs_split_the_work(models, tmp_path):
    """A batch claimed by another live process is left to it: this run waits, then finds it done."""
    import threading

    from vcdm.generate.results import FolderLock, claim

    out, ref = tmp_path / "out", tmp_path / "ref"
    opts = SamplerOptions(num_steps=1)
    for folder in (ref, out):
        written = generate(models["uncond"], range(4), opts=opts, run=RunOptions(folder, 2, progress=False)).written
        assert sorted(written) == [0, 1, 2, 3]
    for png in out.glob("*.png"):
        png.unlink()
    result = {}
    lock = FolderLock(out, clean=False)  # "another process" is writing into the folder …
    with claim(out, 0, wait=False) as mine:  # … the batch of seeds 0-1
        assert mine
        worker = threading.Thread(target=lambda: result.update(r=generate(
            models["uncond"], range(4), opts=opts, run=RunOptions(out, 2, progress=False))))
        worker.start()
        deadline = time.monotonic() + 120
        while not (out / "000003.png").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / ".claim-000000").exists()  # not removed as stale: its owner is alive
        for seed in (0, 1):  # the other process finishes its batch
            shutil.copy(ref / f"{seed:06d}.png", out / f"{seed:06d}.png")
    lock.close()
    worker.join(120)
    assert sorted(result["r"].written) == [2, 3] and result["r"].generated == 2
    assert files(out) == files(ref)


@pytest.mark.slow
def test_two_processes_on_one_folder(models, tmp_path):
    """Two `vcdm generate` processes started together on one folder write each seed once between them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, str(REPO / "generate.py"), f"--network={models['uncond']}", f"--outdir={tmp_path / 'o'}",
           "--seeds=0-23", "--batch=1", "--steps=8", "--device=cpu", "--no-progress"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    counts = [int(re.search(r"(\d+) generated", o).group(1)) for o in outputs]
    assert sum(counts) == 24, outputs  # each seed once
    assert len(list((tmp_path / "o").glob("*.png"))) == 24


@pytest.mark.slow
def test_two_nodes_match_one(models, tmp_path):
    """Two torchrun launches joined by a c10d rendezvous on localhost ("two nodes", gloo): the same files as
    one process, and only global rank 0 writes the grid (each node runs in its own folder)."""
    import socket

    single = tmp_path / "single"
    run(generate_cmd, ["--network", models["uncond"], "--outdir", single, "--seeds", "0-6", "--batch", 2, *FAST])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    procs = []
    for node in ("a", "b"):
        (tmp_path / node).mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=vcdm-test",
               str(REPO / "generate.py"), f"--network={models['uncond']}", f"--outdir={tmp_path / 'multi'}",
               "--seeds=0-6", "--batch=2", *FAST, "--device", "cpu", "--no-progress", "--grid", "grid.png"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path / node, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert files(tmp_path / "multi") == files(single)
    grids = [node for node in ("a", "b") if (tmp_path / node / "grid.png").exists()]
    assert len(grids) == 1, outputs
