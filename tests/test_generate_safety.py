"""generate's waits and writes against a hostile or damaged results folder: FIFOs never block, links are never
followed out of the folder nor trusted as samples, tampered manifests give one line, and non-finite input
(embeddings read back, samples) is refused with the name of the file the user knows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from tiny_models import RES, run
from vcdm.checkpoints import CheckpointConfig, save_checkpoint
from vcdm.cli.generate import command as generate_cmd
from vcdm.data.structure import Structure
from vcdm.generate import GenerateError, RunOptions, SamplerOptions, generate
from vcdm.generate.files import read_tensors, write_png
from vcdm.generate.results import MANIFEST
from vcdm.nets import build_network
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import structure_preset

CLI = [sys.executable, "-c", "from vcdm.cli.main import cli; cli()"]
WALL_S = 60  # a blocking open would hang until killed: any finite bound catches it
ONE = SamplerOptions(num_steps=1)


def vcdm(*args: object) -> tuple[int, str]:
    """`vcdm ARGS` in a fresh process, killed after WALL_S (a hang fails the test instead of stalling it)."""
    start = time.monotonic()
    proc = subprocess.run([*CLI, *map(str, args), "--no-progress"], capture_output=True, text=True, timeout=WALL_S)
    assert time.monotonic() - start < WALL_S
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    return proc.returncode, output


def one_error(output: str) -> str:
    errors = [line for line in output.splitlines() if "Error" in line]
    assert len(errors) == 1 and errors[0].startswith("Error:"), output
    return errors[0]


def test_fifo_seed_file_does_not_block(models, tmp_path):
    out = tmp_path / "out"
    generate(models["uncond"], [0, 1], opts=ONE, run=RunOptions(out, progress=False))
    (out / "000001.png").unlink()
    os.mkfifo(out / "000001.png")
    status, output = vcdm("generate", "--network", models["uncond"], "--outdir", out, "--seeds", "0-1", "--steps", 1)
    assert status == 0 and "1 generated, 1 already there" in output, output
    assert (out / "000001.png").is_file() and not (out / "000001.png").is_symlink()


def test_fifo_observation_is_refused(models, tmp_path):
    obs = tmp_path / "obs"
    generate(models["prior"], [0], opts=ONE, run=RunOptions(obs, progress=False))
    os.mkfifo(obs / "000001.pt")
    status, output = vcdm("generate", "--network", models["image"], "--outdir", tmp_path / "img", "--seeds", "0-1",
                          "--steps", 1, "--load_obs_from", obs)
    assert status == 1 and "000001.pt is not a regular file" in one_error(output)


def test_planted_claim_link_is_not_followed(models, tmp_path):
    out, target = tmp_path / "out", tmp_path / "elsewhere" / "victim"
    target.parent.mkdir()
    generate(models["uncond"], [5], opts=ONE, run=RunOptions(out, progress=False))  # the folder and its manifest
    (out / "000005.png").unlink()
    (out / ".claim-000005").symlink_to(target)
    result = generate(models["uncond"], [5], opts=ONE, run=RunOptions(out, progress=False))
    assert result.written == [5] and not target.exists() and not os.path.lexists(out / ".claim-000005")


def test_claim_name_taken_by_a_link_is_one_line(tmp_path):
    from vcdm.generate.results import claim

    target = tmp_path / "victim"
    (tmp_path / ".claim-000007").symlink_to(target)
    with pytest.raises(GenerateError, match="claim name taken by a link"):
        with claim(tmp_path, 7, wait=False):
            pass
    assert not target.exists()


def test_symlinked_sample_is_not_trusted_nor_gridded(models, tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside.png"
    generate(models["uncond"], [0, 1], opts=ONE, run=RunOptions(out, progress=False))
    real = np.asarray(PIL.Image.open(out / "000001.png"))
    write_png(outside, np.full((RES, RES, 3), 255, np.uint8))  # a complete PNG, white
    (out / "000001.png").unlink()
    (out / "000001.png").symlink_to(outside)
    result = generate(models["uncond"], [0, 1], opts=ONE, run=RunOptions(out, progress=False, grid=tmp_path / "g.png"))
    assert result.written == [1] and not (out / "000001.png").is_symlink()
    assert np.array_equal(np.asarray(PIL.Image.open(out / "000001.png")), real)  # the sample again, not the link's
    assert (np.asarray(PIL.Image.open(outside)) == 255).all()  # the link's target was not written through
    grid = np.asarray(PIL.Image.open(tmp_path / "g.png"))
    assert np.array_equal(grid[:RES, RES:], real)


def test_symlinked_subdir_is_not_written_through(models, tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / "000000.png").write_bytes(b"the user's file")
    out.mkdir()
    (out / "000000").symlink_to(outside)
    with pytest.raises(GenerateError, match="a link inside the results folder"):
        generate(models["uncond"], [0], opts=ONE, run=RunOptions(out, progress=False, subdirs=True))
    result = run(generate_cmd, ["--network", models["uncond"], "--outdir", out, "--seeds", "0", "--steps", 1,
                                "--subdirs", "--overwrite"], ok=False)
    assert result.exit_code == 1 and "a link inside the results folder" in result.output
    assert (outside / "000000.png").read_bytes() == b"the user's file" and sorted(os.listdir(outside)) == ["000000.png"]


@pytest.mark.parametrize("manifest, problem", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format": 1, "settings": ["not", "a", "dict"]}), "no settings recorded"),
    (json.dumps([1, 2]), "holds list, expected an object"),
    ("x" * (2 << 20), "more than the 1,048,576 bytes"),
])
def test_tampered_manifest_is_one_line(models, tmp_path, manifest, problem):
    out = tmp_path / "out"
    generate(models["uncond"], [0], opts=ONE, run=RunOptions(out, progress=False))
    (out / MANIFEST).write_text(manifest)
    args = ["--network", models["uncond"], "--outdir", out, "--seeds", "0", "--steps", 1]
    result = run(generate_cmd, args, ok=False)
    line = one_error(result.output)
    assert result.exit_code == 1 and problem in line and MANIFEST in line and "--overwrite" in line
    assert "1 generated" in run(generate_cmd, [*args, "--overwrite"]).output


def test_deep_manifest_is_one_line_not_a_recursion_error(models, tmp_path):
    out = tmp_path / "out"
    generate(models["uncond"], [0], opts=ONE, run=RunOptions(out, progress=False))
    (out / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    status, output = vcdm("generate", "--network", models["uncond"], "--outdir", out, "--seeds", "0", "--steps", 1)
    assert status == 1 and "nested more than" in one_error(output) and "--overwrite" in output


def test_tampered_obs_manifest_only_loses_its_digest(models, tmp_path):
    from vcdm.generate.results import manifest_digest

    (tmp_path / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    assert manifest_digest(tmp_path) is None
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "fifo").rename(tmp_path / MANIFEST)
    assert manifest_digest(tmp_path) is None  # returned, not blocked


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_non_finite_or_huge_embedding_names_the_file(models, tmp_path, value):
    obs = tmp_path / "obs"
    generate(models["prior"], [0, 1], opts=ONE, run=RunOptions(obs, progress=False))
    emb = read_tensors(obs / "000001.pt")["embedding"]
    emb[3] = value
    torch.save([None, emb], obs / "000001.pt")
    result = run(generate_cmd, ["--network", models["image"], "--outdir", tmp_path / "img", "--seeds", "0-1",
                                "--steps", 1, "--load_obs_from", obs], ok=False)
    assert result.exit_code == 1 and f"{obs / '000001.pt'}: 'embedding' holds {value:g}" in result.output
    assert ".tmp" not in result.output and not list((tmp_path / "img").glob("*.png"))


def test_non_finite_samples_are_not_written(models, tmp_path, monkeypatch):
    import vcdm.generate.core as core

    monkeypatch.setattr(core, "denoise", lambda model, latents, *a, **k: torch.full_like(latents, float("nan")))
    out = tmp_path / "out"
    with pytest.raises(GenerateError, match="000000.png and 1 more: the sampler returned NaN/inf"):
        generate(models["uncond"], [0, 1], opts=ONE, run=RunOptions(out, progress=False))
    assert not list(out.glob("*.png"))


def test_failed_start_leaves_the_folder_as_it_was(models, tmp_path, monkeypatch):
    """A run that fails before writing a sample leaves no folder holding only its manifest: the folders it
    made are removed, an existing folder's manifest is put back byte for byte, and a folder with samples
    keeps them and its manifest."""
    import vcdm.generate.core as core

    done = tmp_path / "done"
    generate(models["uncond"], [0], opts=ONE, run=RunOptions(done, progress=False))
    emptied = tmp_path / "emptied"
    generate(models["uncond"], [0], opts=ONE, run=RunOptions(emptied, progress=False))
    (emptied / "000000.png").unlink()
    before = {folder: {p.name: p.read_bytes() for p in folder.iterdir()} for folder in (done, emptied)}
    monkeypatch.setattr(core, "denoise", lambda model, latents, *a, **k: torch.full_like(latents, float("nan")))
    new = tmp_path / "new" / "deeper" / "out"
    for outdir, opts in ((new, ONE), (emptied, SamplerOptions(num_steps=2)), (done, ONE)):
        with pytest.raises(GenerateError, match="NaN"):
            generate(models["uncond"], [0, 1], opts=opts, run=RunOptions(outdir, progress=False, subdirs=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "emptied"]
    assert {folder: {p.name: p.read_bytes() for p in folder.iterdir()} for folder in (done, emptied)} == before


def test_write_error_names_the_file_not_its_temp(tmp_path):
    (tmp_path / "000000.png").mkdir()  # a folder where the sample goes: the rename fails
    with pytest.raises(OSError) as info:
        write_png(tmp_path / "000000.png", np.zeros((RES, RES, 3), np.uint8))
    assert info.value.filename == str(tmp_path / "000000.png") and ".tmp" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["000000.png"]  # the temp file is gone


def joint_model(path: Path) -> Path:
    """A tiny random-weight concatunet that samples an image and its embedding jointly."""
    structure = Structure.from_flags({"image": (3, RES, RES), "embedding": (4,)}, "1,1", "0,0")
    cls, kwargs = structure_preset("concatunet", structure, augment_dim=0, cbase=16, cres=[1], dropout=0.0)
    torch.manual_seed(0)
    net = build_network(cls, kwargs)
    denoiser = Denoiser(net, structure)
    config = CheckpointConfig(cls, kwargs, denoiser.config(), structure.to_dict(),
                              data={"data_class": "CLIPDataset", "path": None, "resolution": RES, "label_dim": 0})
    save_checkpoint(path, {"net": net.state_dict(), "embedder": {}}, config)
    return path


def test_joint_model_keeps_its_embedding(tmp_path, one_thread):
    from vcdm import Pipeline

    network = joint_model(tmp_path / "joint.safetensors")
    out = tmp_path / "out"
    generate(network, [0, 1], opts=ONE, run=RunOptions(out, progress=False))
    assert sorted(p.name for p in out.iterdir() if p.name != MANIFEST) == ["000000.png", "000000.pt", "000001.png",
                                                                          "000001.pt"]
    saved = torch.load(out / "000001.pt", weights_only=True)
    assert saved[0] is None and saved[1].shape == (4,)  # the release's list form: image, embedding
    in_memory = Pipeline.from_checkpoint(network, device="cpu")([0, 1], steps=1, bf16=False)
    assert torch.equal(saved[1], torch.from_numpy(in_memory.embeddings[1]))
    (out / "000001.pt").unlink()  # a PNG without its embedding is not complete
    result = generate(network, [0, 1], opts=ONE, run=RunOptions(out, progress=False))
    assert result.written == [1] and torch.equal(torch.load(out / "000001.pt", weights_only=True)[1], saved[1])
