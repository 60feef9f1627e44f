"""The edges a new user hits first: seed syntax and limits (CLI and API), strings where lists are expected,
devices, --class where it cannot apply, wording and exit codes. Command-line cases run as real processes:
one `Error:` line, no traceback, exit status 2 for a bad flag value, within a wall-time bound."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tiny_models import run, write_model
from vcdm.cli.generate import command as generate_cmd
from vcdm.cli.sample import command as sample_cmd
from vcdm.diffusion.settings import SamplerOptionError
from vcdm.fileio import IntRanges, parse_int_list
from vcdm.generate import Conditioning, RunOptions, SamplerOptions, generate
from vcdm.generate.options import MAX_SEEDS, FlagError, seed_list

CLI = [sys.executable, "-c", "from vcdm.cli.main import cli; cli()"]
WALL_S = 60  # a refused flag must not cost more than starting the interpreter and importing torch


def cli_error(*args: object, status: int = 2) -> str:
    """Run `vcdm ARGS` in a fresh process; assert one `Error:` line, no traceback, the exit status and the
    wall-time bound; return the error line."""
    start = time.monotonic()
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=WALL_S)
    took = time.monotonic() - start
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "Error" in line]
    assert proc.returncode == status, output
    assert "Traceback" not in output and len(errors) == 1 and errors[0].startswith("Error:"), output
    assert took < WALL_S
    return errors[0]


def test_int_ranges_are_lazy_and_exact():
    huge = IntRanges.parse("0-999999999999")
    assert len(huge) == 10**12 and huge[123456789012] == 123456789012 and huge[-1] == 999999999999
    assert huge[5:8] == [5, 6, 7] and str(huge[10**11:10**11 + 3]) == "100000000000-100000000002"
    mixed = IntRanges.parse("5,0-9,3-12,7")
    assert list(mixed.unique()) == [5, 0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]
    assert len(mixed) == 22 and mixed[10:13] == [9, 3, 4] and str(IntRanges.parse("1,2,3,7")) == "1-3,7"
    assert len(IntRanges.parse("0-999999999999,5").unique()) == 10**12  # no list was built


def test_parse_int_list_refuses_floats_bools_and_huge_lists():
    assert parse_int_list("1,0") == [1, 0] and parse_int_list([np.int64(3), 4]) == [3, 4]
    for bad in ([1.5, 2.7], [True, False]):
        with pytest.raises(TypeError, match="--exist: expected integers"):
            parse_int_list(bad, "--exist")
    with pytest.raises(ValueError, match="--exist: 1000000000 values; at most"):
        parse_int_list("0-999999999", "--exist")


def test_api_seeds_take_the_cli_syntax_or_a_type_error():
    assert seed_list("12") == [12] and seed_list("0-3") == [0, 1, 2, 3] and seed_list("3,1-2,3") == [3, 1, 2]
    assert seed_list(range(5)) == [0, 1, 2, 3, 4] and seed_list(np.arange(3)) == [0, 1, 2]
    assert seed_list([7, 7, 2]) == [7, 2] and seed_list(torch.tensor([4, 1])) == [4, 1]
    for bad, match in (([1.5, 2.7], "seeds: expected integers, got float 1.5"),
                       ([True, False], "seeds: expected integers, got the bool True"),
                       (16, r"one seed: \[16\]; 16 seeds: range\(16\)"), (2.0, "got float 2.0")):
        with pytest.raises(TypeError, match=match):
            seed_list(bad)
    for bad, match in (("0-999999999", f"1000000000 seeds; at most {MAX_SEEDS}"),
                       (range(10**9), "at most"), (range(0, 10**12, 2), "at most"),
                       ("1,x", "expected integers or ranges"), ([-1], "got -1"),
                       ([2**32], "0..4294967295"), ("", "expected integers"), ([], "no seeds")):
        with pytest.raises(FlagError, match=match):
            seed_list(bad)


def test_pipeline_takes_seed_text(models, one_thread):
    from vcdm import Pipeline

    pipe = Pipeline.from_checkpoint(models["uncond"], device="cpu")
    text, listed = pipe("2-3,0", steps=1), pipe([2, 3, 0], steps=1)
    assert text.seeds == [2, 3, 0] and np.array_equal(text.images, listed.images)
    with pytest.raises(TypeError, match="seeds: expected integers"):
        pipe([0.5], steps=1)
    with pytest.raises(FlagError, match="--steps: expected 1..10000"):
        pipe([0], steps=10**9)


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0-999999999999"], "seeds must lie in 0..4294967295"),
    (["--seeds", "99999999999999999999"], "got 99999999999999999999"),
    (["--seeds", "0-999999999"], f"1000000000 seeds; at most {MAX_SEEDS} per run"),
    (["--seeds", "1" * 500], "is not a usable integer"),
    (["--steps", "1000000000"], "--steps: expected 1..10000 steps"),
    (["--rho", "nan"], "--rho: expected a finite positive number, got nan"),
    (["--S_noise", "inf"], "--S_noise: expected a finite non-negative number, got inf"),
    (["--sigma_max", "inf"], "--sigma_max: expected a finite positive number"),
    (["--S_churn", "nan"], "--S_churn: expected a finite"),
    (["--device", "gpu"], "--device 'gpu': expected 'cpu', 'cuda' or 'cuda:N'"),
])
def test_generate_flag_limits_one_line(models, tmp_path, args, message):
    line = cli_error("generate", "--network", models["uncond"], "--outdir", tmp_path / "out", *args)
    assert message in line
    assert not (tmp_path / "out").exists()


def test_sampler_options_refuse_non_finite_values():
    assert SamplerOptions(S_max=float("inf")).S_max == float("inf")  # churn at every noise level: allowed
    for key in ("sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_noise", "guidance"):
        for value in (float("nan"), float("inf"), -1.0):
            with pytest.raises(SamplerOptionError, match=f"^{key}: expected a finite"):
                SamplerOptions(**{key: value})
    with pytest.raises(SamplerOptionError, match="^S_max: expected a finite"):
        SamplerOptions(S_max=float("nan"))
    with pytest.raises(SamplerOptionError, match="below sigma_max"):
        SamplerOptions(sigma_min=2.0, sigma_max=1.0)


def test_sample_class_on_unlabelled_models_is_refused(models, tmp_path):
    result = run(sample_cmd, ["--prior", models["prior"], "--image-model", models["image"], "--seeds", "0-1",
                              "--outdir", tmp_path / "o", "--class", 5], ok=False)
    assert result.exit_code == 2 and "--class: neither" in result.output and "conditioned on a class" in result.output
    assert not (tmp_path / "o").exists()
    from vcdm import TwoStagePipeline

    pipe = TwoStagePipeline.from_checkpoints(models["prior"], models["image"], device="cpu")
    with pytest.raises(FlagError, match="--class: neither model is conditioned"):
        pipe([0], class_idx=5, prior_steps=1, image_steps=1)


def test_class_must_agree_with_recorded_labels(models, tmp_path, one_thread):
    """--class with --load_obs_from: the prior's files record the label their embedding was sampled for."""
    image = write_model(tmp_path / "labelled-image.safetensors", "image", label_dim=3)
    obs = generate(models["cond_prior"], [0, 1], opts=SamplerOptions(num_steps=1), cond=Conditioning(class_idx=1),
                   run=RunOptions(tmp_path / "obs", progress=False)).outdir
    common = ["--network", image, "--seeds", "0-1", "--steps", 1, "--load_obs_from", obs]
    result = run(generate_cmd, [*common, "--outdir", tmp_path / "bad", "--class", 2], ok=False)
    assert result.exit_code == 2 and "--class 2:" in result.output and "000000.pt records label 1" in result.output
    assert not list((tmp_path / "bad").glob("*.png"))
    run(generate_cmd, [*common, "--outdir", tmp_path / "same", "--class", 1])  # the label recorded: fine
    assert len(list((tmp_path / "same").glob("*.png"))) == 2


