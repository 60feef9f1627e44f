"""Dataset tool (`vcdm dataset`) and ImageDataset: round trips, labels, bad inputs, atomicity."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from vcdm.cli.dataset import command as dataset_cli
from vcdm.data import dataset_tool
from vcdm.data.archive import DatasetError, archive_name
from vcdm.data.dataset import ImageDataset, to_float, to_uint8
from vcdm.data.dataset_tool import convert_dataset

REPO = Path(__file__).resolve().parents[1]


def rand_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_folder(root: Path, classes=("cat", "dog"), per_class=3, size=(16, 16), seed=0) -> dict[str, np.ndarray]:
    """PNG images under root/<class>/; returns {relative path: pixels} in EDM's (sorted) order."""
    rng = np.random.default_rng(seed)
    images = {}
    for c in classes:
        for i in range(per_class):
            rel = f"{c}/{i}.png" if c else f"{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            images[rel] = rand_image(rng, *size)
            PIL.Image.fromarray(images[rel]).save(root / rel)
    return dict(sorted(images.items(), key=lambda kv: kv[0].split("/")))


def zip_entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def run_cli(*args: str, ok: bool = True):
    result = CliRunner().invoke(dataset_cli, list(args), catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    return result


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------------
# Round trips

def test_folder_to_zip_roundtrip_pixels_and_layout(tmp_path):
    images = make_folder(tmp_path / "src")
    s = convert_dataset(tmp_path / "src", tmp_path / "out.zip", workers=1, progress=False)
    assert (s.count, s.resolution, s.num_classes) == (6, (16, 16), 2)
    entries = zip_entries(tmp_path / "out.zip")
    assert list(entries) == [archive_name(i) for i in range(6)] + ["dataset.json"]
    with zipfile.ZipFile(tmp_path / "out.zip") as z:
        info = z.getinfo("00000/img00000000.png")
        assert info.compress_type == zipfile.ZIP_STORED and info.date_time == (1980, 1, 1, 0, 0, 0)
    ds = ImageDataset(tmp_path / "out.zip")
    assert len(ds) == 6 and ds.resolution == 16 and ds.num_channels == 3 and ds.image_shape == (3, 16, 16)
    assert ds.name == "out" and ds.label_dim == 0 and not ds.has_labels
    for i, pixels in enumerate(images.values()):
        image, label = ds[i]
        assert image.dtype == torch.uint8 and label.shape == (0,)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels)


def test_folder_dest_matches_zip_dest(tmp_path):
    make_folder(tmp_path / "src")
    convert_dataset(tmp_path / "src", tmp_path / "out.zip", progress=False)
    convert_dataset(tmp_path / "src", tmp_path / "out", progress=False)
    files = {str(p.relative_to(tmp_path / "out")).replace(os.sep, "/"): p.read_bytes()
             for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert files == zip_entries(tmp_path / "out.zip")
    a, b = ImageDataset(tmp_path / "out", use_labels=True), ImageDataset(tmp_path / "out.zip", use_labels=True)
    assert all(torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1]) for i in range(len(a)))
    assert no_temp_files(tmp_path)


def test_edm_naming_past_one_thousand():
    assert archive_name(0) == "00000/img00000000.png"
    assert archive_name(999) == "00000/img00000999.png"
    assert archive_name(1234) == "00001/img00001234.png"


def test_workers_do_not_change_bytes(tmp_path):
    make_folder(tmp_path / "src", classes=("a", "b", "c"), per_class=8, size=(20, 12))
    for workers in (1, 2):
        convert_dataset(tmp_path / "src", tmp_path / f"w{workers}.zip", resolution=(8, 8), transform="center-crop",
                        workers=workers, progress=False)
    assert (tmp_path / "w1.zip").read_bytes() == (tmp_path / "w2.zip").read_bytes()


