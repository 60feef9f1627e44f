"""Fixtures shared by the test modules; plain helpers live in edm_fakes.py, tiny_models.py, tiny_runs.py and
memory_probe.py beside this file."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from edm_fakes import SeedStructure, reconstruct_stub
from tiny_models import pixel_pca, write_model
from tiny_runs import write_dataset


@pytest.fixture
def one_thread():
    """Tiny networks on a shared 2-core machine run fastest (and reproducibly) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fake_modules(monkeypatch, tmp_path):
    """Register `torch_utils.persistence` and `training.structure` so the pickler can name them."""
    tu, pers = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    pers._reconstruct_persistent_obj = reconstruct_stub
    training, tstruct = types.ModuleType("training"), types.ModuleType("training.structure")
    tstruct.Structure = SeedStructure
    for mod in (tu, pers, training, tstruct):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return tmp_path


@pytest.fixture
def marker(tmp_path):
    """A file that appears only if code embedded in a pickle ever runs."""
    path = tmp_path / "PAYLOAD_RAN"
    assert not path.exists()
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight checkpoints in the training-runs layout: two-stage pairs, mismatched priors."""
    root = tmp_path_factory.mktemp("runs")
    pca, other = pixel_pca(0), pixel_pca(1)
    snap = "network-snapshot-000000.safetensors"
    return {
        "prior": write_model(root / "training-runs" / "prior01" / snap, "prior", embedder=pca),
        "image": write_model(root / "training-runs" / "image01" / snap, "image", embedder=pca),
        "uncond": write_model(root / "training-runs" / "uncond01" / snap, "uncond"),
        "other_prior": write_model(root / "other" / snap, "prior", embedder=other),
        "wide_prior": write_model(root / "wide" / snap, "prior", embedder=pixel_pca(0, 16), emb_dim=16),
        "cond_prior": write_model(root / "cond" / snap, "prior", embedder=pca, label_dim=3),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A tiny labelled EDM-format dataset (two classes of 8x8 images) for training tests."""
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny.zip")


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a real file system of a given size (tmpfs): ``tmpfs("16k")`` → its path; skipped unless this
    process may mount (root). Unmounted afterwards."""
    mounts = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"tmpfs-{len(mounts)}"
        mnt.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                               capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