def test_bad_flag_values_exit_2(models, tmp_path):
    result = run(generate_cmd, ["--network", models["uncond"], "--outdir", tmp_path / "o", "--class", 3], ok=False)
    assert result.exit_code == 2 and "--class: the model is not conditioned" in result.output
    result = run(generate_cmd, ["--network", models["cond_prior"], "--outdir", tmp_path / "o", "--class", 3], ok=False)
    assert result.exit_code == 2 and "--class: expected 0..2, got 3" in result.output


@pytest.mark.parametrize("device", ["gpu", "cpu:7", "cuda:x"])
def test_device_errors_name_the_argument(models, tmp_path, device):
    from vcdm import Pipeline
    from vcdm.distributed import DeviceError

    with pytest.raises(DeviceError, match=f"device '{device}': expected 'cpu', 'cuda' or 'cuda:N'"):
        Pipeline.from_checkpoint(models["uncond"], device=device)
    result = run(generate_cmd, ["--network", models["uncond"], "--outdir", tmp_path / "o", "--device", device],
                 ok=False)
    assert result.exit_code == 2 and f"--device '{device}': expected 'cpu', 'cuda' or 'cuda:N'" in result.output
    assert "checkpoint" not in result.output


def test_text_where_a_list_is_expected():
    import vcdm
    from vcdm.metrics import FeatureStats
    from vcdm.train.options import OptionError, TrainOptions

    assert TrainOptions(exist="0,1").exist == [0, 1] and TrainOptions(noise_mult="1,2.5").noise_mult == [1.0, 2.5]
    with pytest.raises(OptionError, match="--exist: expected comma-separated numbers like '0,1', got 'a,b'"):
        TrainOptions(exist="a,b")
    with pytest.raises(ValueError, match=r"got \['fid', 'x'\]"):
        vcdm.fid(np.zeros((2, 8, 8, 3), np.uint8), "unused.npz", metrics="fid,x")
    mu_sigma_only = FeatureStats(np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="but kid needs the features"):
        vcdm.fid(np.zeros((2, 8, 8, 3), np.uint8), mu_sigma_only, metrics="fid,kid")  # parsed as ['fid', 'kid']