def test_resize_and_crops_follow_edm(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rand_image(rng, 24, 18)  # W=24, H=18
    (tmp_path / "src").mkdir()
    PIL.Image.fromarray(pixels).save(tmp_path / "src" / "x.png")
    src = PIL.Image.fromarray(pixels)
    expected = {
        None: src.resize((8, 8), PIL.Image.Resampling.LANCZOS),
        "center-crop": src.crop((3, 0, 21, 18)).resize((8, 8), PIL.Image.Resampling.LANCZOS),
    }
    for transform, want in expected.items():
        out = tmp_path / f"{transform}.zip"
        convert_dataset(tmp_path / "src", out, resolution=(8, 8), transform=transform, progress=False)
        assert np.array_equal(ImageDataset(out)[0][0].permute(1, 2, 0).numpy(), np.asarray(want))
    # center-crop-wide 16x8: crop rows to height round(16*18/24)=12, resize to 16x8, pad into 16x16 black.
    convert_dataset(tmp_path / "src", tmp_path / "wide.zip", resolution=(16, 8), transform="center-crop-wide", progress=False)
    got = ImageDataset(tmp_path / "wide.zip")[0][0].permute(1, 2, 0).numpy()
    want = np.asarray(src.crop((0, 3, 24, 15)).resize((16, 8), PIL.Image.Resampling.LANCZOS))
    assert got.shape == (16, 16, 3) and np.array_equal(got[4:12], want)
    assert not got[:4].any() and not got[12:].any()
    # Too narrow for center-crop-wide: dropped, and with nothing left that is an error.
    with pytest.raises(DatasetError, match="no image could be converted"):
        convert_dataset(tmp_path / "src", tmp_path / "w2.zip", resolution=(32, 16), transform="center-crop-wide", progress=False)


def test_zip_source_and_max_images(tmp_path):
    rng = np.random.default_rng(4)
    with zipfile.ZipFile(tmp_path / "raw.zip", "w") as z:
        for i in range(5):
            buf = io.BytesIO()
            PIL.Image.fromarray(rand_image(rng, 12, 12)).save(buf, format="png")
            z.writestr(f"imgs/{i}.png", buf.getvalue())
        z.writestr("imgs/readme.txt", "not an image")
    s = convert_dataset(tmp_path / "raw.zip", tmp_path / "out.zip", max_images=3, workers=2, progress=False)
    assert s.count == 3 and s.num_classes is None
    assert len(ImageDataset(tmp_path / "out.zip")) == 3
    # An EDM-format zip is itself a valid source; re-converting is lossless.
    convert_dataset(tmp_path / "out.zip", tmp_path / "again.zip", progress=False)
    assert zip_entries(tmp_path / "again.zip") == zip_entries(tmp_path / "out.zip")


# ---------------------------------------------------------------------------------------------------
# Labels

def test_labels_from_top_level_folders(tmp_path):
    make_folder(tmp_path / "src", classes=("zebra", "ant", "ant-b"), per_class=2)
    convert_dataset(tmp_path / "src", tmp_path / "out.zip", progress=False)
    labels = json.loads(zip_entries(tmp_path / "out.zip")["dataset.json"])["labels"]
    # Component-wise order (ant/ < ant-b/ < zebra/), class ids from sorted folder names.
    assert [l for _, l in labels] == [0, 0, 1, 1, 2, 2]
    assert [n for n, _ in labels] == [archive_name(i) for i in range(6)]
    ds = ImageDataset(tmp_path / "out.zip", use_labels=True)
    assert ds.label_dim == 3 and ds.has_labels
    assert torch.equal(ds[2][1], torch.tensor([0.0, 1.0, 0.0])) and ds[2][1].dtype == torch.float32


def test_single_folder_gives_no_labels_and_no_labels_flag(tmp_path):
    make_folder(tmp_path / "one", classes=("only",))
    convert_dataset(tmp_path / "one", tmp_path / "a.zip", progress=False)
    assert json.loads(zip_entries(tmp_path / "a.zip")["dataset.json"]) == {"labels": None}
    make_folder(tmp_path / "two")
    run_cli("--source", str(tmp_path / "two"), "--dest", str(tmp_path / "b.zip"), "--no-labels", "--workers", "1")
    assert json.loads(zip_entries(tmp_path / "b.zip")["dataset.json"]) == {"labels": None}
    assert ImageDataset(tmp_path / "b.zip", use_labels=True).label_dim == 0


def test_labels_from_source_dataset_json(tmp_path):
    images = make_folder(tmp_path / "src", classes=("",), per_class=4)
    (tmp_path / "src" / "dataset.json").write_text(json.dumps({"labels": [[n, 7 - i] for i, n in enumerate(images)]}))
    s = convert_dataset(tmp_path / "src", tmp_path / "out.zip", progress=False)
    assert s.num_classes == 8
    assert [l for _, l in json.loads(zip_entries(tmp_path / "out.zip")["dataset.json"])["labels"]] == [7, 6, 5, 4]
    # An image the dataset.json does not label is an error naming it.
    PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "src" / "extra.png")
    with pytest.raises(DatasetError, match="no label for extra.png"):
        convert_dataset(tmp_path / "src", tmp_path / "bad.zip", progress=False)


