"""A tiny labelled EDM-format dataset, tiny network flags and a CLI runner for training tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
from click.testing import CliRunner

from vcdm.cli.train import command
from vcdm.data.archive import ArchiveWriter, archive_name, encode_png

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = ["--arch", "ddpmpp", "--cbase", "8", "--cres", "1,1"]
TINY_PRIOR = ["--arch", "dalle2", "--prior-dim", "32", "--prior-depth", "1"]
PRIOR = ["--exist", "0,1", "--observed", "0,0", *TINY_PRIOR, "--augment", "0"]


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
