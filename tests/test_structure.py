"""Structure (--exist/--observed) and the safetensors checkpoint format."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vcdm.checkpoints import CheckpointError, load_checkpoint, read_config, save_checkpoint
from vcdm.data.structure import Structure, StructureError
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import preset

SHAPES = {"image": (3, 4, 4), "embedding": (5,), "label": (2,)}


def _tensors(b=3):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(b, *s, generator=g) for k, s in SHAPES.items()}


@pytest.mark.parametrize("exist,observed,latent,obs", [
    ("1,1,0", "0,1,0", ("image",), ("embedding",)),
    ("0,1,1", "0,0,1", ("embedding",), ("label",)),
    ("0,1,0", "0,0,0", ("embedding",), ()),
    ("1,1,1", "0,1,1", ("image",), ("embedding", "label")),
    ("1,1,1", "1,0,0", ("embedding", "label"), ("image",)),
])
def test_flatten_unflatten_identity(exist, observed, latent, obs):
    s = Structure.from_flags(SHAPES, exist, observed)
    assert s.latent_names == latent and s.observed_names == obs
    t = _tensors()
    x = s.flatten_latent(t)
    assert x.shape == (3, sum(s.numel(n) for n in latent)) == (3, s.latent_dim)
    back = s.unflatten_latent(x)
    assert set(back) == set(latent) and all(torch.equal(back[n], t[n]) for n in latent)
    y = s.flatten_observed(t)
    if obs:
        assert y.shape == (3, s.observed_dim)
        assert all(torch.equal(v, t[n]) for n, v in s.unflatten_observed(y).items())
        # concatenation follows the data-class order
        assert torch.equal(y[:, : s.numel(obs[0])], t[obs[0]].reshape(3, -1))
    else:
        assert y is None and s.observed_dim == 0
    assert Structure.from_dict(json.loads(json.dumps(s.to_dict()))) == s


@pytest.mark.parametrize("exist,observed,message", [
    ("1,1", "0,1,0", "--exist"),
    ("1,1,0", "0,1", "--observed"),
    ("1,0,0", "0,1,0", "observed but --exist marks it as absent"),
    ("1,1,0", "1,1,0", "nothing left to generate"),
    ("1,x,0", "0,0,0", "0/1"),
    ("1,2,0", "0,0,0", "0/1"),
])
def test_bad_flags_give_clear_errors(exist, observed, message):
    with pytest.raises(StructureError, match=message):
        Structure.from_flags(SHAPES, exist, observed)


def test_flatten_checks_shapes_and_presence():
    s = Structure.from_flags(SHAPES, "1,1,0", "0,1,0")
    t = _tensors()
    with pytest.raises(StructureError, match="missing tensor 'embedding'"):
        s.flatten_observed({"image": t["image"]})
    with pytest.raises(StructureError, match="per-sample shape"):
        s.flatten_latent({"image": t["image"][:, :2]})
    with pytest.raises(StructureError, match="values per sample"):
        s.unflatten_latent(torch.zeros(3, 7))


def test_per_tensor_values_follow_seed_indexing():
    s = Structure.from_flags(SHAPES, "1,1,0", "0,1,0")
    assert s.tensor_values("0.5", "--noise_mult", 1.0) == (0.5, 0.5, 0.5)
    assert s.tensor_values("1,2,3", "--noise_mult", 1.0) == (1.0, 2.0, 3.0)
    v = s.per_tensor("2,3,4", "--noise_mult", 1.0)
    assert v.shape == (48,) and torch.all(v == 2)
    with pytest.raises(StructureError, match="--noise_mult"):
        s.tensor_values("1,2,3,4", "--noise_mult", 1.0)


def _checkpoint(tmp_path, **extra):
    s = Structure.from_flags({"image": (3, 8, 8), "embedding": (6,)}, "1,1", "0,1")
    cls, kwargs = preset("ddpmpp", resolution=8, channels=3, embed_dim=0, label_dim=6, augment_dim=9,
                         cbase=8, cres=[1, 1])
    from vcdm.nets import build_network

    torch.manual_seed(0)
    den = Denoiser(build_network(cls, kwargs), s, pred_x0="0,1")
    config = {"network": {"class": cls, "kwargs": kwargs}, "denoiser": den.config(), "structure": s.to_dict(),
              "embedder": {"name": "pixel-pca", "dim": 6}, "data": {}, "training": {"lr": 1e-4}, **extra}
    path = tmp_path / "net.safetensors"
    save_checkpoint(path, {"net": den.net.state_dict(), "embedder": {"mean": torch.arange(6.0)}}, config)
    return path, den


def test_checkpoint_round_trip_rebuilds_identical_denoiser(tmp_path):
    path, den = _checkpoint(tmp_path)
    loaded, config, rest = load_checkpoint(path)
    assert config["training"] == {"lr": 1e-4} and config["embedder"]["dim"] == 6
    assert torch.equal(rest["embedder"]["mean"], torch.arange(6.0))
    sd, sd2 = den.net.state_dict(), loaded.net.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x, y = torch.randn(2, 3 * 64), torch.randn(2, 6)
    den.eval()
    assert torch.equal(den(x, torch.tensor([0.5, 2.0]), y), loaded(x, torch.tensor([0.5, 2.0]), y))
    assert loaded.structure == den.structure and loaded.config() == den.config()


def test_tampered_or_foreign_files_are_refused(tmp_path):
    path, _ = _checkpoint(tmp_path)
    tensors = load_file(str(path))
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, str(plain))
    with pytest.raises(CheckpointError, match="not a vcdm checkpoint"):
        read_config(plain)
    # weights swapped for another shape, config unchanged
    meta = {"vcdm": json.dumps(read_config(path))}
    tensors["net.enc.8x8_conv.weight"] = torch.zeros(4, 3, 3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="differ in shape"):
        load_checkpoint(bad)
    del tensors["net.enc.8x8_conv.weight"]
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(bad)
    # edited metadata
    save_file(load_file(str(path)), str(bad), metadata={"vcdm": "{not json"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_config(bad)
    # truncated file, pickle, missing file
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        load_checkpoint(trunc)
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match="import-edm"):
        read_config(pkl)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_config(tmp_path / "absent.safetensors")


def test_save_is_atomic(tmp_path, monkeypatch):
    path, _ = _checkpoint(tmp_path)
    before = path.read_bytes()
    import vcdm.fileio

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vcdm.fileio.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        _checkpoint(tmp_path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
