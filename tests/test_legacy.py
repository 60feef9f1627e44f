"""Safe import of EDM / VCDM-release network pickles (vcdm.legacy, `vcdm import-edm`).

The pickles are built here in EDM's persistence format: persistent objects reduce to
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with the module's source in `meta`. Our
source is a payload that writes a marker file if anything ever executes it.
"""
from __future__ import annotations

import collections
import copyreg
import io
import math
import os
import pickle
import struct
import subprocess
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from edm_fakes import GEOMETRY, Persistent, SeedStructure, edm_form, edm_pickle, payload_src, tiny_net
from memory_probe import expect_one_line_error, guarded
from vcdm.checkpoints import load_checkpoint, save_checkpoint
from vcdm.cli.main import cli
from vcdm.data.structure import Structure
from vcdm.legacy import (LegacyError, UnsafePickleError, import_edm, load_legacy_pickle, load_pretrained,
                         read_pickle, to_vcdm)
from vcdm.legacy.unpickle import TORCH_MAGIC
from vcdm.nets.precond import Denoiser

def assert_state_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("save", ["pickle", "pickle0", "pickle2", "zip", "legacy"])
def test_import_edm_pickle_roundtrip(fake_modules, marker, save):
    src, dest = fake_modules / "edm.pkl", fake_modules / "edm.safetensors"
    net, kwargs = edm_pickle(src, marker, save=save)

    rec = load_legacy_pickle(src)
    assert (rec.release, rec.precond_class, rec.kind, rec.net_class) == ("edm", "VPPrecond", "vp", "SongUNet")
    block = read_pickle(src)["ema"].state["_modules"]["model"].state["_modules"]["enc"].state["_modules"]["8x8_block0"]
    assert block.class_name == "UNetBlock" and block.init_kwargs["skip_scale"] == math.sqrt(0.5)  # numpy scalar
    assert rec.net_kwargs == kwargs
    assert rec.num_parameters == sum(p.numel() for p in net.parameters())
    assert_state_equal(rec.state_dict, net.state_dict())

    import_edm(src, dest)
    denoiser, config, _ = load_checkpoint(dest)
    assert_state_equal(denoiser.net.state_dict(), net.state_dict())
    assert config.network == "SongUNet" and config.net_kwargs == {**config.net_kwargs, **kwargs}
    assert config.net_kwargs["channel_mult_emb"] == 4  # defaults written out
    den = config.denoiser
    assert (den["kind"], den["beta_d"], den["beta_min"], den["M"], den["epsilon_t"]) == ("vp", 18.0, 0.2, 1000, 1e-5)
    assert config.structure == {"names": ["image", "label"], "shapes": [[3, 8, 8], [0]],
                                "exist": [1, 0], "observed": [0, 0]}
    assert config.imported_from["file"] == "edm.pkl" and config.data["path"] == "datasets/tiny.zip"

    # Same function as the original network under the same preconditioning.
    reference = Denoiser(net.eval(), Structure.from_dict(config.structure), **config.denoiser)
    x, sigma = torch.randn(2, 3 * 8 * 8), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        assert torch.equal(denoiser(x, sigma), reference(x, sigma))
    assert not marker.exists()


@pytest.mark.parametrize("precond,kind", [("EDMPrecond", "edm"), ("VEPrecond", "ve")])
def test_precond_kinds_and_conditional(fake_modules, marker, precond, kind):
    src = fake_modules / "c.pkl"
    net, kwargs = edm_pickle(src, marker, precond=precond, label_dim=5, embedding_type="fourier",
                             channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1])
    config, state = to_vcdm(load_legacy_pickle(src))
    assert config.denoiser["kind"] == kind
    if kind == "ve":
        assert (config.denoiser["sigma_min"], config.denoiser["sigma_max"]) == (0.02, 100)
    else:
        assert config.denoiser["sigma_min"] is None and config.denoiser["sigma_max"] is None
    assert config.structure["exist"] == [1, 1] and config.structure["observed"] == [0, 1]
    assert config.structure["shapes"] == [[3, 8, 8], [5]]
    assert "map_noise.freqs" in state
    assert_state_equal(state, net.state_dict())


