"""The safetensors checkpoint format: CheckpointConfig, round trip, refusal of foreign, damaged and
hostile files (with bounded memory)."""
import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from memory_probe import expect_one_line_error, guarded
from vcdm.checkpoints import (SAFETENSORS_DTYPES, VERSION, CheckpointConfig, CheckpointError, load_checkpoint,
                              read_checkpoint_config, save_checkpoint, write_safetensors)
from vcdm.data.structure import Structure
from vcdm.nets import build_network, network_classes
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import preset


def _checkpoint(tmp_path, **extra):
    s = Structure.from_flags({"image": (3, 8, 8), "embedding": (6,)}, "1,1", "0,1")
    cls, kwargs = preset("ddpmpp", resolution=8, channels=3, embed_dim=0, label_dim=6, augment_dim=9,
                         cbase=8, cres=[1, 1])
    torch.manual_seed(0)
    den = Denoiser(build_network(cls, kwargs), s, pred_x0="0,1")
    config = CheckpointConfig.from_dict({"network": {"class": cls, "kwargs": kwargs}, "denoiser": den.config(),
                                         "structure": s.to_dict(), "embedder": {"name": "pixel-pca", "dim": 6},
                                         "data": {}, "training": {"lr": 1e-4}, **extra})
    path = tmp_path / "net.safetensors"
    save_checkpoint(path, {"net": den.net.state_dict(), "embedder": {"mean": torch.arange(6.0)}}, config)
    return path, den


