"""User errors on outputs: every command checks its outputs before any work and reports permission, full
disk, name-too-long and parent-is-a-file errors as one `Error:` line naming the path — no traceback, no
partial file, and never on the same line as a progress bar."""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

from tiny_models import RES
from vcdm.cli.dataset import command as dataset_cmd
from vcdm.cli.fid import command as fid_cmd
from vcdm.cli.generate import command as generate_cmd
from vcdm.cli.sample import command as sample_cmd
from vcdm.cli.train import command as train_cmd
from vcdm.cli.variations import command as variations_cmd

LONG = "x" * 300


@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Path:
    """A folder that os.access calls unwritable (as a read-only folder would be for a non-root user)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve().is_relative_to(ro.resolve()):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return ro


def fsync(*args) -> None:
    """Fails as a full disk does (as os.fsync, or as a file's write)."""
    raise OSError(errno.ENOSPC, "No space left on device")


def full_disk_writes(monkeypatch) -> None:
    """Every write to a file opened by its descriptor (as atomic writes open their temp files) fails as on a full
    disk; unlike a failing fsync this reaches writes that skip the fsync (samples)."""
    real = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real(fd, mode, *args, **kwargs)
        if "w" in mode:
            f.write = fsync
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)


@pytest.fixture
def disk_full(monkeypatch) -> None:
    """Every atomic write fails as on a full disk (when it flushes the file to disk)."""
    monkeypatch.setattr(os, "fsync", fsync)


def invoke(cmd, *args) -> str:
    result = CliRunner().invoke(cmd, [str(a) for a in args])
    assert result.exit_code in (1, 2), result.output + repr(result.exception)
    assert "Traceback" not in result.output and not isinstance(result.exception, (OSError, RuntimeError))
    errors = [line for line in result.output.splitlines() if "Error:" in line]
    assert len(errors) == 1 and errors[0].startswith("Error:"), result.output  # never after a progress bar
    return errors[0]


def no_files(folder: Path) -> bool:
    return not folder.exists() or not [p for p in folder.rglob("*") if p.is_file() and p.name != "vcdm-manifest.json"]


def gen_args(models, *extra) -> list:
    return ["--network", models["uncond"], "--seeds", "0-1", "--steps", 1, *extra]


def test_generate_outputs_checked_before_work(models, tmp_path, read_only):
    out = read_only / "out"
    assert f"--outdir: cannot write {read_only}: permission denied" in invoke(generate_cmd, *gen_args(models, "--outdir", out))
    assert not out.exists()
    ok_dir = tmp_path / "ok"
    line = invoke(generate_cmd, *gen_args(models, "--outdir", ok_dir, "--grid", read_only / "grid.png"))
    assert "--grid" in line and "permission denied" in line and not ok_dir.exists()  # failed before sampling
    line = invoke(generate_cmd, *gen_args(models, "--outdir", tmp_path / LONG / "out"))
    assert "file name too long" in line and LONG in line
    (tmp_path / "file").write_text("")
    line = invoke(generate_cmd, *gen_args(models, "--outdir", tmp_path / "file" / "out"))
    assert "a parent is a file" in line and str(tmp_path / "file") in line
    line = invoke(generate_cmd, *gen_args(models, "--outdir", tmp_path / "g", "--grid", tmp_path / "file" / "g.png"))
    assert "--grid" in line and not (tmp_path / "g").exists()


@pytest.mark.parametrize("progress", ["--progress", "--no-progress"])
def test_generate_disk_full_gives_one_line_and_keeps_done_files(models, tmp_path, monkeypatch, progress):
    out = tmp_path / "out"
    result = CliRunner().invoke(generate_cmd, [str(a) for a in gen_args(models, "--outdir", out, "--seeds", "0")])
    assert result.exit_code == 0, result.output
    before = (out / "000000.png").read_bytes()
    full_disk_writes(monkeypatch)
    line = invoke(generate_cmd, *gen_args(models, "--outdir", out, "--batch", 1, progress))
    assert line == f"Error: cannot write {out / '000001.png'}: no space left on device"
    assert (out / "000000.png").read_bytes() == before and not (out / "000001.png").exists()
    assert not list(out.glob(".*.tmp"))
    line = invoke(generate_cmd, *gen_args(models, "--outdir", tmp_path / "new"))  # the manifest comes first
    assert line == f"Error: cannot write {tmp_path / 'new' / 'vcdm-manifest.json'}: no space left on device"
    assert no_files(tmp_path / "new")


def test_sample_write_failures_give_one_line_and_keep_done_files(models, tmp_path, read_only, monkeypatch):
    args = ["--prior", models["prior"], "--image-model", models["image"], "--seeds", "0-1", "--prior-steps", 1,
            "--image-steps", 1, "--no-progress"]
    assert "permission denied" in invoke(sample_cmd, *args, "--outdir", read_only / "s")
    line = invoke(sample_cmd, *args, "--outdir", tmp_path / "s", "--grid", read_only / "g.png")
    assert "--grid" in line and not (tmp_path / "s").exists()  # before the prior's stage
    done = CliRunner().invoke(sample_cmd, [str(a) for a in args + ["--outdir", tmp_path / "s", "--seeds", "0"]])
    assert done.exit_code == 0, done.output
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "s").rglob("*"))
    full_disk_writes(monkeypatch)
    line = invoke(sample_cmd, *args, "--outdir", tmp_path / "s")
    assert line == f"Error: cannot write {tmp_path / 's' / 'embeddings' / '000001.pt'}: no space left on device"
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "s").rglob("*")) == before  # nothing partial