def test_retarget_unconditional_to_embedding(fake_modules, marker):
    src = fake_modules / "u.pkl"
    net, _ = edm_pickle(src, marker)
    structure = Structure.from_flags({"image": (3, 8, 8), "embedding": (7,)}, "1,1", "0,1")
    config, state = to_vcdm(load_legacy_pickle(src), structure=structure)
    assert config.net_kwargs["label_dim"] == 7 and config.data["data_class"] == "CLIPDataset"
    assert torch.equal(state["map_label.weight"], torch.zeros(16, 7))
    assert torch.equal(state["map_label.bias"], torch.zeros(16))
    # Zero map_label: the conditioning is ignored, the network computes what it did.
    save_checkpoint(fake_modules / "r.safetensors", {"net": state}, config)
    denoiser, _, _ = load_checkpoint(fake_modules / "r.safetensors")
    ref = Denoiser(net.eval(), Structure.from_flags({"image": (3, 8, 8), "label": (0,)}, "1,0", "0,0"), kind="vp",
                   beta_d=18.0, beta_min=0.2)
    x, s, y = torch.randn(2, 192), torch.tensor([1.0, 2.0]), torch.randn(2, 7)
    with torch.no_grad():
        assert torch.allclose(denoiser(x, s, y), ref(x, s), atol=1e-6)
    with pytest.raises(LegacyError, match="does not fit"):
        wrong_size = Structure.from_flags({"image": (3, 16, 16), "embedding": (7,)}, "1,1", "0,1")
        to_vcdm(load_legacy_pickle(src), structure=wrong_size)


def test_original_release_snapshot_imports_its_structure(fake_modules, marker):
    """The original release's snapshot: its EDMPrecond records the Structure and per-tensor options,
    the inner WrappedOriginalSongUNet derives image size and label_dim from it."""
    net, kwargs = tiny_net(label_dim=6)
    s = SeedStructure()
    s.__dict__.update(exist=np.array([1, 1], dtype=np.uint8), observed=np.array([0, 1], dtype=np.uint8),
                      latent=np.array([1, 0], dtype=np.uint8), shapes=[torch.Size([3, 8, 8]), torch.Size([6])],
                      is_onehot=[0, 0], names=["image", "embedding"])
    model_kwargs = {k: v for k, v in kwargs.items() if k not in GEOMETRY}
    src = payload_src(marker)
    inner = edm_form(net, src, dict(structure=s, softmax_onehot=False, **model_kwargs))
    inner.class_name = "WrappedOriginalSongUNet"
    pkw = dict(structure=s, pred_x0=(0,), noise_mult=(1.0, 2.0), pretrained_weights=None,
               model_type="WrappedOriginalSongUNet", use_fp16=False, softmax_onehot=False, **model_kwargs)
    state = dict(_parameters=collections.OrderedDict(), _buffers=collections.OrderedDict(), structure=s,
                 _modules=collections.OrderedDict(model=inner), _init_args=(), _init_kwargs=pkw,
                 sigma_min=0, sigma_max=float("inf"), sigma_data=0.5, use_fp16=False)
    path = fake_modules / "network-snapshot-000100.pkl"
    with open(path, "wb") as f:
        pickle.dump(dict(ema=Persistent("EDMPrecond", state, src), augment_pipe=None,
                         dataset_kwargs=dict(class_name="training.dataset.CLIPDataset", path="d.zip")), f)
    rec = load_legacy_pickle(path)
    assert rec.release == "vcdm" and rec.structure["exist"] == [1, 1] and rec.structure["shapes"] == [[3, 8, 8], [6]]
    config, state = to_vcdm(rec)
    assert config.net_kwargs == {**config.net_kwargs, **kwargs}
    assert config.structure == {"names": ["image", "embedding"], "shapes": [[3, 8, 8], [6]],
                                "exist": [1, 1], "observed": [0, 1]}
    assert config.denoiser["noise_mult"] == [1.0, 2.0] and config.denoiser["pred_x0"] == [0, 0]
    assert config.data["data_class"] == "CLIPDataset"
    assert_state_equal(state, net.state_dict())
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# Malicious and damaged files.

class Evil:
    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def payloads(marker):
    write = f"open({str(marker)!r}, 'w').write('ran')"
    touch = f"touch {marker}"
    return {
        "posix.system": pickle.dumps(Evil(os.system, touch)),
        "os.system": b"cos\nsystem\n(S'" + touch.encode() + b"'\ntR.",
        "builtins.eval": pickle.dumps(Evil(eval, write)),
        "builtins.exec": pickle.dumps(Evil(exec, write)),
        "subprocess.check_call": pickle.dumps(Evil(subprocess.check_call, ["touch", str(marker)])),
    }