def stored_config(path) -> dict:
    """The config as the file stores it: the JSON in its safetensors metadata."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["vcdm"])


@pytest.mark.determinism
def test_checkpoint_round_trip_rebuilds_identical_denoiser(tmp_path):
    path, den = _checkpoint(tmp_path)
    loaded, config, rest = load_checkpoint(path)
    assert config.training == {"lr": 1e-4} and config.embedder["dim"] == 6 and config.data_path is None
    assert torch.equal(rest["embedder"]["mean"], torch.arange(6.0))
    sd, sd2 = den.net.state_dict(), loaded.net.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x, y = torch.randn(2, 3 * 64), torch.randn(2, 6)
    den.eval()
    assert torch.equal(den(x, torch.tensor([0.5, 2.0]), y), loaded(x, torch.tensor([0.5, 2.0]), y))
    assert loaded.structure == den.structure and loaded.config() == den.config()


def test_loading_takes_the_files_tensors_without_initialising_weights(tmp_path, monkeypatch):
    """The network is built on the meta device only; half-precision weights come back as float32."""
    path, den = _checkpoint(tmp_path)
    tensors = load_file(path)
    config = read_checkpoint_config(path)
    half = {k: v.half() if k.startswith("net.") and v.is_floating_point() else v for k, v in tensors.items()}
    save_checkpoint(path, {"net": {k[4:]: v for k, v in half.items() if k.startswith("net.")},
                           "embedder": {"mean": half["embedder.mean"]}}, config)
    import vcdm.nets.layers as layers

    real = layers.weight_init
    monkeypatch.setattr(layers, "weight_init", lambda *a, **k: pytest.fail("weights drawn on a real device")
                        if torch.empty(0).device.type != "meta" else real(*a, **k))
    loaded, _, _ = load_checkpoint(path)
    for k, v in loaded.net.state_dict().items():
        assert v.device.type == "cpu" and v.dtype == den.net.state_dict()[k].dtype
        assert torch.equal(v, den.net.state_dict()[k].half().to(v.dtype))


def test_tampered_or_foreign_files_are_refused(tmp_path):
    path, _ = _checkpoint(tmp_path)
    tensors = load_file(str(path))
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, str(plain))
    with pytest.raises(CheckpointError, match="not a vcdm checkpoint"):
        read_checkpoint_config(plain)
    # weights swapped for another shape, config unchanged
    meta = {"vcdm": json.dumps(stored_config(path))}
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
        read_checkpoint_config(bad)
    # truncated file, pickle, missing file
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        load_checkpoint(trunc)
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match="import-edm"):
        read_checkpoint_config(pkl)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint_config(tmp_path / "absent.safetensors")


STORED = {"network": {"class": "SongUNet", "kwargs": {"img_resolution": 8, "in_channels": 3, "out_channels": 3}},
          "denoiser": {"kind": "edm", "sigma_data": 0.5, "noise_mult": [1.0, 1.0], "pred_x0": [0, 1]},
          "structure": {"names": ["image", "embedding"], "shapes": [[3, 8, 8], [6]], "exist": [1, 1], "observed": [0, 1]},
          "embedder": {"name": "pixel-pca", "dim": 6}, "data": {"path": "d.zip", "resolution": 8},
          "training": {"lr": 1e-4, "nimg": 12}, "sampler": {"name": "consistency", "num_steps": 2}, "note": "kept"}
STORED_SHA256 = "4742f2947b738692e61cc63c86344662d314a4d50ef2a8743829f3b112a6c63e"  # written by vcdm@a0e7180


@pytest.mark.determinism
def test_written_bytes_are_unchanged_since_the_config_was_typed(tmp_path):
    """The file a config and tensors make is byte for byte what vcdm wrote when configs were passed as dicts."""
    path = tmp_path / "net.safetensors"
    save_checkpoint(path, {"net": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.arange(3).half()},
                           "embedder": {"mean": torch.arange(6.0)}}, CheckpointConfig.from_dict(STORED))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == STORED_SHA256
    assert read_checkpoint_config(path).extra == {"note": "kept"} and stored_config(path)["note"] == "kept"
    with pytest.raises(TypeError, match="expected a CheckpointConfig"):
        save_checkpoint(path, {}, STORED)


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
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


# ------------------------------------------------------------------------------------------------
# CheckpointConfig: one schema for training and import, versioned.

def test_config_round_trips_and_keeps_unknown_entries(tmp_path):
    path, _ = _checkpoint(tmp_path, note="kept")
    config = read_checkpoint_config(path)
    assert config.version == VERSION and config.network == "SongUNet" and config.training == {"lr": 1e-4}
    assert config.extra == {"note": "kept"} and config.imported_from is None
    assert CheckpointConfig.from_dict(config.to_dict()) == config
    assert stored_config(path) == config.to_dict() and stored_config(path)["format"] == "vcdm-checkpoint"


def test_config_without_version_still_loads(tmp_path):
    """Checkpoints whose config has no version field (the first files) read as version 1."""
    path, den = _checkpoint(tmp_path)
    raw = stored_config(path)
    del raw["version"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={"vcdm": json.dumps(raw)})
    loaded, config, _ = load_checkpoint(old)
    assert config.version == 1 and loaded.config() == den.config()


@pytest.mark.parametrize("edit,match", [
    ({"version": VERSION + 1}, "newer than this vcdm"),
    ({"version": "1"}, "not a positive integer"),
    ({"network": {"class": "SongUNet"}}, "needs a 'class' name and 'kwargs'"),
    ({"denoiser": [1]}, "'denoiser' is list, expected a mapping"),
    ({"structure": {"names": ["image"]}}, "'structure' is malformed"),
    ({"structure": {"names": ["image"], "shapes": [[3, 100000, 100000]], "exist": [1], "observed": [0]}},
     "describes 30,000,000,000 values per sample"),
    ({"format": "other"}, "metadata format is 'other'"),
])
def test_bad_configs_are_refused_in_their_own_terms(tmp_path, edit, match):
    path, _ = _checkpoint(tmp_path)
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata={"vcdm": json.dumps({**stored_config(path), **edit})})
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(bad)
    assert str(err.value).startswith(str(bad)) and "--" not in str(err.value)


def test_training_and_import_write_the_same_schema():
    """Setup.config (training) goes through CheckpointConfig: same keys as an imported network's config."""
    from vcdm.train.build import Setup

    class Data:
        resolution, num_channels, label_dim, name = 8, 3, 0, "tiny"

    s = Structure.from_flags({"image": (3, 8, 8), "label": (0,)}, "1,0", "0,0")
    cls, kwargs = preset("ddpmpp", resolution=8, channels=3, embed_dim=0, label_dim=0, augment_dim=0,
                         cbase=8, cres=[1, 1])
    setup = Setup(Data(), None, s, Denoiser(torch.nn.Identity(), s), cls, kwargs, None, None, None, "")
    config = setup.config({"data_class": "ImageFolderDataset", "path": "d.zip", "lr": 1e-3})
    assert CheckpointConfig.from_dict(config.to_dict()) == config
    assert config.version == VERSION and config.network == cls and config.training["lr"] == 1e-3
    assert config.data_path == "d.zip" and config.makes_pixels and config.sampler is None
    assert set(config.to_dict()) == set(CheckpointConfig(cls, kwargs, {}, s.to_dict()).to_dict())


