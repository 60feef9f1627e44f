"""The Python API: the same bytes as the commands for the same seeds, options under the flags' names,
`vcdm.fid` numbers equal to `vcdm fid calc`'s, a light `import vcdm`, and the README example."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import vcdm
from tiny_models import REPO, pixel_pca, run, write_model
from vcdm.cli.generate import command as generate_cmd
from vcdm.cli.sample import command as sample_cmd
from vcdm.generate.files import read_png, read_tensors


def pngs(folder: Path) -> np.ndarray:
    return np.stack([read_png(p) for p in sorted(folder.glob("*.png"))])


def embeddings(folder: Path) -> np.ndarray:
    return np.stack([read_tensors(p)["embedding"].numpy() for p in sorted(folder.glob("*.pt"))])


@pytest.mark.parametrize("extra", [[], ["--image-sampler", "dpm2m", "--prior-S_churn", "10"],
                                   ["--preset", "fast", "--image-sampler", "edm"]])
@pytest.mark.determinism
def test_two_stage_pipeline_matches_sample_command(models, tmp_path, extra):
    run(sample_cmd, ["--prior", models["prior"], "--image-model", models["image"], "--seeds", "3,0-4", "--batch", 3,
                     "--prior-steps", 2, "--image-steps", 3, "--outdir", tmp_path / "cli", *extra])
    pipe = vcdm.TwoStagePipeline.from_checkpoints(models["prior"], models["image"], device="cpu")
    options = {k.lstrip("-").replace("-", "_"): float(v) if k.endswith("S_churn") else v
               for k, v in zip(extra[::2], extra[1::2])}
    out = pipe(seeds=[3, 0, 1, 2, 4], prior_steps=2, image_steps=3, batch=3, **options)
    assert out.seeds == [3, 0, 1, 2, 4] and out.images.dtype == np.uint8 and out.embeddings.dtype == np.float32
    order = [3, 0, 1, 2, 4]
    assert np.array_equal(out.images, pngs(tmp_path / "cli" / "images")[order])
    assert np.array_equal(out.embeddings, embeddings(tmp_path / "cli" / "embeddings")[order])
    pil = out.to_pil()
    assert len(pil) == 5 and np.array_equal(np.asarray(pil[1]), out.images[1])


def test_class_conditional_chain_matches(models, tmp_path):
    run(sample_cmd, ["--prior", models["cond_prior"], "--image-model", models["image"], "--seeds", "0-3", "--class", 1,
                     "--prior-steps", 2, "--image-steps", 2, "--outdir", tmp_path / "cli"])
    pipe = vcdm.TwoStagePipeline.from_checkpoints(models["cond_prior"], models["image"], device="cpu")
    out = pipe(seeds=range(4), prior_steps=2, image_steps=2, class_idx=1)
    assert np.array_equal(out.images, pngs(tmp_path / "cli" / "images"))
    assert (out.tensors["label"].argmax(1) == 1).all()


@pytest.mark.determinism
def test_pipeline_matches_generate_command(models, tmp_path):
    args = ["--seeds", "0-5", "--batch", 4, "--steps", 3, "--S_churn", 40, "--disc", "vp", "--solver", "euler"]
    run(generate_cmd, ["--network", models["uncond"], "--outdir", tmp_path / "u", *args])
    pipe = vcdm.Pipeline.from_checkpoint(models["uncond"], device="cpu")
    out = pipe(seeds=range(6), batch=4, steps=3, S_churn=40, disc="vp", solver="euler")
    assert np.array_equal(out.images, pngs(tmp_path / "u")) and out.embeddings is None
    # An image model conditioned on a prior's files: the same --load_obs_from seed rule (noise from seed + 1).
    run(generate_cmd, ["--network", models["prior"], "--outdir", tmp_path / "e", "--seeds", "0-5", "--steps", 2])
    run(generate_cmd, ["--network", models["image"], "--outdir", tmp_path / "i", "--seeds", "0-5", "--steps", 2,
                       "--load_obs_from", tmp_path / "e", "--increment_seeds", 1])
    prior = vcdm.Pipeline.from_checkpoint(models["prior"], device="cpu")(seeds=range(6), steps=2)
    assert prior.images is None and np.array_equal(prior.embeddings, embeddings(tmp_path / "e"))
    image = vcdm.Pipeline.from_checkpoint(models["image"], device="cpu")
    out = image(seeds=range(6), steps=2, load_obs_from=tmp_path / "e", increment_seeds=1)
    assert np.array_equal(out.images, pngs(tmp_path / "i"))


def test_pipeline_options_are_checked_under_their_own_names(models):
    pipe = vcdm.Pipeline.from_checkpoint(models["uncond"], device="cpu")
    with pytest.raises(TypeError, match="unknown option.*num_steps"):
        pipe(seeds=[0], num_steps=2)  # the flag's name is steps
    with pytest.raises(vcdm.pipeline.GenerateError, match="--steps"):
        pipe(seeds=[0], steps=0)
    two = vcdm.TwoStagePipeline.from_checkpoints(models["prior"], models["image"], device="cpu")
    with pytest.raises(TypeError, match="steps"):
        two(seeds=[0], steps=2)  # two stages: prior_steps / image_steps
    with pytest.raises(vcdm.pipeline.GenerateError, match="dimension mismatch"):
        vcdm.TwoStagePipeline.from_checkpoints(models["wide_prior"], models["image"])


def test_import_vcdm_is_light():
    code = "import sys, vcdm; assert 'torch' not in sys.modules, 'torch'; print(sorted(vcdm.__all__))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr
    for name in ("Pipeline", "TwoStagePipeline", "fid", "train", "TrainOptions"):
        assert name in proc.stdout


def test_sampling_imports_no_embedder_or_metric_library():
    """Sampling a checkpoint (the CLI's generate/sample and the pipelines) loads none of timm, open_clip,
    sklearn or matplotlib: timm alone added ~3 s to every few-step `vcdm sample` process."""
    heavy = ("timm", "open_clip", "sklearn", "matplotlib")
    code = (f"import sys, vcdm.generate, vcdm.pipeline, vcdm.cli.sample, vcdm.cli.generate; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)


def test_loading_and_sampling_a_checkpoint_does_not_import_torch_dynamo(tmp_path):
    """The shape check builds the recorded network on the meta device, where out-of-place arithmetic runs torch's
    Python meta kernels, whose first use imports torch._dynamo: 1.2 s of every `vcdm sample` process, gone
    while the networks' constructors do their arithmetic in place or on the CPU (vcdm.nets.layers)."""
    prior, image = write_model(tmp_path / "prior.safetensors", "prior"), write_model(tmp_path / "image.safetensors", "image")
    code = (f"import sys, vcdm; vcdm.TwoStagePipeline.from_checkpoints({str(prior)!r}, {str(image)!r}, device='cpu')"
            f"([0], prior_steps=2, image_steps=2); print('torch._dynamo' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0 and proc.stdout.strip() == "False", (proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> Path:
    from vcdm.metrics.inception import WEIGHTS_FILE, save_random_weights

    return save_random_weights(tmp_path_factory.mktemp("weights") / WEIGHTS_FILE)


@pytest.mark.slow
def test_fid_matches_fid_calc(tmp_path, inception, one_thread):
    from vcdm.cli.fid import command as fid_cmd
    from vcdm.generate.files import write_png

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        write_png(tmp_path / "imgs" / f"{i:06d}.png", img)
        write_png(tmp_path / "ref" / f"{i:06d}.png", 255 - img)
    common = ["--inception-weights", inception, "--workers", 0, "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(fid_cmd, [str(a) for a in ["ref", "--data", tmp_path / "ref", "--dest",
                                                           tmp_path / "ref.npz", "--metrics", "fid,kid", *common]])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(fid_cmd, [str(a) for a in ["calc", "--images", tmp_path / "imgs", "--ref",
                                                           tmp_path / "ref.npz", "--num", 3, "--metrics", "fid,kid",
                                                           *common]])
    assert result.exit_code == 0, result.output
    printed = dict(line.split() for line in result.stdout.splitlines())
    for source in (tmp_path / "imgs", images):
        scores = vcdm.fid(source, tmp_path / "ref.npz", metrics=["fid", "kid"], inception_weights=inception,
                          device="cpu")
        assert set(scores) == set(printed) and isinstance(scores["fid"], float) and scores["fid"] > 0
        for name, value in scores.items():
            assert f"{value:g}" == printed[name]


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    found = [b for b in blocks if "TwoStagePipeline.from_checkpoints" in b]
    if not found:
        pytest.skip("README.md has no Python API example yet")
    return found[0]