@pytest.mark.parametrize("name", ["posix.system", "os.system", "builtins.eval", "builtins.exec",
                                  "subprocess.check_call"])
def test_code_payloads_refused_and_never_run(tmp_path, marker, name):
    blob = payloads(marker)[name]
    pickle.loads(blob)  # control: the payload is real
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "evil.pkl"
    path.write_bytes(blob)
    with pytest.raises(UnsafePickleError, match=f"'{name}'"):
        read_pickle(path)
    assert not marker.exists()


def test_payload_hidden_in_persistent_state_and_storage_blob(fake_modules, marker):
    src = payload_src(marker)
    exec(compile(src, "<control>", "exec"), {})  # control: running module_src would write the marker
    assert marker.exists()
    marker.unlink()
    touch = f"touch {marker}"
    hidden = dict(ema=Persistent("EDMPrecond", dict(_init_kwargs=dict(x=Evil(os.system, touch))), src))
    in_storage = dict(ema=Evil(torch.storage._load_from_bytes, pickle.dumps(Evil(os.system, touch))))
    called = Persistent("EDMPrecond", {}, src)
    called_record = b"ctraining.networks\nEvil\n(S'x'\ntR."  # an allowed record class called like a function
    for i, blob in enumerate([pickle.dumps(hidden), pickle.dumps(in_storage), pickle.dumps(called)]):
        (fake_modules / f"{i}.pkl").write_bytes(blob)
    with pytest.raises(UnsafePickleError, match="'posix.system'"):
        load_legacy_pickle(fake_modules / "0.pkl")
    with pytest.raises(UnsafePickleError, match="'posix.system'"):
        load_legacy_pickle(fake_modules / "1.pkl")
    with pytest.raises(LegacyError, match="no inner network"):  # module_src alone is inert
        load_legacy_pickle(fake_modules / "2.pkl")
    (fake_modules / "3.pkl").write_bytes(called_record)
    with pytest.raises(UnsafePickleError, match="calls 'training.networks.Evil' with arguments"):
        read_pickle(fake_modules / "3.pkl")
    (fake_modules / "4.pkl").write_bytes(b"cbuiltins\ngetattr\n(cbuiltins\ndict\nS'get'\ntR.")
    with pytest.raises(UnsafePickleError, match="'builtins.getattr'"):
        read_pickle(fake_modules / "4.pkl")
    (fake_modules / "5.pkl").write_bytes(pickle.dumps(copyreg._reconstructor))
    with pytest.raises(LegacyError):
        load_legacy_pickle(fake_modules / "5.pkl")
    stateful = Evil(collections.OrderedDict, state={"attr": 1})  # a real object given state (pickle's BUILD)
    (fake_modules / "6.pkl").write_bytes(pickle.dumps(Persistent("X", dict(_init_kwargs=dict(a=stateful)), src)))
    with pytest.raises(UnsafePickleError, match="sets the state of a OrderedDict"):
        read_pickle(fake_modules / "6.pkl")
    assert not marker.exists()


