"""The demo's figures: sample grids, real-vs-generated panels, loss curves.

matplotlib is imported where a plot is drawn: it is slow to import, and must select its Agg backend first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import PIL.Image
import torch

from vcdm.demo.training import read_stats
from vcdm.fileio import atomic_path, atomic_write
from vcdm.generate.files import make_grid


def tile(images: torch.Tensor, cols: int, scale: int = 4, pad: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) → an (H', W', 3) grid, each image enlarged `scale`x (nearest) with a grey border."""
    arr = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()
    if arr.shape[3] == 1:
        arr = arr.repeat(3, axis=3)
    arr = np.pad(arr, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=160)
    return make_grid(list(arr), cols)


def save_png(array: np.ndarray, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        PIL.Image.fromarray(array).save(f, format="PNG")


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _figure().close(fig)


def save_panels(panels: Sequence[tuple[str, torch.Tensor]], path: Path, cols: int = 8) -> None:
    """Side-by-side grids with titles (e.g. real vs generated)."""
    plt = _figure()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.0), dpi=100, squeeze=False)
    for ax, (title, images) in zip(axes[0], panels):
        ax.imshow(tile(images[:cols * cols], cols, scale=2, pad=1), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    _save_figure(fig, path)


def save_loss_curves(runs: Sequence[tuple[str, Path]], path: Path) -> None:
    """Training loss per tick of each run (from its stats.jsonl)."""
    plt = _figure()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.4), dpi=100, squeeze=False)
    for ax, (title, run_dir) in zip(axes[0], runs):
        pts = [(r["kimg"], r["loss"]) for r in read_stats(run_dir) if r.get("loss") is not None]
        if pts:
            ax.plot(*zip(*pts), marker=".")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("thousands of training images (kimg)")
        ax.set_ylabel("EDM loss per element")
        if pts and min(p[1] for p in pts) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)
