"""Hostile files through every reader (issue 19): each is refused with one ``Error:`` line, no traceback,
within a wall-time bound and within ``memory_probe.EXTRA_MIB`` of a torch-only child's peak memory.

Each case runs in a fresh interpreter (see memory_probe.py); the child prints the error, or ``no error``,
and, for reads timed on their own, ``@@ <seconds>`` at the end of its error line.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import time
import warnings
import zipfile
import zlib

import pytest
import torch

from memory_probe import EXTRA_MIB, baseline_mib, guarded, run_read
from vcdm.safeload import JSONFileError, TorchFileError, load_json, load_torch_zip
from vcdm.train.outputs import save_state
from vcdm.train.state import StateError, load_state, newest_valid_state


def expect_refusal(code: str, match: str, *, seconds: float = 60.0) -> str:
    """Run ``code`` in a probed child; check that it exits with status 1 (2: a click usage error), its last
    line is its only ``Error:`` line and contains ``match``, no traceback is printed (other lines may be
    progress bars, usage lines, the run directory), its peak RSS is within EXTRA_MIB of the baseline and
    it ends within ``seconds``. Returns the error line."""
    start = time.perf_counter()
    rc, lines, rss = run_read(code)
    elapsed = time.perf_counter() - start
    errors = [line for line in lines if line.startswith("Error: ")]
    assert rc in (1, 2) and len(errors) == 1 and lines[-1] == errors[0], (rc, lines[-8:])
    assert not any("Traceback" in line for line in lines) and match in errors[0], errors[0]
    base = baseline_mib()
    assert rss < base + EXTRA_MIB, f"peak RSS {rss:.0f} MiB, baseline {base:.0f} MiB: {errors[0]}"
    assert elapsed < seconds, f"{elapsed:.1f} s: {errors[0]}"
    print(f"peak RSS {rss:.0f} MiB (baseline {base:.0f}), {elapsed:.1f} s: {errors[0][:150]}")
    return errors[0]


def timed_call(imports: str, call: str, error: str) -> str:
    """Child code timing the expression ``call`` alone and printing ``error`` exceptions as one line
    ending in ``@@ <seconds>``."""
    return (f"import sys, time\n{imports}\nstart = time.perf_counter()\ntry:\n    {call}\n"
            f"except {error} as e:\n    print('Error:', e, '@@', round(time.perf_counter() - start, 3))\n"
            "    sys.exit(1)\nprint('no error')\n")


def cli_call(*args: str) -> str:
    """Child code running the ``vcdm`` CLI as a user would (click prints ``Error: ...`` and exits 1)."""
    return f"from vcdm.cli.main import cli\ncli({list(args)!r})\n"


def seconds_of(line: str) -> float:
    return float(line.rsplit("@@", 1)[1])


# ------------------------------------------------------------------------------------------------
# Pickles (vcdm.legacy.limits): the budget is charged before the walk, so memo references stay linear.

def memo_references(n: int) -> bytes:
    """A pickle passing a list of ``n`` references to one ``n``-item list to OrderedDict (~1.2 MB for 400k):
    sizing the argument in full before charging it walked n*n items."""
    return (b"\x80\x02ccollections\nOrderedDict\n" + b"]q\x00(" + b"N" * n + b"e" + b"]q\x01("
            + b"h\x00" * n + b"e" + b"\x85R.")


@pytest.mark.slow
def test_memo_references_to_one_large_list_are_refused_in_linear_time(tmp_path):
    path = tmp_path / "memo.pkl"
    path.write_bytes(memo_references(400_000))
    line = expect_refusal(timed_call("from vcdm.legacy import LegacyError, read_pickle",
                                     f"read_pickle({str(path)!r})", "LegacyError"),
                          "data the pickle builds")
    assert seconds_of(line) < 2.0, line  # 0.46 s here; quadratic, it ran for hours


# ------------------------------------------------------------------------------------------------
# torch.save archives (vcdm.safeload): training states and --load_obs_from files.

def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return type(a) is type(b) and a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def test_torch_zip_reader_gives_what_torch_load_gives(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    value = {"view": base[1:, ::2], "base": base, "param": torch.nn.Parameter(torch.ones(2)),
             "od": torch.nn.Linear(2, 3).state_dict(), "bf16": torch.ones(2, dtype=torch.bfloat16),
             "long": torch.tensor([2 ** 40]), "bool": torch.tensor([True]), "empty": torch.zeros(0, 5),
             "dtype": torch.float16, "size": torch.Size([2, 3]), "nested": [None, (1, 2.5, "x"), {7: -(2 ** 70)}],
             "optimizer": torch.optim.Adam([torch.nn.Parameter(torch.ones(3))]).state_dict()}
    torch.save(value, tmp_path / "a.pt")
    loaded = load_torch_zip(tmp_path / "a.pt")
    assert same(loaded, torch.load(tmp_path / "a.pt", weights_only=True)) and same(loaded["view"], base[1:, ::2])
    assert loaded["view"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()


def pickle_with_storage(numel: int, extra: bytes = b"") -> bytes:
    """torch.save's data.pkl for ``{"x": <float tensor of numel elements on storage "0">}``."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj == "STORAGE" else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"x": "STORAGE"})
    return buf.getvalue()[:-1] + extra + b"." if extra else buf.getvalue()


