"""Convert a folder / zip of images or the CIFAR-10 tarball into an EDM-format dataset (zip or folder).

Pixels follow EDM's dataset_tool exactly for RGB inputs: the same file order, crop rules and Pillow
Lanczos resampling, stored as uncompressed RGB PNG, so FID statistics of our archives equal EDM's.
Where EDM would fail or guess, we are deliberate (also stated in `vcdm dataset convert --help`):

- every image is converted to RGB uint8 (`archive.to_rgb`: alpha composited onto white, 16-bit
  rescaled, palette expanded); EXIF orientation is ignored, as EDM ignores it;
- a source `dataset.json` with `"labels": null` means "no labels" (EDM would then fall back to
  folder names, which on an EDM-format source are the meaningless 00000/, 00001/, …);
- top-level folder names give labels for zip sources too, not only for folders;
- output images are numbered contiguously even when center-crop-wide drops small images.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import PIL.Image
from tqdm import tqdm

from vcdm.data.archive import (IMAGE_EXTENSIONS, Archive, ArchiveWriter, DatasetError, archive_name, check_dest,
                               check_labels, encode_png, path_sort_key)

TRANSFORMS = ("center-crop", "center-crop-wide")
CIFAR_MEMBER = "cifar-10-batches-py/data_batch_{}"
CIFAR_MEMBER_BYTES = 64 << 20  # each batch is 31 MB (10,000 images of 3,072 bytes)


def parse_resolution(text: str) -> tuple[int, int]:
    """'64x64' or '64,64' -> (width, height)."""
    m = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        raise DatasetError(f"{{resolution}}: expected WxH with positive integers, e.g. 64x64, got '{text}'")
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------------------------------
# Crop and resize, following EDM's rules.

def transform_image(img: PIL.Image.Image, transform: str | None,
                    resolution: tuple[int, int] | None) -> PIL.Image.Image | None:
    """Crop/resize an RGB image; None means "drop this image" (center-crop-wide on a too-small image)."""
    W, H = img.size
    if transform is None:
        if resolution is None or img.size == tuple(resolution):
            return img
        return img.resize(resolution, PIL.Image.Resampling.LANCZOS)
    w, h = resolution
    if transform == "center-crop":
        s = min(W, H)
        img = img.crop(((W - s) // 2, (H - s) // 2, (W + s) // 2, (H + s) // 2))
        return img.resize((w, h), PIL.Image.Resampling.LANCZOS)
    if transform == "center-crop-wide":
        ch = round(w * H / W)
        if W < w or ch < h:
            return None
        img = img.crop((0, (H - ch) // 2, W, (H + ch) // 2)).resize((w, h), PIL.Image.Resampling.LANCZOS)
        canvas = PIL.Image.new("RGB", (w, w))
        canvas.paste(img, (0, (w - h) // 2))
        return canvas
    raise DatasetError(f"{{transform}}: expected one of {', '.join(TRANSFORMS)}, got '{transform}'")


# ---------------------------------------------------------------------------------------------------
# Sources. A source is a list of picklable refs plus a loader that turns a ref into an RGB image.

class _ArchiveLoader:
    def __init__(self, archive: Archive):
        self.archive = archive

    def __call__(self, name: str) -> PIL.Image.Image:
        return self.archive.read_image(name)

    def describe(self, name: str) -> str:
        return self.archive.describe(name)


class _ArrayLoader:
    def __init__(self, description: str):
        self.description = description

    def __call__(self, ref: tuple[int, np.ndarray]) -> PIL.Image.Image:
        return PIL.Image.fromarray(ref[1], "RGB")

    def describe(self, ref: tuple[int, np.ndarray]) -> str:
        return f"{self.description}[{ref[0]}]"


@dataclass
class Source:
    loader: Callable[[Any], PIL.Image.Image]
    refs: list
    labels: list | None  # one per ref, or None
    class_names: list[str] | None = None  # the name of each class index, when known


def _derive_labels(archive: Archive, names: list[str]) -> tuple[list | None, list[str] | None]:
    """EDM's rule: dataset.json when present (values checked, class names kept), else top-level folder
    names when there are several (the sorted folder names are the class names)."""
    if archive.has_metadata():
        meta = archive.read_metadata()
        labels = archive.read_labels(meta)
        if labels is None:
            return None, None
        missing = [n for n in names if n not in labels]
        if missing:
            raise DatasetError(f"{archive.describe('dataset.json')} has no label for {missing[0]} "
                               f"({len(missing)} images unlabelled); fix it or pass {{without_labels}}")
        values = [labels[n] for n in names]
        if not values or isinstance(values[0], list):
            return values, None
        return values, archive.read_class_names(max(values) + 1, meta)
    tops = [n.split("/")[0] if "/" in n else "" for n in names]
    class_names = sorted(set(tops))
    if len(class_names) <= 1:
        return None, None
    classes = {t: i for i, t in enumerate(class_names)}
    return [classes[t] for t in tops], class_names


def _open_cifar10(path: Path) -> Source:
    """CIFAR-10's python tarball. Its batches are pickles (the official ones Python 2's), read by vcdm's
    restricted unpickler: dicts, lists, strings and numeric numpy arrays, nothing that could run code.
    It is imported here because it loads torch, which the dataset tool otherwise never needs."""
    from vcdm.legacy.records import as_array
    from vcdm.legacy.unpickle import CIFAR_BATCH, unpickle

    images, labels = [], []
    try:
        with tarfile.open(path, "r:*") as tar:
            for batch in range(1, 6):
                member = CIFAR_MEMBER.format(batch)
                try:
                    info = tar.getmember(member)
                except KeyError:
                    raise DatasetError(f"{path}: missing {member}; expected the CIFAR-10 python tarball") from None
                if not info.isfile() or info.size > CIFAR_MEMBER_BYTES:
                    raise DatasetError(f"{path}:{member}: {info.size:,} bytes, not a CIFAR-10 batch (at most "
                                       f"{CIFAR_MEMBER_BYTES:,})")
                f = tar.extractfile(info)
                try:
                    data = unpickle(f, info.size, CIFAR_BATCH, encoding="latin1")
                except Exception as e:
                    raise DatasetError(f"{path}:{member}: not a CIFAR-10 batch ({e})") from None
                data = data if isinstance(data, dict) else {}
                data = {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}
                x, y = np.asarray(as_array(data.get("data"))), np.asarray(data.get("labels"))
                if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or y.shape != (len(x),) or y.dtype.kind not in "iu":
                    raise DatasetError(f"{path}:{member}: expected 'data' uint8 (N, 3072) and 'labels' (N,) integers")
                images.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.extend(int(v) for v in y)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read tarball ({e})") from None
    check_labels(labels, f"{path}:cifar-10")
    images = np.concatenate(images)
    return Source(_ArrayLoader(f"{path}:cifar-10"), list(enumerate(images)), labels)


def open_source(path: str | os.PathLike, *, use_labels: bool = True) -> Source:
    """A folder or zip of images (EDM-format or not), or the CIFAR-10 python tarball."""
    path = Path(path)
    if path.is_file() and tarfile.is_tarfile(path):
        source = _open_cifar10(path)
    else:
        archive = Archive(path)
        names = archive.image_names
        if archive.kind == "dir":  # EDM's tool sorts folder paths component-wise (its reader sorts strings)
            names = sorted(names, key=path_sort_key)
        if not names:
            raise DatasetError(f"{{source}} {path}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        source = Source(_ArchiveLoader(archive), names, *_derive_labels(archive, names))
    if not use_labels:
        source.labels = source.class_names = None
    return source


# ---------------------------------------------------------------------------------------------------
# Conversion: workers decode + transform + encode; the parent writes, in order.

@dataclass
class _Converter:
    loader: Callable
    transform: str | None
    resolution: tuple[int, int] | None

    def __call__(self, ref: Any) -> tuple[str, Any, Any]:
        """('ok', png bytes, (w, h)) | ('small', None, None) | ('bad', message, None)."""
        try:
            img = transform_image(self.loader(ref), self.transform, self.resolution)
        except DatasetError as e:
            return "bad", str(e), None
        if img is None:
            return "small", None, None
        return "ok", encode_png(img), img.size


_worker_converter: _Converter | None = None


def _init_worker(converter: _Converter) -> None:
    global _worker_converter
    _worker_converter = converter
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent


def _work(ref: Any) -> tuple[str, Any, Any]:
    return _worker_converter(ref)


def _results(converter: _Converter, refs: list, workers: int) -> Iterator[tuple[str, Any, Any]]:
    if workers <= 1:
        yield from map(converter, refs)
        return
    chunksize = max(1, min(32, len(refs) // (workers * 8)))
    with multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(converter,)) as pool:
        yield from pool.imap(_work, refs, chunksize=chunksize)


@dataclass
class ConvertSummary:
    dest: str
    count: int
    resolution: tuple[int, int]
    num_classes: int | None
    skipped_bad: list[str] = field(default_factory=list)
    skipped_small: int = 0


def convert_dataset(source: str | os.PathLike, dest: str | os.PathLike, *, resolution: tuple[int, int] | str | None = None,
                    transform: str | None = None, max_images: int | None = None, use_labels: bool = True,
                    skip_bad: bool = False, overwrite: bool = False, workers: int = 1,
                    progress: bool = True) -> ConvertSummary:
    """Convert `source` to an EDM-format zip (`dest` ends in .zip) or folder; see the module docstring.

    Output bytes depend only on the inputs and options, never on `workers`.
    """
    if isinstance(resolution, str):
        resolution = parse_resolution(resolution)
    if transform is not None and transform not in TRANSFORMS:
        raise DatasetError(f"{{transform}}: expected one of {', '.join(TRANSFORMS)}, got '{transform}'")
    if transform is not None and resolution is None:
        raise DatasetError(f"{{transform}} {transform} needs a {{resolution}} (WxH)")
    if transform == "center-crop-wide" and resolution[1] > resolution[0]:
        raise DatasetError("{transform} center-crop-wide needs a {resolution} with height <= width")
    if max_images is not None and max_images < 1:
        raise DatasetError(f"{{max_images}}: expected a positive integer, got {max_images}")
    if Path(source).resolve() == Path(dest).resolve():
        raise DatasetError("{dest} must differ from {source}")
    dest = check_dest(dest, overwrite)
    src = open_source(source, use_labels=use_labels)

    converter = _Converter(src.loader, transform, tuple(resolution) if resolution else None)
    total = len(src.refs) if max_images is None else min(len(src.refs), max_images)
    labels: list | None = [] if src.labels is not None else None
    size, count, bad, small = None, 0, [], 0
    results = contextlib.closing(_results(converter, src.refs, workers))  # closing stops the pool early
    bar = tqdm(total=total, unit="img", disable=not progress, leave=False)
    with ArchiveWriter(dest) as writer, results as results, bar:
        for i, (status, payload, img_size) in enumerate(results):
            bar.update(1)
            if status == "bad":
                if not skip_bad:
                    raise DatasetError(f"{payload} (pass {{skip_bad}} to skip unreadable images)")
                bad.append(payload)
                continue
            if status == "small":
                small += 1
                continue
            if size is None:
                size = img_size
                if size[0] != size[1]:
                    raise DatasetError(f"images are {size[0]}x{size[1]} after crop/resize but must be square; "
                                       "set {resolution} NxN (with {transform} center-crop to keep the aspect ratio)")
            elif img_size != size:
                raise DatasetError(f"{src.loader.describe(src.refs[i])} is {img_size[0]}x{img_size[1]} but earlier "
                                   f"images are {size[0]}x{size[1]}; set {{resolution}} WxH to resize all images")
            name = archive_name(count)
            writer.write(name, payload)
            if labels is not None:
                labels.append([name, src.labels[i]])
            count += 1
            if count == max_images:
                break
        if count == 0:
            raise DatasetError(f"{{source}} {source}: no image could be converted")
        writer.write_labels(labels, src.class_names)
    num_classes = None
    if labels and all(isinstance(l, int) for _, l in labels):
        num_classes = max(l for _, l in labels) + 1
    return ConvertSummary(str(dest), count, size, num_classes, bad, small)