@pytest.mark.parametrize("tune, field, value, line", [
    ("dmd", "gan_weight", -1.0, "--gan-weight: expected a weight >= 0 (0: no GAN term), got -1"),
    ("dmd", "gan_lr", 0.0, "--gan-lr: expected a positive lr, got 0"),
    ("dmd", "fake_lr", -1e-3, "--fake-lr: expected a positive lr, got -0.001"),
    ("dmd", "fake_updates", 0, "--fake-updates: expected at least 1, got 0"),
    ("dmd", "dmd_steps", 5, "--sampler-steps: expected 1..4, got 5"),
    ("dmd", "dmd_levels", [80.0, 1.0, 0.15], "--sampler-levels: 3 noise levels for 2 --sampler-steps; give one level "
     "per step (or leave the steps out)"),
    ("ect", "ect_q", 1.0, "--ect-q: expected a number > 1, got 1"),
    ("kd", "teacher_steps", 1, "--teacher-steps: expected at least 2, got 1"),
])
def test_tuning_options_name_the_flag_that_is_wrong(tune, field, value, line):
    """An API caller's TrainOptions gets the one flag at fault, not a list of every flag of its method."""
    from vcdm.train.options import OptionError, TrainOptions

    opts = TrainOptions(path="data.zip", observed="1,0", tune=tune, init="net.safetensors")
    opts.validate()
    setattr(opts, field, value)
    with pytest.raises(OptionError) as err:
        opts.validate()
    assert str(err.value) == line


def test_stage_flags_are_named_as_given(models, tmp_path):
    common = ["--prior", models["prior"], "--image-model", models["image"], "--seeds", "0", "--outdir", tmp_path / "o"]
    result = run(sample_cmd, [*common, "--image-steps", 10**9], ok=False)
    assert result.exit_code == 2 and "--image-steps: expected 1..10000" in result.output
    result = run(sample_cmd, [*common, "--prior-steps", 1, "--image-steps", 1, "--image-guidance", 2])
    assert "warning: --image-guidance 2: this model records no training settings" in result.output
    assert "warning: --guidance" not in result.output


def test_help_texts_name_the_current_options():
    from click.testing import CliRunner

    from vcdm.cli.fid import command as fid_cmd

    generate_help = CliRunner().invoke(generate_cmd, ["--help"]).output
    assert "every stage" not in generate_help and "per stage" not in generate_help
    assert "label dropout" not in generate_help
    assert "--cond-drop" in generate_help
    assert "for both stages" in CliRunner().invoke(sample_cmd, ["--help"]).output
    fid_help = " ".join(CliRunner().invoke(fid_cmd, ["calc", "--help"]).output.split())
    assert "the CPUs available per process, at most 8" in fid_help


@pytest.mark.parametrize("cpus, local_world_size, workers", [(2, None, 2), (64, None, 8), (64, "4", 8), (16, "4", 4),
                                                             (3, "8", 1)])
def test_default_workers_share_the_cpus_up_to_8(monkeypatch, cpus, local_world_size, workers):
    """One default for training, FID and the dataset tool: the CPUs this process may use, shared among
    torchrun's processes on the node, at least 1, at most 8."""
    from vcdm import workers as workers_mod

    monkeypatch.setattr(workers_mod.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    if local_world_size is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    assert workers_mod.default_workers() == workers


def test_embedding_cache_shows_progress(tmp_path, capsys):
    from types import SimpleNamespace

    from tiny_models import pixel_pca
    from vcdm.train.batches import embedding_table

    images = torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8)
    pca = pixel_pca(0)
    setup = SimpleNamespace(embedder=pca, dataset=images, data_key="k", cache_dir=tmp_path / "cache")
    table = embedding_table(setup, torch.device("cpu"), xflip=False)
    err = capsys.readouterr().err
    assert table.shape == (70, 8) and "Embedding the dataset for the cache in" in err and "70/70" in err
    assert torch.allclose(table, pca.embed(images.float() / 127.5 - 1))
    embedding_table(setup, torch.device("cpu"), xflip=False)
    assert "Embedding" not in capsys.readouterr().err  # read from the cache: nothing to show