def test_variations_write_failures_give_one_line_and_leave_no_files(models, tmp_path, read_only, disk_full):
    PIL.Image.fromarray(np.zeros((RES, RES, 3), np.uint8)).save(tmp_path / "in.png")
    args = ["--image-model", models["image"], "--images", tmp_path / "in.png", "--n", 1, "--steps", 1,
            "--device", "cpu"]
    assert "--outdir" in invoke(variations_cmd, *args, "--outdir", read_only / "v")
    line = invoke(variations_cmd, *args, "--outdir", tmp_path / "v")
    assert line == f"Error: cannot write {tmp_path / 'v' / 'in.png'}: no space left on device"
    assert no_files(tmp_path / "v")


def fake_inception(monkeypatch) -> None:
    """Skip Inception (only the writes matter here): statistics of nothing in particular."""
    import vcdm.metrics as metrics

    monkeypatch.setattr(metrics, "InceptionFeatures", lambda *a, **k: type("Net", (), {
        "weights_path": "none", "to": lambda self, device: self})())
    rng = np.random.default_rng(0)
    stats = metrics.FeatureStats(rng.normal(size=4), np.eye(4), 3, rng.normal(size=(3, 4)).astype(np.float32))
    monkeypatch.setattr(metrics, "compute_references", lambda *a, **k: {"inception": stats})


def test_fid_write_failures_give_one_line_naming_the_flag(tmp_path, read_only, monkeypatch):
    from vcdm.metrics import FeatureStats

    fake_inception(monkeypatch)
    for i in range(3):
        PIL.Image.fromarray(np.full((RES, RES, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
    FeatureStats(np.zeros(4), np.eye(4)).save(tmp_path / "ref.npz")
    common = ["--workers", 0, "--device", "cpu", "--no-progress"]
    line = invoke(fid_cmd, "ref", "--data", tmp_path, "--dest", read_only / "r.npz", *common)
    assert f"--dest: cannot write {read_only}: permission denied" in line
    line = invoke(fid_cmd, "calc", "--images", tmp_path, "--ref", tmp_path / "ref.npz", "--num", 3, "--json",
                  tmp_path / LONG, *common)
    assert "--json" in line and "file name too long" in line
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    line = invoke(fid_cmd, "ref", "--data", tmp_path, "--dest", tmp_path / "new.npz", *common)
    assert line == f"Error: cannot write {tmp_path / 'new.npz'}: no space left on device"
    line = invoke(fid_cmd, "calc", "--images", tmp_path, "--ref", tmp_path / "ref.npz", "--num", 3, "--json",
                  tmp_path / "s.json", *common)
    assert line == f"Error: cannot write {tmp_path / 's.json'}: no space left on device"
    assert not (tmp_path / "new.npz").exists() and not (tmp_path / "s.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_dataset_and_train_check_outputs_first(tmp_path, read_only):
    PIL.Image.fromarray(np.zeros((RES, RES, 3), np.uint8)).save(tmp_path / "a.png")
    line = invoke(dataset_cmd, "--source", tmp_path, "--dest", read_only / "d.zip")
    assert f"--dest: cannot write {read_only}: permission denied" in line
    assert "file name too long" in invoke(dataset_cmd, "--source", tmp_path, "--dest", tmp_path / f"{LONG}.zip")
    line = invoke(train_cmd, *train_args(tmp_path), "--outdir", read_only / "runs")
    assert f"--outdir: cannot write {read_only}: permission denied" in line
    assert not (read_only / "runs").exists()
    assert "file name too long" in invoke(train_cmd, *train_args(tmp_path), "--outdir", tmp_path / LONG)


def train_args(data: Path) -> list:
    return ["--path", data, "--data_class", "CLIPDataset", "--embedder", "pixel-pca", "--exist", "1,1", "--observed",
            "0,1", "--device", "cpu", "--workers", 0]


@pytest.mark.parametrize("command", ["sample", "variations"])
def test_bad_output_paths_fail_first(models, tmp_path, command):
    (tmp_path / "file").write_text("")
    PIL.Image.fromarray(np.zeros((RES, RES, 3), np.uint8)).save(tmp_path / "in.png")
    cmd, args = {
        "sample": (sample_cmd, ["--prior", models["prior"], "--image-model", models["image"], "--seeds", "0"]),
        "variations": (variations_cmd, ["--image-model", models["image"], "--images", tmp_path / "in.png"]),
    }[command]
    assert "file name too long" in invoke(cmd, *args, "--outdir", tmp_path / LONG)
    assert "a parent is a file" in invoke(cmd, *args, "--outdir", tmp_path / "file" / "out")
    assert "is a file, not a directory" in invoke(cmd, *args, "--outdir", tmp_path / "file")


def test_generate_on_a_really_full_disk(models, tmpfs):
    """Seeds until the disk is full: one line naming the file, and every file left is complete."""
    tiny_disk = tmpfs("16k")
    from vcdm.generate.results import complete

    out = tiny_disk / "out"
    line = invoke(generate_cmd, *gen_args(models, "--outdir", out, "--seeds", "0-19", "--batch", 1, "--no-progress"))
    assert re.fullmatch(rf"Error: cannot write {out}/\d{{6}}\.png: no space left on device", line), line
    pngs = sorted(out.glob("*.png"))
    assert pngs and all(complete(p) for p in pngs) and not list(out.glob(".*.tmp"))