# ------------------------------------------------------------------------------------------------
# Hostile files: bounded memory, one-line errors.

def _huge_config_file(tmp_path):
    """A 2 KB file whose config describes a ~350M-parameter network and holds one small tensor."""
    s = Structure.from_flags({"image": (3, 256, 256), "label": (0,)}, "1,0", "0,0")
    cls, kwargs = preset("ddpmpp", resolution=256, channels=3, embed_dim=0, label_dim=0, augment_dim=9,
                         cbase=256, cres=[1, 2, 2, 2, 2, 2, 2])
    with torch.device("meta"):
        n = sum(p.numel() for p in build_network(cls, kwargs).parameters())
    config = CheckpointConfig(cls, kwargs, {"kind": "edm"}, s.to_dict())
    path = tmp_path / "huge-config.safetensors"
    save_checkpoint(path, {"net": {"map_noise.freqs": torch.zeros(4)}}, config)
    return path, n


@pytest.mark.slow
def test_tiny_file_describing_a_huge_network_fails_fast(tmp_path):
    path, n = _huge_config_file(tmp_path)
    assert n > 300_000_000 and path.stat().st_size < 4096
    code = guarded("from vcdm.checkpoints import CheckpointError, load_checkpoint",
                   f"load_checkpoint({str(path)!r})", "CheckpointError")
    expect_one_line_error(code, "more tensors than the file holds")


@pytest.mark.slow
def test_oversized_config_is_refused_before_parsing(tmp_path):
    """A config of 40 MB of JSON zeros (a 20M-item list once parsed) in an otherwise valid file."""
    path = tmp_path / "big-config.safetensors"
    save_file({"net.x": torch.zeros(1)}, str(path), metadata={"vcdm": "[" + "0," * 20_000_000 + "0]"})
    code = guarded("from vcdm.checkpoints import CheckpointError, load_checkpoint",
                   f"load_checkpoint({str(path)!r})", "CheckpointError")
    expect_one_line_error(code, "the vcdm config is 40,000,003 characters, more than the 4,194,304")


SMALL_NETS = {  # every network class, small: load_checkpoint checks files against a meta-device build
    "SongUNet": dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1, 2]),
    "DhariwalUNet": dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1, 2],
                         attn_resolutions=[4]),
    "PriorTransformer": dict(embed_dim=16, label_dim=4, dim=32, depth=2, heads=2, dim_head=16),
    "DALLE2Prior": dict(embed_dim=16, cond_dim=4, dim=32, depth=2, heads=2, dim_head=16),
    "FilmSongUNet": dict(img_resolution=8, in_channels=3, out_channels=3, cond_dim=4, model_channels=8,
                         channel_mult=[1, 2]),
    "ControlDhariwalUNet": dict(img_resolution=8, in_channels=3, out_channels=3, cond_dim=6, class_columns=[2, 4],
                                model_channels=8, channel_mult=[1, 2], attn_resolutions=[4]),
    "ConcatUNet": dict(shapes=[[3, 8, 8], [6]], observed=[False, True], model_channels=8, channel_mult=[1, 2]),
    "EDM2UNet": dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=8, channel_mult=[1, 2],
                     attn_resolutions=[4]),
}


@pytest.mark.parametrize("name", sorted(network_classes()))
def test_every_network_builds_on_the_meta_device_with_its_real_shapes(name):
    assert name in SMALL_NETS, f"add small constructor kwargs for {name} to SMALL_NETS"
    with torch.device("meta"):
        meta = build_network(name, SMALL_NETS[name]).state_dict()
    real = build_network(name, SMALL_NETS[name]).state_dict()
    assert {k: tuple(v.shape) for k, v in meta.items()} == {k: tuple(v.shape) for k, v in real.items()}


def test_written_files_are_what_safetensors_reads(tmp_path):
    """save_checkpoint's own writer: every dtype, 0-d, empty, transposed (non-contiguous) and memory-sharing
    tensors read back equal through safetensors' loader, with the metadata."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": (torch.randn(3, 5, generator=g) * 50).to(dtype) for i, dtype in enumerate(SAFETENSORS_DTYPES)}
    base = torch.randn(4, 6, generator=g)
    tensors.update(scalar=torch.tensor(2.5), empty=torch.zeros(0, 7), transposed=base.t(), row=base[1], whole=base)
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        write_safetensors(f, tensors, {"key": "value"})
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"key": "value"}
