"""Tiny random-weight checkpoints (prior, image model, unconditional) and a CLI runner for generation tests;
the `models` fixture (conftest.py) writes a set of them once per module."""
from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner

from vcdm.checkpoints import CheckpointConfig, save_checkpoint
from vcdm.cli.variations import command as variations_cmd
from vcdm.data.structure import Structure
from vcdm.embedders import PixelPCA
from vcdm.nets import build_network
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import preset

REPO = Path(__file__).resolve().parents[1]
RES, EMB = 8, 8


def pixel_pca(seed: int, dim: int = EMB) -> PixelPCA:
    pca = PixelPCA(dim=dim, size=4, channels=3)
    pca.components.copy_(torch.randn(pca.components.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return pca


def write_model(path: Path, kind: str, *, embedder: PixelPCA | None = None, emb_dim: int = EMB, label_dim: int = 0,
                data_path: str | None = None) -> Path:
    """Tiny random-weight checkpoint. kind: prior (embedding | label?), image (image | embedding, label?), uncond."""
    names = {"image": (3, RES, RES), "embedding": (emb_dim,), **({"label": (label_dim,)} if label_dim else {})}
    lab = ",1" if label_dim else ""
    exist, observed = {"prior": ("0,1" + lab, "0,0" + lab), "image": ("1,1" + lab, "0,1" + lab),
                       "uncond": ("1,0", "0,0")}[kind]
    structure = Structure.from_flags(names, exist, observed)
    if kind == "prior":
        cls, kwargs = preset("dalle2", resolution=RES, channels=3, embed_dim=emb_dim, label_dim=structure.observed_dim,
                             augment_dim=0)
        kwargs.update(dim=32, depth=1, heads=2, dim_head=16)
    else:
        cls, kwargs = preset("ddpmpp", resolution=RES, channels=3, embed_dim=0, label_dim=structure.observed_dim,
                             augment_dim=0, cbase=16, cres=[1], dropout=0.0)
        kwargs.update(num_blocks=1, attn_resolutions=[])
    torch.manual_seed(len(str(path)))
    net = build_network(cls, kwargs)
    denoiser = Denoiser(net, structure)
    config = CheckpointConfig(cls, kwargs, denoiser.config(), structure.to_dict(),
                              embedder=embedder.identity() if embedder else None,
                              data={"data_class": "CLIPDataset", "path": data_path, "resolution": RES,
                                    "label_dim": label_dim})
    save_checkpoint(path, {"net": net.state_dict(), "embedder": embedder.export_state() if embedder else {}}, config)
    return path


def run(cmd, args, ok: bool = True):
    result = CliRunner().invoke(cmd, [str(a) for a in args] + ["--no-progress"] * (cmd is not variations_cmd))
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result