@pytest.mark.slow  # Inception-v3 on CPU
def test_readme_example_runs(tmp_path, monkeypatch, inception, one_thread):
    """The README's Python example as written, on tiny random-weight checkpoints at the paths it names."""
    code = readme_example()
    paths = dict(re.findall(r'"([\w./-]+\.(safetensors|npz))"', code))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VCDM_INCEPTION_WEIGHTS", str(inception))
    pca = pixel_pca(0)
    checkpoints = [p for p in paths if p.endswith(".safetensors")]
    assert len(checkpoints) == 2, code
    write_model(Path(checkpoints[0]), "prior", embedder=pca)
    write_model(Path(checkpoints[1]), "image", embedder=pca)
    for ref in (p for p in paths if p.endswith(".npz")):
        from vcdm.metrics import FeatureStats

        Path(ref).parent.mkdir(parents=True, exist_ok=True)
        gen = np.random.default_rng(0)
        FeatureStats(gen.normal(size=2048), np.eye(2048), 10, gen.normal(size=(10, 2048)).astype(np.float32)).save(ref)
    exec(compile(code, "README.md", "exec"), {})


def test_train_is_callable_with_typed_options(tmp_path, capsys):
    from vcdm.generate.files import write_png

    for i in range(2):
        write_png(tmp_path / f"{i}.png", np.full((8, 8, 3), i, np.uint8))
    options = vcdm.TrainOptions(path=str(tmp_path), data_class="CLIPDataset", embedder="pixel-pca", exist=[1, 1],
                                observed=[0, 1], dry_run=True, outdir=str(tmp_path / "runs"))
    assert vcdm.train(options) is None  # a dry run: prints what it would do, writes nothing
    assert "pixel-pca" in capsys.readouterr().out and not (tmp_path / "runs").exists()
    importlib.import_module("vcdm.train.loop")  # importing a submodule keeps vcdm.train callable
    assert callable(vcdm.train) and vcdm.train.TrainOptions is vcdm.TrainOptions