def test_damaged_pickles_give_one_line_errors(fake_modules, marker):
    good = fake_modules / "good.pkl"
    edm_pickle(good, marker)
    blob = good.read_bytes()
    cases = {"truncated.pkl": blob[: len(blob) // 2], "empty.pkl": b"", "text.pkl": b"hello, not a pickle\n",
             "trailing-cut.pkl": blob[:-1], "opcode.pkl": b"xyz"}
    for name, data in cases.items():
        (fake_modules / name).write_bytes(data)
        with pytest.raises(LegacyError, match=f"{name}: not a readable network pickle") as err:
            load_legacy_pickle(fake_modules / name)
        assert "\n" not in str(err.value)
    assert str(err.value).endswith("invalid pickle opcode b'x'")  # the last case
    zipped = fake_modules / "zip.pkl"
    edm_pickle(zipped, marker, save="zip")
    (fake_modules / "cut.pt").write_bytes(zipped.read_bytes()[:-300])
    with pytest.raises(LegacyError, match="cut.pt"):
        load_legacy_pickle(fake_modules / "cut.pt")
    with pytest.raises(LegacyError, match="no such file"):
        load_legacy_pickle(fake_modules / "missing.pkl")
    (fake_modules / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(LegacyError, match="expected EDM's dict"):
        load_legacy_pickle(fake_modules / "list.pkl")


def test_unsupported_networks_refused(fake_modules, marker):
    src = fake_modules / "i.pkl"
    edm_pickle(src, marker, precond="iDDPMPrecond")
    with pytest.raises(LegacyError, match="preconditioner 'iDDPMPrecond' is not supported"):
        to_vcdm(load_legacy_pickle(src))
    rec = load_legacy_pickle(src)
    rec.net_class = "training.networks.gsdm.GraphicallyStructuredModel"
    with pytest.raises(LegacyError, match="GraphicallyStructuredModel' has no vcdm equivalent"):
        to_vcdm(rec)


# ------------------------------------------------------------------------------------------------
# Hostile files that ask for memory or depth: one-line errors at baseline memory (in a subprocess).

def _read_in_subprocess(path, match):
    code = guarded("from vcdm.legacy import LegacyError, read_pickle", f"read_pickle({str(path)!r})", "LegacyError")
    return expect_one_line_error(code, match)


def _torch_stream(obj, numel):
    """torch's legacy stream format whose object holds one FloatStorage of ``numel`` elements (no data)."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if o == "STORAGE" else None

    buf = io.BytesIO()
    for header in (TORCH_MAGIC, 1001, {"little_endian": True}):
        pickle.dump(header, buf, protocol=2)
    Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _memo_amplifier(items=100_000, copies=2000):
    """A 230 KB pickle calling set() on one memoised 100k-item list 2000 times (~8 GB if unchecked)."""
    big = b"]q\x00(" + b"K\x00" * items + b"e0"
    calls = (b"h\x01h\x00\x85Ra") * copies
    return b"\x80\x02" + big + b"cbuiltins\nset\nq\x010]" + calls + b"."


HOSTILE_PICKLES = {
    # name: (file bytes, expected error)
    "bytearray-call": (b"\x80\x02cbuiltins\nbytearray\n\x8a\x05" + (3_700_000_000).to_bytes(5, "little") + b"\x85R.",
                       "bytearray called with something other than bytes"),
    "bytearray8": (b"\x80\x05\x96" + struct.pack("<Q", 3_700_000_000) + b".", "announces 3,700,000,000 bytes"),
    "binbytes8": (b"\x80\x04\x8e" + struct.pack("<Q", 5_000_000_000) + b".", "announces 5,000,000,000 bytes"),
    "storage-numel": (None, "a storage of 1,000,000,000 elements (4,000,000,000 bytes more) exceeds"),
    "memo-amplifier": (None, "data the pickle builds ("),
    "deep-tuple-key": (b"\x80\x02})" + b"\x85" * 1_000_000 + b"Ns.", "nested more than 100 levels"),
    "deep-list": (b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b".", "nested more than 100 levels"),
    "self-containing": (b"\x80\x02]q\x00h\x00a.", "contains itself"),
    "many-objects": (b"\x80\x02" + b"]" * 20_000_000 + b".", "objects the pickle builds (64 bytes more) exceeds"),  # 1.3 GB as lists
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HOSTILE_PICKLES))
def test_hostile_pickles_fail_in_one_line_with_bounded_memory(tmp_path, name):
    data, match = HOSTILE_PICKLES[name]
    if name == "storage-numel":
        data = _torch_stream({"ema": "STORAGE"}, 1_000_000_000)
    elif name == "memo-amplifier":
        data = _memo_amplifier()
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(data)
    assert path.stat().st_size < (21_000_000 if name == "many-objects" else 2_000_000)
    _read_in_subprocess(path, match)


@pytest.mark.slow
def test_deflate_bomb_in_torch_zip(tmp_path):
    """A torch.save-style zip whose storage member inflates to 1 GiB from ~1 MB."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            return ("storage", torch.FloatStorage, "0", "cpu", 1 << 28) if o == "STORAGE" else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"ema": "STORAGE"})
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        with zf.open("archive/data/0", "w", force_zip64=True) as member:
            zeros = bytes(1 << 20)
            for _ in range(1024):
                member.write(zeros)
    assert path.stat().st_size < 2_000_000
    _read_in_subprocess(path, "inflates to 1,073,741,824 bytes")


def test_import_edm_on_a_safetensors_file_says_what_it_is(tmp_path):
    path = tmp_path / "net.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata={"vcdm": "{}"})
    with pytest.raises(LegacyError, match="is a safetensors file .*not a pickle.*no import") as err:
        read_pickle(path)
    assert "protocol" not in str(err.value)
    res = CliRunner().invoke(cli, ["import-edm", str(path), str(tmp_path / "out.safetensors")])
    assert res.exit_code == 2 and "safetensors file" in res.output and "protocol" not in res.output


# ------------------------------------------------------------------------------------------------
# --pretrained_weights / --transfer

@pytest.mark.parametrize("fmt", ["pkl", "safetensors"])
def test_load_pretrained_zero_inits_map_label_and_freezes(fake_modules, marker, fmt):
    src = fake_modules / "u.pkl"
    source, _ = edm_pickle(src, marker)
    if fmt == "safetensors":
        import_edm(src, fake_modules / "u.safetensors")
        src = fake_modules / "u.safetensors"
    target, _ = tiny_net(label_dim=7, seed=1)
    report = load_pretrained(src, target, freeze=True)
    assert report.zero_init == ["map_label.bias", "map_label.weight"]
    sd, ref = target.state_dict(), source.state_dict()
    assert torch.count_nonzero(sd["map_label.weight"]) == 0 and torch.count_nonzero(sd["map_label.bias"]) == 0
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    trainable = sorted(n for n, p in target.named_parameters() if p.requires_grad)
    assert trainable == ["map_label.bias", "map_label.weight"]
    assert report.trainable == 16 * 7 + 16 and report.frozen == sum(p.numel() for p in source.parameters())

    unfrozen, _ = tiny_net(label_dim=7, seed=1)
    load_pretrained(src, unfrozen)
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_load_pretrained_refuses_mismatches(fake_modules, marker):
    src = fake_modules / "u.pkl"
    edm_pickle(src, marker)
    wider, _ = tiny_net(model_channels=32)
    with pytest.raises(LegacyError, match="differ in shape"):
        load_pretrained(src, wider)
    no_augment, _ = tiny_net(augment_dim=0)
    with pytest.raises(LegacyError, match="1 unexpected e.g. \\['map_augment.weight'\\]"):
        load_pretrained(src, no_augment)
    conditional = fake_modules / "c.pkl"
    edm_pickle(conditional, marker, label_dim=5)
    other_labels, _ = tiny_net(label_dim=7)
    with pytest.raises(LegacyError, match="map_label.weight"):
        load_pretrained(conditional, other_labels)
    (fake_modules / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(LegacyError, match="not a safetensors file"):
        load_pretrained(fake_modules / "junk.safetensors", other_labels)


# ------------------------------------------------------------------------------------------------

def test_import_edm_command_converts_and_refuses_overwrites_and_code(fake_modules, marker):
    src, dest = fake_modules / "edm.pkl", fake_modules / "out.safetensors"
    net, _ = edm_pickle(src, marker)
    runner = CliRunner()
    res = runner.invoke(cli, ["import-edm", str(src), str(dest)])
    assert res.exit_code == 0, res.output
    assert "VPPrecond (vp) wrapping SongUNet" in res.output
    assert f"parameters: {sum(p.numel() for p in net.parameters()):,}" in res.output
    mtime = dest.stat().st_mtime_ns
    res = runner.invoke(cli, ["import-edm", str(src), str(dest)])
    assert res.exit_code == 2 and "--overwrite" in res.output and dest.stat().st_mtime_ns == mtime
    assert runner.invoke(cli, ["import-edm", str(src), str(dest), "--overwrite"]).exit_code == 0
    bad = fake_modules / "bad.pkl"
    bad.write_bytes(payloads(marker)["os.system"])
    res = runner.invoke(cli, ["import-edm", str(bad), str(fake_modules / "bad.safetensors")])
    assert res.exit_code == 2 and "'os.system'" in res.output
    assert not (fake_modules / "bad.safetensors").exists() and not marker.exists()
    assert [p.name for p in fake_modules.iterdir() if p.name.endswith(".tmp")] == []