def torch_zip(path, members: dict, compression=zipfile.ZIP_STORED, **kw) -> os.PathLike:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            if isinstance(data, int):  # that many zero bytes, streamed
                with zf.open(f"archive/{name}", "w", force_zip64=True) as member:
                    for _ in range(data >> 20):
                        member.write(bytes(1 << 20))
            else:
                zf.writestr(f"archive/{name}", data, **kw)
    return path


@pytest.mark.parametrize("members,match", [
    ({"data.pkl": pickle_with_storage(10 ** 9), "data/0": bytes(16)}, "claims 1,000,000,000 elements"),
    ({"data.pkl": pickle_with_storage(4)}, "has no member archive/data/0"),
    ({"data.pkl": b"\x80\x02cbuiltins\neval\n."}, "names 'builtins.eval'"),
    ({"data.pkl": b"\x80\x02ctorch.nn.modules.linear\nLinear\n)R."}, "names 'torch.nn.modules.linear.Linear'"),
    ({"data.pkl": b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93."}, "opcode STACK_GLOBAL"),
    ({"data.pkl": b"\x80\x02h\x05."}, "memo entry 5"),
    ({"data.pkl": b"\x80\x02]" + b"]" * 1_200_000 + b"."}, "objects data.pkl builds"),
])
def test_torch_zip_reader_checks_before_torch_allocates(tmp_path, members, match):
    path = torch_zip(tmp_path / "x.pt", members)
    with pytest.raises(TorchFileError, match=match):
        load_torch_zip(path)


def test_torch_zip_reader_refuses_what_torch_save_never_writes(tmp_path):
    good = {"data.pkl": pickle_with_storage(4), "data/0": bytes(16)}
    torch_zip(tmp_path / "bz2.pt", good, zipfile.ZIP_BZIP2)
    with pytest.raises(TorchFileError, match="compression method 12"):
        load_torch_zip(tmp_path / "bz2.pt")
    raw = bytearray((tmp_path / "bz2.pt").read_bytes())
    (tmp_path / "bad.pt").write_bytes(raw[:-30])
    with pytest.raises(TorchFileError, match="no zip directory"):
        load_torch_zip(tmp_path / "bad.pt")
    torch.save([1], tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(TorchFileError, match="no zip directory"):
        load_torch_zip(tmp_path / "legacy.pt")
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(TorchFileError, match="not a regular file"):
        load_torch_zip(tmp_path / "fifo.pt")


@pytest.mark.slow
def test_deflated_storage_claiming_a_gigabyte_is_refused_with_bounded_memory(tmp_path):
    path = torch_zip(tmp_path / "state.pt", {"data.pkl": pickle_with_storage(1 << 28), "data/0": 1 << 30},
                     zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 2_000_000
    code = guarded("from vcdm.train.state import StateError, load_state", f"load_state({str(path)!r})", "StateError")
    expect_refusal(code, "members inflate to 1,073,741,")


@pytest.mark.slow
def test_millions_of_list_opcodes_are_refused_with_bounded_memory(tmp_path):
    """4 MB of one-byte list opcodes: 260 MB of lists if built (20 M of them took 1.3 GB)."""
    path = torch_zip(tmp_path / "000000.pt", {"data.pkl": b"\x80\x02" + b"]" * 4_000_000 + b"."})
    code = guarded("from vcdm.generate.files import read_tensors", f"read_tensors({str(path)!r})", "ValueError")
    expect_refusal(code, "objects data.pkl builds")


# ------------------------------------------------------------------------------------------------
# JSON sidecars.

def write_state(path, nimg: int) -> None:
    save_state(path, {"net": {}, "ema": {}, "optimizer": {}, "counters": {"nimg": nimg}})


@pytest.mark.parametrize("text,match", [("[]", "holds list, expected an object"),
                                        ("[" * 30_000 + "]" * 30_000, "nested more than 32 levels"),
                                        ("[" * 40 + "]" * 40, "nested more than 32 levels"),
                                        (" " * 70_000, "more than the 65,536 bytes"),
                                        ("{\"size\": 1" + "0" * 5000 + "}", "not valid JSON"),
                                        ('{"size": 1, "nimg": [1]}', "1 bytes, its sidecar records")])
def test_tampered_state_sidecar_is_skipped_with_a_warning(tmp_path, text, match):
    write_state(tmp_path / "training-state-000000.pt", 0)
    write_state(tmp_path / "training-state-000004.pt", 4000)
    (tmp_path / "training-state-000004.pt.json").write_text(text)
    with pytest.raises(StateError, match=match):
        load_state(tmp_path / "training-state-000004.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, state = newest_valid_state([tmp_path])
    assert path.name == "training-state-000000.pt" and state["counters"]["nimg"] == 0
    assert len(caught) == 1 and "training-state-000004.pt" in str(caught[0].message)


def test_json_reader_refuses_oversized_and_non_regular_files(tmp_path):
    (tmp_path / "a.json").write_text('{"a": [1, {"b": null}]}')
    assert load_json(tmp_path / "a.json", 100, dict) == {"a": [1, {"b": None}]}
    with pytest.raises(JSONFileError, match="more than the 10 bytes"):
        load_json(tmp_path / "a.json", 10)
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(JSONFileError, match="not a regular file"):
        load_json(tmp_path / "fifo.json", 100)


# ------------------------------------------------------------------------------------------------
# Checkpoint configs against their tensors, image headers (vcdm variations).

def png_header(width: int, height: int) -> bytes:
    """A PNG of a signature, an IHDR chunk claiming width x height RGB and IEND: a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.fixture
def image_model(tmp_path):
    from tiny_models import pixel_pca, write_model

    return write_model(tmp_path / "image.safetensors", "image", embedder=pixel_pca(0))


def with_config(path, edit) -> os.PathLike:
    """The checkpoint at ``path`` rewritten with ``edit(config)`` as its config (tensors unchanged)."""
    from vcdm.checkpoints import load_tensors, read_checkpoint_config, save_checkpoint

    config, tensors = read_checkpoint_config(path), load_tensors(path)
    edit(config)
    save_checkpoint(path, tensors, config)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("size,match", [(12000, "'mean' should be (432000000,), got (48,)"),
                                        (100000, "'mean' should be (30000000000,), got (48,)")])
def test_embedder_config_is_checked_against_its_tensors_before_allocating(tmp_path, image_model, size, match):
    """size 12000 reached 15.9 GB before the error; 100000 gave a RuntimeError traceback."""
    with_config(image_model, lambda c: c.embedder["config"].update(size=size))
    (tmp_path / "in.png").write_bytes(b"")
    code = cli_call("variations", "--image-model", str(image_model), "--images", str(tmp_path / "in.png"),
                    "--outdir", str(tmp_path / "out"), "--device", "cpu")
    expect_refusal(code, match)


def test_embedder_identity_of_the_wrong_types_is_one_error():
    from vcdm.embedders import EmbedderError, load_embedder

    for identity in ([], {"name": "pixel-pca", "config": []}, {"name": "pixel-pca", "dim": 10 ** 30,
                                                               "config": {"size": 4, "channels": 3, "whiten": 1}},
                     {"name": "pixel-pca", "dim": 4, "post": [1], "base": {}, "config": {}}):
        with pytest.raises(EmbedderError):
            load_embedder(identity, {})


@pytest.mark.slow
def test_variations_refuses_an_image_header_claiming_100000_squared(tmp_path, image_model):
    (tmp_path / "huge.png").write_bytes(png_header(100_000, 100_000))
    code = cli_call("variations", "--image-model", str(image_model), "--images", str(tmp_path / "huge.png"),
                    "--outdir", str(tmp_path / "out"), "--device", "cpu", "--steps", "2")
    expect_refusal(code, "huge.png")


# ------------------------------------------------------------------------------------------------
# FID reference .npz files (vcdm.metrics.stats).

def npy(array=None, *, dtype="<f4", shape=None) -> bytes:
    """An .npy file of ``array``, or just the header of one of ``dtype`` and ``shape`` (data streamed later)."""
    import numpy as np

    buf = io.BytesIO()
    if array is not None:
        np.save(buf, array)
    else:
        np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def reference(path, *, mu=None, sigma=None, features=None, zeros: tuple[str, int] | None = None) -> os.PathLike:
    """An .npz with D=4 statistics, entries replaced as given; ``zeros``: (header, size) of a deflated
    'features' member of that many zero bytes after its header."""
    import numpy as np

    arrays = {"mu": np.zeros(4) if mu is None else mu, "sigma": np.eye(4) if sigma is None else sigma}
    if features is not None:
        arrays["features"] = features
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, value in arrays.items():
            zf.writestr(f"{name}.npy", npy(value))
        if zeros is not None:
            with zf.open("features.npy", "w", force_zip64=True) as member:
                member.write(zeros[0])
                for _ in range(zeros[1] >> 20):
                    member.write(bytes(1 << 20))
    return path


def test_reference_npz_checks_dtypes_shapes_and_values(tmp_path):
    import numpy as np
    from vcdm.metrics.stats import FeatureStats, StatsError

    ok = FeatureStats.load(reference(tmp_path / "ok.npz", features=np.ones((3, 4), np.float32)))
    assert ok.num == 3 and np.array_equal(ok.sigma, np.eye(4))
    cases = {"str": ({"features": np.array([["a"] * 4] * 3)}, "'features' holds <U1 values"),
             "int": ({"mu": np.zeros(4, np.int64)}, "'mu' holds int64 values"),
             "shape": ({"sigma": np.eye(5)}, "'sigma' has shape [5, 5], expected (D, D) with D from 'mu' (4)"),
             "nan-mu": ({"mu": np.array([0, np.nan, 0, 0])}, "'mu' holds non-finite values"),
             "inf-sigma": ({"sigma": np.diag([1, 1, np.inf, 1])}, "'sigma' holds non-finite values")}
    for name, (arrays, match) in cases.items():
        with pytest.raises(StatsError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            FeatureStats.load(reference(tmp_path / f"{name}.npz", **arrays))


@pytest.mark.slow
def test_deflated_reference_features_are_refused_before_reading(tmp_path):
    """A ~1 MB .npz whose 'features' member inflates to 1 GiB (a 2 MB one took +1.9 GB)."""
    path = reference(tmp_path / "ref.npz", zeros=(npy(shape=(1 << 26, 4)), 1 << 30))
    assert path.stat().st_size < 2_000_000
    (tmp_path / "images").mkdir()
    expect_refusal(cli_call("fid", "calc", "--images", str(tmp_path / "images"), "--ref", str(path)),
                   "array 'features' (1,073,741,824 bytes more) exceeds")


@pytest.mark.slow
def test_reference_of_string_features_is_refused_before_the_inception_pass(tmp_path):
    import numpy as np

    path = reference(tmp_path / "ref.npz", features=np.array([["x"] * 4] * 2))
    (tmp_path / "images").mkdir()
    expect_refusal(cli_call("fid", "calc", "--images", str(tmp_path / "images"), "--ref", str(path),
                            "--metrics", "fid,kid"), "'features' holds <U1 values", seconds=30)


# ------------------------------------------------------------------------------------------------
# Dataset zips (vcdm.data.archive): damaged zips, oversized PNG chunks, huge labels, worker errors.

def dataset_zip(path, labels=None) -> os.PathLike:
    from tiny_runs import write_dataset

    write_dataset(path, n=4)
    if labels is not None:  # the same images with dataset.json replaced
        with zipfile.ZipFile(path) as src:
            members = {n: src.read(n) for n in src.namelist() if n != "dataset.json"}
        members["dataset.json"] = '{"labels": [' + ", ".join(f'["00000/img{i:08d}.png", {v}]'
                                                             for i, v in enumerate(labels)) + "]}"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    return path


def damaged(path, how: str, image: int = 0) -> os.PathLike:
    """``path`` with its central directory broken, or image ``image`` flagged encrypted or deflate64."""
    data = bytearray(path.read_bytes())
    start = data.find(b"PK\x01\x02")
    if how == "central-directory":
        data[start:start + 2] = b"XX"
    else:
        at = start
        while data[at + 46:at + 46 + struct.unpack("<H", data[at + 28:at + 30])[0]] != f"00000/img{image:08d}.png".encode():
            n, extra, comment = struct.unpack("<3H", data[at + 28:at + 34])
            at += 46 + n + extra + comment
        if how == "encrypted":
            data[at + 8] |= 1
        else:  # deflate64: method 9, which Python's zipfile does not implement
            data[at + 10:at + 12] = struct.pack("<H", 9)
    path.write_bytes(data)
    return path


DAMAGED = {"central-directory": "(Bad magic number for central directory)",
           "encrypted": "is encrypted, password required", "deflate64": "compression method is not supported"}


@pytest.mark.slow
@pytest.mark.parametrize("how", list(DAMAGED))
@pytest.mark.parametrize("entry", ["dataset info", "dataset convert", "train", "fid calc"])
def test_damaged_dataset_zips_give_one_line(tmp_path, how, entry):
    import numpy as np
    from tiny_runs import PRIOR, base_args
    from vcdm.metrics.stats import FeatureStats

    path = damaged(dataset_zip(tmp_path / "data.zip"), how)
    args = {"dataset info": ["dataset", "info", str(path)],
            "dataset convert": ["dataset", "--source", str(path), "--dest", str(tmp_path / "out.zip")],
            "train": ["train", *base_args(path, tmp_path / "runs", *PRIOR, "--duration", "0.001")],
            "fid calc": ["fid", "calc", "--images", str(path), "--ref", str(tmp_path / "ref.npz"), "--workers", "2"]}
    FeatureStats(np.zeros(4), np.eye(4)).save(tmp_path / "ref.npz")
    expect_refusal(cli_call(*args[entry]), DAMAGED[how])


@pytest.mark.slow
def test_png_chunk_of_a_gibibyte_in_a_small_zip_is_refused(tmp_path):
    """A 1 MB dataset zip whose PNG carries a 1 GiB private chunk was accepted, at +1.97 GB."""
    import numpy as np
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="png")
    png = buf.getvalue()
    ihdr_end = 8 + 25
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("00000/img00000000.png", "w", force_zip64=True) as member:
            member.write(png[:ihdr_end] + struct.pack(">I", 1 << 30) + b"prVt")
            for _ in range(1024):
                member.write(bytes(1 << 20))
            member.write(b"\0" * 4 + png[ihdr_end:])
    assert (tmp_path / "bomb.zip").stat().st_size < 2_000_000
    expect_refusal(cli_call("dataset", "--source", str(tmp_path / "bomb.zip"), "--dest", str(tmp_path / "out.zip")),
                   "goes on past the 16,777,216 bytes")


@pytest.mark.slow
def test_label_of_400_digits_gives_one_line(tmp_path):
    path = dataset_zip(tmp_path / "data.zip", labels=["[" + "9" * 400 + "]"] * 4)
    expect_refusal(cli_call("dataset", "info", str(path)), "label 0 holds a value that is not a finite number")


def test_label_checks_take_huge_integers():
    from vcdm.data.archive import DatasetError, check_labels

    check_labels([[1, 2.5], [-(2 ** 100), 1e38]], "d")
    for labels in ([[10 ** 400]], [[2 ** 128]], [[float("inf")]]):
        with pytest.raises(DatasetError, match="not a finite number"):
            check_labels(labels, "d")
    with pytest.raises(DatasetError, match="label 0 is 1000"):
        check_labels([10 ** 400], "d")


def test_dataset_error_from_a_worker_keeps_its_message(tmp_path):
    """torch re-raises a worker's exception as its type built from "Caught ... Original Traceback ..."."""
    from torch.utils.data import DataLoader
    from vcdm.data.archive import DatasetError
    from vcdm.data.dataset import ImageDataset

    path = damaged(dataset_zip(tmp_path / "data.zip"), "encrypted", image=3)
    dataset = ImageDataset(path)  # reads image 0
    with pytest.raises(DatasetError) as caught:
        list(DataLoader(dataset, num_workers=1))
    assert str(caught.value).startswith(f"cannot read {path}:00000/img00000003.png: File ") and \
        "encrypted" in str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------------
# Importing pickles applies the checkpoint loader's sample-size limit (vcdm.legacy.limits.check_sample_size).

@pytest.mark.slow
def test_edm_pickle_of_a_huge_resolution_is_refused_before_building(fake_modules, marker, tmp_path, monkeypatch):
    """img_resolution 12000 (tiny weights: a SongUNet's parameters do not grow with it) reached 4 GB."""
    import edm_fakes
    from vcdm.nets.songunet import SongUNet

    def huge_net(label_dim=0, seed=0):
        kwargs = dict(img_resolution=12000, in_channels=3, out_channels=3, label_dim=label_dim, **edm_fakes.TINY)
        return SongUNet(**kwargs), kwargs

    monkeypatch.setattr(edm_fakes, "tiny_net", huge_net)
    edm_fakes.edm_pickle(tmp_path / "big.pkl", marker)
    expect_refusal(cli_call("import-edm", str(tmp_path / "big.pkl"), str(tmp_path / "big.safetensors")),
                   "samples hold 432,000,000 values, more than the 16,777,216")
    assert not marker.exists() and not (tmp_path / "big.safetensors").exists()


def test_sample_size_check_refuses_huge_or_malformed_shapes():
    from vcdm.legacy.limits import check_sample_size
    from vcdm.legacy.records import LegacyError

    check_sample_size([(3, 1024, 1024), (512,), (0,)], "f")
    for shapes, match in (([(3, 4097, 4097)], "50,356,227 values"), ([(3, 2048, 2048)] * 2, "25,165,824 values"),
                          ([(3, "8", 8)], "not a list of sizes"), ([(3, -1, 8)], "not a list of sizes"), ([7], "not a list")):
        with pytest.raises(LegacyError, match=match):
            check_sample_size(shapes, "f")


# ------------------------------------------------------------------------------------------------
# training_options.json of a resumed run (vcdm.train.options.TrainOptions.from_dict, safeload.load_json).

@pytest.mark.slow
@pytest.mark.parametrize("text,match", [("[]", "recorded options are list, expected an object"),
                                        ("[" * 100_000 + "]" * 100_000, "nested more than 32 levels deep"),
                                        ('{"batch": "8"}', "recorded option 'batch' is \"8\", expected int"),
                                        ('{"tick": null}', "recorded option 'tick' is null, expected float"),
                                        (" " * (1 << 21), "more than the 1,048,576 bytes")])
def test_tampered_training_options_give_one_line(tmp_path, text, match):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "training_options.json").write_text(text)
    expect_refusal(cli_call("train", "--resume", str(tmp_path / "run")), match)


def test_recorded_options_are_type_checked():
    from vcdm.train.options import OptionError, TrainOptions

    recorded = TrainOptions(batch=8, cres=[1, 2], ema_std=[0.05]).to_dict()
    assert TrainOptions.from_dict(recorded) == TrainOptions(batch=8, cres=[1, 2], ema_std=[0.05])
    assert TrainOptions.from_dict({"exist": "0,1", "lr": 2}).exist == [0, 1]  # older vcdm; ints pass as floats
    for bad in ({"exist": [1, "a"]}, {"fp16": 1}, {"batch": 8.0}, {"batch": True}, {"desc": 3}):
        with pytest.raises(OptionError, match=f"recorded option '{next(iter(bad))}'"):
            TrainOptions.from_dict(bad)


# ------------------------------------------------------------------------------------------------
# Cases beyond the list.

@pytest.mark.slow
def test_fifo_among_a_folder_dataset_images_does_not_block(tmp_path):
    """A FIFO named like an image would block the reader forever: members must be regular files."""
    import numpy as np
    import PIL.Image

    (tmp_path / "data").mkdir()
    os.mkfifo(tmp_path / "data" / "a.png")
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data" / "b.png")
    expect_refusal(cli_call("dataset", "info", str(tmp_path / "data")), "a.png is not a regular file", seconds=30)


def test_reference_npz_with_pickled_objects_is_refused(tmp_path):
    import numpy as np
    from vcdm.metrics.stats import FeatureStats, StatsError

    with zipfile.ZipFile(tmp_path / "ref.npz", "w") as zf:
        zf.writestr("mu.npy", npy(np.zeros(4)))
        zf.writestr("sigma.npy", npy(np.array([None, {"a": 1}], dtype=object)))  # np.save pickles objects
    with pytest.raises(StatsError, match="'sigma.npy' holds Python objects"):
        FeatureStats.load(tmp_path / "ref.npz")


def test_torch_zip_directory_is_charged_before_python_parses_it(tmp_path, monkeypatch):
    import vcdm.safeload as safeload

    path = torch_zip(tmp_path / "x.pt", {f"data/{i}": b"" for i in range(200)} | {"data.pkl": b"\x80\x02N."})
    monkeypatch.setattr(safeload, "ZIPINFO_BYTES", 1 << 20)  # 200 entries then cost more than the budget
    with pytest.raises(TorchFileError, match="the archive's directory"):
        load_torch_zip(path)


def test_pretrained_weights_files_are_read_within_their_budget(tmp_path):
    """The Inception, CLIP and DINOv2 weights readers refuse a 1 KB archive whose storage claims 4 GB (a bare
    torch.load would allocate it), each with its own error naming the file."""
    from vcdm.embedders.clip import ClipWeightsError, read_state_dict
    from vcdm.embedders.dinov2 import DINOv2WeightsError, read_state
    from vcdm.metrics.inception import InceptionFeatures, InceptionWeightsError

    path = torch_zip(tmp_path / "weights.pt", {"data.pkl": pickle_with_storage(10 ** 9), "data/0": bytes(16)})
    readers = [(read_state_dict, ClipWeightsError), (read_state, DINOv2WeightsError),
               (lambda p: InceptionFeatures(p, allow_download=False, progress=False), InceptionWeightsError)]
    for read, error in readers:
        with pytest.raises(error, match="weights.pt.*claims 1,000,000,000 elements"):
            read(path)
