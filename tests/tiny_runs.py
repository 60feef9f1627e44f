"""A tiny labelled EDM-format dataset, tiny network flags, a CLI runner (in process, or train.py in a
subprocess through TRAIN_DRIVER) and loss-injection and state helpers for training tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
from click.testing import CliRunner

from vcdm.cli.train import command
from vcdm.data.archive import ArchiveWriter, archive_name, encode_png
from vcdm.train import build as build_mod
from vcdm.train.state import load_state

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = ["--arch", "ddpmpp", "--cbase", "8", "--cres", "1,1"]
TINY_PRIOR = ["--arch", "dalle2", "--prior-dim", "32", "--prior-depth", "1"]
PRIOR = ["--exist", "0,1", "--observed", "0,0", *TINY_PRIOR, "--augment", "0"]
# train.py as a job script runs it, after `{patch}` (code injecting a failure) has run in the process.
TRAIN_DRIVER = """
import sys
{patch}
from vcdm.cli.main import run_click
from vcdm.cli.train import command
sys.argv[0] = "train.py"
run_click(command, "train.py")
"""


def write_dataset(dest: Path, n: int = 16, res: int = 8, seed: int = 0) -> Path:
    """Two classes of noisy red / green images, with labels, as an EDM-format zip."""
    rng = np.random.default_rng(seed)
    labels = []
    with ArchiveWriter(dest) as w:
        for i in range(n):
            c = i % 2
            img = np.full((res, res, 3), 30, np.uint8)
            img[..., c] = 200
            img = np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)
            w.write(archive_name(i), encode_png(PIL.Image.fromarray(img)))
            labels.append([archive_name(i), c])
        w.write_labels(labels)
    return dest


def base_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--path", str(data), "--data_class", "CLIPDataset", "--embedder", "pixel-pca", "--pca-dim", "8",
            "--workers", "0", "--device", "cpu", "--outdir", str(out), "--seed", "1", "--batch", "4",
            "--tick", "0.004", "--lr-rampup", "0", *extra]


def run(args: list[str], code: int = 0):
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def run_dir(out: Path) -> Path:
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def last_state(d: Path) -> dict:
    """The training state whose name sorts last in run folder `d`."""
    return load_state(sorted(d.glob("training-state-*.pt"))[-1])


def assert_same_weights(a: dict, b: dict) -> None:
    """Two training states hold bit-identical network and EMA weights."""
    for group in ("net", "ema"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"{group}.{k} differs"


def on_loss_call(monkeypatch, action=None, *, start: int = 1, stop: int | None = None, scale: float = 1.0):
    """Run `action()` before every loss evaluation from the `start`-th to the `stop`-th, and multiply
    those losses by `scale` (nan: divergence)."""
    real, count = build_mod.make_loss, {"n": 0}

    def make_loss(*args):
        loss = real(*args)

        def wrapped(*a, **k):
            count["n"] += 1
            hit = count["n"] >= start and (stop is None or count["n"] <= stop)
            if hit and action is not None:
                action()
            return loss(*a, **k) * (scale if hit else 1.0)
        return wrapped

    monkeypatch.setattr(build_mod, "make_loss", make_loss)