def test_edm_source_with_null_labels_and_many_folders(tmp_path):
    """`"labels": null` means unlabelled; the 00000/, 00001/ folders must not become classes."""
    rng = np.random.default_rng(5)
    src = tmp_path / "edm"
    for i in (0, 1000):
        (src / archive_name(i)).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(rand_image(rng, 8, 8)).save(src / archive_name(i))
    (src / "dataset.json").write_text('{"labels": null}')
    assert convert_dataset(src, tmp_path / "out.zip", progress=False).num_classes is None


# ---------------------------------------------------------------------------------------------------
# Bad input

def test_corrupt_image_named_or_skipped(tmp_path):
    make_folder(tmp_path / "src")
    (tmp_path / "src" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = run_cli("--source", str(tmp_path / "src"), "--dest", str(tmp_path / "out.zip"), "--workers", "1", ok=False)
    assert "broken.png" in result.output and "--skip-bad" in result.output
    assert len(result.output.strip().splitlines()[-1]) > 0 and "Traceback" not in result.output
    assert not (tmp_path / "out.zip").exists() and no_temp_files(tmp_path)
    result = run_cli("--source", str(tmp_path / "src"), "--dest", str(tmp_path / "out.zip"), "--skip-bad", "--workers", "2")
    assert "Skipped 1 unreadable images" in result.output and "broken.png" in result.output
    assert len(ImageDataset(tmp_path / "out.zip")) == 6


def test_truncated_jpeg_is_an_error(tmp_path):
    (tmp_path / "src").mkdir()
    buf = io.BytesIO()
    PIL.Image.fromarray(rand_image(np.random.default_rng(0), 32, 32)).save(buf, format="jpeg")
    (tmp_path / "src" / "t.jpg").write_bytes(buf.getvalue()[:200])
    with pytest.raises(DatasetError, match="t.jpg"):
        convert_dataset(tmp_path / "src", tmp_path / "out.zip", progress=False)


def test_mixed_sizes_need_resolution(tmp_path):
    make_folder(tmp_path / "src", classes=("a",), size=(16, 16))
    PIL.Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "src" / "a" / "9.png")
    with pytest.raises(DatasetError, match=r"9.png is 12x12 but earlier images are 16x16; set resolution WxH"):
        convert_dataset(tmp_path / "src", tmp_path / "out.zip", progress=False)
    assert not (tmp_path / "out.zip").exists()
    result = run_cli("--source", str(tmp_path / "src"), "--dest", str(tmp_path / "out.zip"), ok=False)
    assert "set --resolution WxH to resize" in result.output
    assert convert_dataset(tmp_path / "src", tmp_path / "out.zip", resolution="8x8", progress=False).count == 4


def test_existing_dest_refused_then_overwritten(tmp_path):
    make_folder(tmp_path / "src")
    for dest in (tmp_path / "out.zip", tmp_path / "outdir"):
        if dest.suffix:
            dest.write_bytes(b"precious")
        else:
            dest.mkdir()
            (dest / "keep.txt").write_text("precious")
        result = run_cli("--source", str(tmp_path / "src"), "--dest", str(dest), "--workers", "1", ok=False)
        assert "already exists" in result.output and "--overwrite" in result.output
        assert (dest.read_bytes() if dest.suffix else (dest / "keep.txt").read_bytes()) == b"precious"
        run_cli("--source", str(tmp_path / "src"), "--dest", str(dest), "--workers", "1", "--overwrite")
        assert len(ImageDataset(dest)) == 6 and not (dest / "keep.txt").exists()
    assert no_temp_files(tmp_path)
    # An empty folder is fine without --overwrite (as in EDM).
    (tmp_path / "empty").mkdir()
    convert_dataset(tmp_path / "src", tmp_path / "empty", progress=False)
    assert (tmp_path / "empty" / "dataset.json").exists()