@pytest.mark.slow
def test_training_prints_its_run_directory_before_embedding(tmp_path, data):
    from tiny_runs import PRIOR, base_args

    proc = subprocess.run([*CLI, "train", *base_args(data, tmp_path / "runs", *PRIOR, "--duration", "0.000004")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("Run directory:") == 1
    assert 0 <= proc.stdout.index("Run directory:") < proc.stdout.index("Embedding the dataset")


def test_sampler_refuses_non_finite_options_and_too_many_steps():
    from vcdm.diffusion.sampling import sample

    def denoiser(x, sigma, y=None):
        return x * 0

    latents = torch.zeros(1, 4)
    unchanged = sample(denoiser, latents, num_steps=2, S_max=float("inf"))  # EDM's default S_max: allowed
    assert torch.equal(unchanged, torch.zeros(1, 4, dtype=torch.float64))
    for options, match in ((dict(rho=float("nan")), "rho: expected a finite positive number, got nan"),
                           (dict(sigma_max=float("inf")), "sigma_max: expected a finite"),
                           (dict(num_steps=10**9), "num_steps: expected 1..10000")):
        with pytest.raises(ValueError, match=match):
            sample(denoiser, latents, **options)


def test_variations_count_is_bounded(models, tmp_path):
    line = cli_error("variations", "--image-model", models["image"], "--images", tmp_path / "in.png",
                     "--outdir", tmp_path / "v", "--n", 5000)
    assert "--n/--seeds: 5000 variations per input; at most 1024" in line
    line = cli_error("variations", "--image-model", models["image"], "--images", tmp_path / "in.png",
                     "--outdir", tmp_path / "v", "--n", 10**9)
    assert "--n/--seeds: 1000000000 seeds; at most 10000000" in line


@pytest.mark.parametrize("call, match", [("seed_list('0-999999999')", "1000000000 seeds; at most"),
                                         ("SamplerOptions(num_steps=10**9)", "num_steps: expected 1..10000")])
def test_seed_and_step_limits_allocate_nothing(call, match):
    """Refused before anything the size of the request exists (a list of 1e9 seeds took > 30 GB; 1e9 noise
    levels 8 GB): peak RSS within memory_probe's margin of a child that only imports torch and vcdm."""
    from memory_probe import expect_one_line_error, guarded

    expect_one_line_error(guarded("from vcdm.generate import SamplerOptions\nfrom vcdm.generate.options import "
                                  "seed_list", call, "ValueError"), match)


def test_two_stage_api_names_its_arguments(models):
    from vcdm import TwoStagePipeline

    pipe = TwoStagePipeline.from_checkpoints(models["prior"], models["image"], device="cpu")
    with pytest.raises(FlagError, match="^image_steps: expected 1..10000"):
        pipe([0], image_steps=10**9)
    with pytest.raises(FlagError, match="^prior_sampler dpm2m is deterministic: drop prior_S_churn/prior_S_min"):
        pipe([0], prior_sampler="dpm2m", prior_S_churn=5)
    with pytest.raises(TypeError, match="^image_rho: expected a number"):
        pipe([0], image_rho="x")


def test_variations_api_takes_one_path_and_seed_text(models, tmp_path):
    import PIL.Image

    from vcdm.generate import variations

    PIL.Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "cat.png")
    written = variations(models["image"], str(tmp_path / "cat.png"), "0-1", outdir=tmp_path / "v",
                         opts=SamplerOptions(num_steps=1))
    assert written == [tmp_path / "v" / "cat.png"]  # one input, not one per character of its path
    assert np.asarray(PIL.Image.open(written[0])).shape == (2 * 10, 2 * 10, 3)  # input + 2 variations, 1 px apart


@pytest.mark.slow
def test_fid_default_workers_fit_the_machine(tmp_path):
    """The default --workers never exceeds the CPUs available, so torch's DataLoader does not warn (with 3
    workers on a 2-core machine it warned twice)."""
    import PIL.Image

    from vcdm.metrics.inception import WEIGHTS_FILE, save_random_weights

    weights = save_random_weights(tmp_path / WEIGHTS_FILE)
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        PIL.Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i:06d}.png")
    proc = subprocess.run([*CLI, "fid", "ref", "--data", tmp_path / "imgs", "--dest", tmp_path / "ref.npz",
                           "--inception-weights", weights, "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, timeout=WALL_S)
    assert proc.returncode == 0 and (tmp_path / "ref.npz").is_file(), proc.stderr
    assert "warn" not in proc.stderr.lower(), proc.stderr