@pytest.mark.parametrize("dest_name", ["out.zip", "outdir"])
def test_crash_mid_write_leaves_nothing(tmp_path, monkeypatch, dest_name):
    make_folder(tmp_path / "src")
    calls = []
    real = dataset_tool.encode_png

    def flaky(img):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as Ctrl-C would
        return real(img)

    monkeypatch.setattr(dataset_tool, "encode_png", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert_dataset(tmp_path / "src", tmp_path / dest_name, workers=1, progress=False)
    assert not (tmp_path / dest_name).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_conversion_options_are_refused_in_their_terms(tmp_path):
    make_folder(tmp_path / "src")
    with pytest.raises(DatasetError, match="does not exist"):
        convert_dataset(tmp_path / "missing", tmp_path / "out.zip", progress=False)
    with pytest.raises(DatasetError, match=r"transform center-crop needs a resolution \(WxH\)") as err:
        convert_dataset(tmp_path / "src", tmp_path / "out.zip", transform="center-crop", progress=False)
    assert "--" not in str(err.value)
    result = run_cli("--source", str(tmp_path / "src"), "--dest", str(tmp_path / "o.zip"), "--resolution", "64by64", ok=False)
    assert "--resolution" in result.output and "WxH" in result.output
    with pytest.raises(DatasetError, match="must be square"):
        convert_dataset(tmp_path / "src", tmp_path / "out.zip", resolution=(16, 8), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        convert_dataset(tmp_path / "empty", tmp_path / "out.zip", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "src"]


# ---------------------------------------------------------------------------------------------------
# Pixel formats

def test_mode_conversions_to_rgb(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    PIL.Image.fromarray(gray, "L").save(src / "a_gray.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half fully transparent
    PIL.Image.fromarray(rgba, "RGBA").save(src / "b_rgba.png")
    pal = PIL.Image.fromarray(np.tile(np.arange(8, dtype=np.uint8), (8, 1)), "L").convert("P")
    pal.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    pal.save(src / "c_palette.png")
    sixteen = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    PIL.Image.fromarray(sixteen).save(src / "d_16bit.png")
    assert PIL.Image.open(src / "d_16bit.png").mode.startswith("I")
    convert_dataset(src, tmp_path / "out.zip", progress=False)
    with zipfile.ZipFile(tmp_path / "out.zip") as z:
        assert all(PIL.Image.open(z.open(archive_name(i))).mode == "RGB" for i in range(4))
    ds = ImageDataset(tmp_path / "out.zip")
    img = [ds[i][0].permute(1, 2, 0).numpy() for i in range(4)]
    assert np.array_equal(img[0], np.repeat(gray[:, :, None], 3, axis=2))
    assert (img[1][:4] == [200, 0, 0]).all() and (img[1][4:] == 255).all()  # transparency -> white
    assert np.array_equal(img[2][0, :, 0], np.arange(8)) and (img[2][..., 2] == 7).all()
    assert np.array_equal(img[3][..., 0], np.rint(sixteen / 257).astype(np.uint8))  # rescaled, not clipped


def test_imagedataset_keeps_grayscale_channel(tmp_path):
    (tmp_path / "g").mkdir()
    PIL.Image.fromarray(np.full((8, 8), 9, np.uint8), "L").save(tmp_path / "g" / "x.png")
    ds = ImageDataset(tmp_path / "g")
    assert ds.num_channels == 1 and torch.equal(ds[0][0], torch.full((1, 8, 8), 9, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------------
# CIFAR-10 tarball

class _Py2Array:
    """Pickles like numpy under Python 2 (the official batches): GLOBAL numpy.core.multiarray
    _reconstruct, with the pixel data as a str that `encoding="latin1"` hands back to numpy."""

    def __init__(self, a: np.ndarray):
        self.a = a

    def __reduce__(self):
        core = getattr(np, "_core", None) or np.core
        state = (1, self.a.shape, np.dtype("u1"), False, self.a.tobytes().decode("latin1"))
        return core.multiarray._reconstruct, (np.ndarray, (0,), "b"), state


def cifar_batch(batch: dict, protocol: int | str) -> bytes:
    if protocol != "py2":
        return pickle.dumps(batch, protocol=protocol)
    blob = pickle.dumps(dict(batch, data=_Py2Array(batch["data"])), protocol=2)
    blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in blob
    return blob


def fake_cifar(path: Path, n_per_batch=3, payload=None, protocol: int | str = "py2") -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(6)
    images, labels = [], []
    with tarfile.open(path, "w:gz") as tar:
        for b in range(1, 6):
            data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            ys = [int(v) for v in rng.integers(0, 10, n_per_batch)]
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += ys
            blob = payload if (payload is not None and b == 3) else cifar_batch(
                {"batch_label": f"batch {b}", "labels": ys, "data": data, "filenames": ["x"] * n_per_batch}, protocol)
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{b}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return np.concatenate(images), labels


@pytest.mark.parametrize("protocol", ["py2", 2, pickle.DEFAULT_PROTOCOL])
def test_cifar10_tarball_converts_images_and_labels(tmp_path, protocol):
    images, labels = fake_cifar(tmp_path / "cifar-10-python.tar.gz", protocol=protocol)
    s = convert_dataset(tmp_path / "cifar-10-python.tar.gz", tmp_path / "cifar.zip", workers=2, progress=False)
    assert s.count == 15 and s.resolution == (32, 32)
    ds = ImageDataset(tmp_path / "cifar.zip", use_labels=True)
    assert ds.label_dim == max(labels) + 1
    for i in range(15):
        image, label = ds[i]
        assert np.array_equal(image.permute(1, 2, 0).numpy(), images[i]) and int(label.argmax()) == labels[i]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar_malicious_pickle_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_cifar(tmp_path / "cifar-10-python.tar.gz", payload=pickle.dumps({"data": _Evil(), "labels": []}, protocol=2))
    with pytest.raises(DatasetError, match=r"data_batch_3.*refused to unpickle.*'(posix|os)\.system'"):
        convert_dataset(tmp_path / "cifar-10-python.tar.gz", tmp_path / "out.zip", progress=False)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.zip").exists()


def test_cifar_oversized_batch_refused_before_unpickling(tmp_path):
    """A gzip-compressed batch member of 100 MB (a bytes object of that size once unpickled)."""
    fake_cifar(tmp_path / "cifar-10-python.tar.gz", payload=bytes(100 << 20))
    assert (tmp_path / "cifar-10-python.tar.gz").stat().st_size < 1_000_000
    with pytest.raises(DatasetError, match=r"data_batch_3: 104,857,600 bytes, not a CIFAR-10 batch"):
        convert_dataset(tmp_path / "cifar-10-python.tar.gz", tmp_path / "out.zip", progress=False)


# ---------------------------------------------------------------------------------------------------
# ImageDataset

def test_imagedataset_xflip_max_size_cache(tmp_path):
    images = list(make_folder(tmp_path / "src", classes=("",), per_class=6).values())
    convert_dataset(tmp_path / "src", tmp_path / "d.zip", progress=False)
    ds = ImageDataset(tmp_path / "d.zip", xflip=True)
    assert len(ds) == 12
    assert torch.equal(ds[7][0], ds[1][0].flip(-1)) and not torch.equal(ds[7][0], ds[1][0])
    sub = ImageDataset(tmp_path / "d.zip", max_size=3, random_seed=1)
    idx = np.arange(6)
    np.random.RandomState(1).shuffle(idx)  # EDM's rule: seeded shuffle, first max_size, sorted
    want = np.sort(idx[:3])
    assert len(sub) == 3
    assert all(np.array_equal(sub[i][0].permute(1, 2, 0).numpy(), images[j]) for i, j in enumerate(want))
    other = ImageDataset(tmp_path / "d.zip", max_size=3, random_seed=2)
    assert [other[i][0].sum() for i in range(3)] != [sub[i][0].sum() for i in range(3)]
    cached = ImageDataset(tmp_path / "d.zip", cache=True, xflip=True)
    first = cached[0][0]
    assert 0 in cached._cache and torch.equal(cached[6][0], first.flip(-1)) and torch.equal(cached[0][0], first)


def test_imagedataset_refuses_missing_empty_and_unreadable_sources(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageDataset(tmp_path / "nope.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        ImageDataset(tmp_path / "empty")
    (tmp_path / "notzip.zip").write_text("hello")
    with pytest.raises(DatasetError, match="not a zip"):
        ImageDataset(tmp_path / "notzip.zip")
    (tmp_path / "mixed").mkdir()
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "mixed" / "a.png")
    PIL.Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "mixed" / "b.png")
    ds = ImageDataset(tmp_path / "mixed")
    with pytest.raises(DatasetError, match=r"b.png has shape \(3, 4, 4\)"):
        ds[1]


def test_float_helpers_roundtrip():
    x = torch.arange(256, dtype=torch.uint8)
    f = to_float(x)
    assert f.dtype == torch.float32 and f.min() == -1 and f.max() == 1
    assert torch.equal(to_uint8(f), x) and torch.equal(ImageDataset.to_uint8(ImageDataset.to_float(x)), x)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


def test_dataloader_workers_read_zip(tmp_path):
    make_folder(tmp_path / "src", per_class=5)
    convert_dataset(tmp_path / "src", tmp_path / "d.zip", progress=False)
    ds = ImageDataset(tmp_path / "d.zip", use_labels=True)
    serial = [ds[i] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    images, labels = map(torch.cat, zip(*loader))
    assert torch.equal(images, torch.stack([s[0] for s in serial]))
    assert torch.equal(labels, torch.stack([s[1] for s in serial]))


# ---------------------------------------------------------------------------------------------------
# CLI

def test_info_command_reports_counts_resolution_and_labels(tmp_path):
    make_folder(tmp_path / "src", classes=("a", "b", "c"), per_class=2, size=(8, 8))
    convert_dataset(tmp_path / "src", tmp_path / "d.zip", progress=False)
    out = run_cli("info", str(tmp_path / "d.zip")).output
    rows = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert rows["images"] == "6" and rows["resolution"] == "8x8" and rows["channels"] == "3" and rows["labels"] == "3"
    (tmp_path / "empty").mkdir()
    assert "no images" in run_cli("info", str(tmp_path / "empty"), ok=False).output


def test_root_script_accepts_seed_flags(tmp_path):
    rng = np.random.default_rng(7)
    (tmp_path / "src").mkdir()
    for i in range(3):
        PIL.Image.fromarray(rand_image(rng, 20, 14)).save(tmp_path / "src" / f"{i}.jpg")
    cmd = [sys.executable, str(REPO / "dataset_tool.py"), f"--source={tmp_path / 'src'}", f"--dest={tmp_path / 'd.zip'}",
           "--resolution=8x8", "--transform=center-crop", "--max-images=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Wrote 2 images (8x8, no labels)" in proc.stdout
    assert len(ImageDataset(tmp_path / "d.zip")) == 2


# ---------------------------------------------------------------------------------------------------
# Label values, class names, hostile dataset.json

def _labelled_zip(path: Path, labels: list, class_names=None) -> Path:
    """An EDM-format zip of len(labels) 8x8 images with the given dataset.json labels."""
    rng = np.random.default_rng(0)
    meta = {"labels": [[archive_name(i), l] for i, l in enumerate(labels)]}
    if class_names is not None:
        meta["class_names"] = class_names
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(len(labels)):
            buf = io.BytesIO()
            PIL.Image.fromarray(rand_image(rng, 8, 8)).save(buf, format="png")
            zf.writestr(archive_name(i), buf.getvalue())
        zf.writestr("dataset.json", json.dumps(meta))
    return path


@pytest.mark.parametrize("labels,match", [
    ([0, 10 ** 12], "label 1 is 1000000000000; class labels must be integers 0 <= c < 131,072"),
    ([1, -1], "label 1 is -1"),
    ([True, False], "label 0 is a boolean (true); class labels must be integers"),
    ([0.5, 1], "label 0 is float"),
    ([[1, 2], [3]], "label 1 is length 1 but label 0 has length 2"),
    ([[1, 2], 3], "label 1 is 3 but label 0 has length 2"),
    ([1, [2]], "label 1 is list"),
    ([[1, "a"], [2, 3]], "label 0 holds a value that is not a finite number"),
    ([[], []], "label vectors have length 0"),
])
def test_invalid_labels_are_one_line_errors_everywhere(tmp_path, labels, match):
    path = _labelled_zip(tmp_path / "d.zip", labels)
    res = CliRunner().invoke(dataset_cli, ["info", str(path)])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and match in res.output, res.output
    with pytest.raises(DatasetError, match=match.replace("(", r"\(").replace(")", r"\)")):
        ImageDataset(path, use_labels=True)
    res = CliRunner().invoke(dataset_cli, ["--source", str(path), "--dest", str(tmp_path / "o.zip")])
    assert res.exit_code == 1 and match in res.output and not (tmp_path / "o.zip").exists()


def test_vector_labels_still_read(tmp_path):
    ds = ImageDataset(_labelled_zip(tmp_path / "v.zip", [[0.5, 1], [2, -3.0]]), use_labels=True)
    assert ds.label_dim == 2 and torch.equal(ds[1][1], torch.tensor([2.0, -3.0])) and ds.class_names is None


def test_folder_class_names_are_kept(tmp_path):
    make_folder(tmp_path / "src", classes=("cat", "dog", "zebra"), per_class=1)
    convert_dataset(tmp_path / "src", tmp_path / "out.zip", progress=False)
    meta = json.loads(zip_entries(tmp_path / "out.zip")["dataset.json"])
    assert meta["class_names"] == ["cat", "dog", "zebra"] and [l for _, l in meta["labels"]] == [0, 1, 2]
    ds = ImageDataset(tmp_path / "out.zip", use_labels=True)
    assert ds.class_names == ["cat", "dog", "zebra"]
    assert "classes    cat, dog, zebra" in run_cli("info", str(tmp_path / "out.zip")).output
    # Re-converting keeps them; class_index accepts an index or a recorded name.
    convert_dataset(tmp_path / "out.zip", tmp_path / "again.zip", progress=False)
    assert json.loads(zip_entries(tmp_path / "again.zip")["dataset.json"])["class_names"] == ["cat", "dog", "zebra"]
    from vcdm.data.archive import class_index

    assert class_index("zebra", ds.class_names, 3) == 2 and class_index("1", ds.class_names, 3) == 1
    with pytest.raises(DatasetError, match="unknown class 'horse' .*0..2 or a name such as cat, dog, zebra"):
        class_index("horse", ds.class_names, 3)
    with pytest.raises(DatasetError, match="class_names must be a list of distinct strings"):
        ImageDataset(_labelled_zip(tmp_path / "bad.zip", [0, 1], ["a", "a"]), use_labels=True)


@pytest.mark.slow
def test_dataset_json_whitespace_bomb_is_refused_with_bounded_memory(tmp_path):
    """A ~0.5 MB zip whose dataset.json inflates to 512 MiB of whitespace (the study's was 1.5 GiB)."""
    from memory_probe import expect_one_line_error

    path = _labelled_zip(tmp_path / "bomb.zip", [0, 1])
    path2 = tmp_path / "bomb2.zip"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(path2, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in src.namelist():
            if name != "dataset.json":
                zf.writestr(name, src.read(name))
        with zf.open("dataset.json", "w", force_zip64=True) as member:
            member.write(b'{"labels": [')
            spaces = b" " * (1 << 20)
            for _ in range(512):
                member.write(spaces)
            member.write(b"]}")
    assert path2.stat().st_size < 1_000_000
    code = f"from vcdm.cli.main import cli\ncli(['dataset', 'info', {str(path2)!r}])\n"
    expect_one_line_error(code, "dataset.json is 536,870,926 bytes, more than the 1,050,624 allowed for 2 images")


@pytest.mark.slow
@pytest.mark.parametrize("labels,match", [([0, 10 ** 12], "label 1 is 1000000000000"),
                                          ([[1.0] * 1000, [1.0] * 999], "label 1 is length 999")])
def test_hostile_labels_in_dataset_info_with_bounded_memory(tmp_path, labels, match):
    from memory_probe import expect_one_line_error

    path = _labelled_zip(tmp_path / "d.zip", labels)
    expect_one_line_error(f"from vcdm.cli.main import cli\ncli(['dataset', 'info', {str(path)!r}])\n", match)


def test_huge_image_refused_before_decoding(tmp_path):
    """A 9000x9000 1-bit PNG is a few KB but would decode to 243 MB of RGB."""
    (tmp_path / "src").mkdir()
    PIL.Image.new("1", (9000, 9000)).save(tmp_path / "src" / "huge.png")
    assert (tmp_path / "src" / "huge.png").stat().st_size < 100_000
    result = run_cli("--source", str(tmp_path / "src"), "--dest", str(tmp_path / "o.zip"), ok=False)
    assert "huge.png: the image is 9000x9000 pixels, more than the 67,108,864" in result.output
    assert result.output.count("\n") == 1
