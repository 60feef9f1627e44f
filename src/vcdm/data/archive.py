"""EDM-format image archives: a zip or a folder of ``00000/img00000000.png`` … plus ``dataset.json``.

Reading is lazy and process-safe (each process opens its own zip handle); writing is atomic (a temp
zip or temp folder beside the destination, renamed into place only when complete). Both the
dataset tool and ImageDataset decode through `to_rgb`, so they agree on every pixel format.

Reading is bounded: members of a folder are read only if they are regular files (a FIFO would block
forever); a damaged, encrypted or deflate64 zip is one DatasetError; an image is read through a view
that ends ``HEADER_BYTES`` into the file until its header is parsed, then that plus four bytes per
pixel and band (so a PNG chunk claiming 1 GiB in a 1 MB zip is refused after 16 MiB), and its header
must claim at most ``MAX_IMAGE_PIXELS``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
import PIL.Image

from vcdm.fileio import atomic_write, umask

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_NAME = "dataset.json"
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so identical inputs give byte-identical zips
BACKGROUND = 255  # transparent pixels are composited onto white
MAX_CLASSES = 1 << 17             # class labels are below this (ImageNet-21k has 21,841 classes)
MAX_LABEL_DIM = 1 << 16           # length of label vectors
METADATA_BYTES_PER_IMAGE = 1024   # dataset.json may hold this much per image, plus METADATA_SLACK
METADATA_SLACK = 1 << 20
MAX_IMAGE_PIXELS = 1 << 26        # 8192x8192: decoding one image takes at most ~200 MB (RGB)
HEADER_BYTES = 16 << 20           # an image file's bytes besides its pixel data (metadata, ICC profiles)
FLOAT32_MAX = 3.4028234663852886e38
# what reading a damaged zip raises: a bad directory or header, encryption, an unknown method, bad data
ZIP_ERRORS = (OSError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error)


_SETTING = re.compile(r"\{(source|dest|resolution|transform|max_images|skip_bad|overwrite|without_labels)\}")
_PYTHON_NAMES = {"skip_bad": "skip_bad=True", "overwrite": "overwrite=True", "without_labels": "use_labels=False"}


class DatasetError(ValueError):
    """A dataset source, destination or archive that cannot be used as asked.

    A message names the settings of ``convert_dataset`` as ``{setting}`` fields: ``str()`` shows them
    as Python arguments (``resolution``, ``skip_bad=True``), :meth:`render` as the caller names them
    (the CLI: ``--resolution``, ``--skip-bad``).
    """

    def __init__(self, *args: Any):
        super().__init__(*_unwrapped(args))

    def render(self, name: Callable[[str], str]) -> str:
        return _SETTING.sub(lambda m: name(m.group(1)), super().__str__())

    def __str__(self) -> str:
        return self.render(lambda s: _PYTHON_NAMES.get(s, s))


_WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def _unwrapped(args: tuple) -> tuple:
    """A DatasetError raised in a DataLoader worker is re-raised in the main process as
    ``DatasetError("Caught DatasetError in DataLoader worker process 1.\\nOriginal Traceback ...")``: keep
    the original message (the traceback's last line) so that the user sees the file and the reason."""
    if len(args) == 1 and isinstance(args[0], str) and _WORKER_ERROR.match(args[0]):
        last = args[0].rstrip().splitlines()[-1]
        return (last.split(f"{DatasetError.__name__}: ", 1)[-1],)
    return args


def is_image(name: str | os.PathLike) -> bool:
    return os.path.splitext(str(name))[1].lower() in IMAGE_EXTENSIONS


def archive_name(index: int) -> str:
    """EDM's name for image `index`: 1000 images per folder, e.g. 1234 -> '00001/img00001234.png'."""
    return f"{index // 1000:05d}/img{index:08d}.png"


def to_rgb(img: PIL.Image.Image, *, keep_gray: bool = False) -> PIL.Image.Image:
    """Convert any Pillow mode to 8-bit RGB (or L when `keep_gray` and the image is gray), deliberately:

    - alpha (RGBA, LA, PA, palette transparency) is composited onto white, not dropped;
    - 16/32-bit gray ('I;16*', 'I') is rescaled from [0, 65535] to [0, 255] (Pillow's convert clips);
    - palette, 1-bit, CMYK, YCbCr, … go through Pillow's own conversion.
    """
    mode = img.mode
    if mode == "RGB" or (keep_gray and mode == "L"):
        return img
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        gray = PIL.Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")
        return gray if keep_gray else gray.convert("RGB")
    if mode == "F":
        raise DatasetError("floating-point ('F' mode) images are not supported; save them as 8- or 16-bit")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        base = PIL.Image.new("RGBA", img.size, (BACKGROUND,) * 3 + (255,))
        img = PIL.Image.alpha_composite(base, img).convert("RGB")
        if keep_gray and mode in ("LA", "La"):
            return img.convert("L")
        return img
    if keep_gray and mode == "1":
        return img.convert("L")
    return img.convert("RGB")


class _Bounded:
    """A readable, seekable view of a file that ends at ``limit`` bytes: reading past it raises
    DatasetError, so a chunk that claims more than an image can need is refused before it is read whole."""

    def __init__(self, f: IO[bytes], limit: int):
        self._f, self.limit = f, limit

    def read(self, n: int | None = -1) -> bytes:
        room = self.limit - self._f.tell()
        data = self._f.read(room + 1 if n is None or n < 0 or n > room else n)
        if len(data) > room:
            raise DatasetError(f"the file goes on past the {self.limit:,} bytes an image of its size may need "
                               "(a damaged or hostile chunk)")
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


def decode_image(data: IO[bytes], name: str, *, keep_gray: bool = False) -> PIL.Image.Image:
    """Open and fully decode one image (first frame); a corrupt or oversized file raises DatasetError naming it."""
    bounded = _Bounded(data, HEADER_BYTES)
    try:
        with PIL.Image.open(bounded) as img:  # reads the header only: the size is known before decoding
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise DatasetError(f"the image is {img.width}x{img.height} pixels, more than the "
                                   f"{MAX_IMAGE_PIXELS:,} an input image may have")
            bounded.limit = HEADER_BYTES + 4 * img.width * img.height * len(img.getbands()) + img.height
            img.load()
            return to_rgb(img, keep_gray=keep_gray)
    except DatasetError as e:
        raise DatasetError(f"{name}: {e}") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, … for bad files
        raise DatasetError(f"cannot read image {name}: {type(e).__name__}: {str(e)[:200]}") from None


def encode_png(img: PIL.Image.Image) -> bytes:
    """Uncompressed PNG, exactly as EDM stores dataset images (deterministic bytes)."""
    buf = io.BytesIO()
    img.save(buf, format="png", compress_level=0, optimize=False)
    return buf.getvalue()


def _is_number(v: Any) -> bool:
    """A finite number that float32 holds (a 400-digit integer does not convert to a float at all)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return -FLOAT32_MAX <= v <= FLOAT32_MAX if isinstance(v, int) else math.isfinite(v) and abs(v) <= FLOAT32_MAX


def check_labels(labels: list, where: str) -> None:
    """Refuse labels that are not all class indices (integers 0 <= c < MAX_CLASSES; not booleans) or all
    equal-length vectors of finite numbers, with one line naming the first offending entry."""
    if not labels:
        return
    if isinstance(labels[0], list):
        dim = len(labels[0])
        if not 0 < dim <= MAX_LABEL_DIM:
            raise DatasetError(f"{where}: label vectors have length {dim}, expected 1..{MAX_LABEL_DIM}")
        for i, v in enumerate(labels):
            if not isinstance(v, list) or len(v) != dim:
                got = f"length {len(v)}" if isinstance(v, list) else repr(v)
                raise DatasetError(f"{where}: label {i} is {got} but label 0 has length {dim}; label vectors "
                                   "must all have the same length")
            if not all(map(_is_number, v)):
                raise DatasetError(f"{where}: label {i} holds a value that is not a finite number")
        return
    for i, c in enumerate(labels):
        if isinstance(c, bool) or not isinstance(c, int):
            kind = "a boolean" if isinstance(c, bool) else type(c).__name__
            raise DatasetError(f"{where}: label {i} is {kind} ({json.dumps(c)[:40]}); class labels must be "
                               f"integers 0..N-1 (or all labels equal-length vectors)")
        if not 0 <= c < MAX_CLASSES:
            raise DatasetError(f"{where}: label {i} is {c}; class labels must be integers 0 <= c < {MAX_CLASSES:,}")


def check_class_names(names: Any, num_classes: int, where: str) -> list[str]:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise DatasetError(f"{where}: class_names must be a list of distinct strings")
    if len(names) < num_classes:
        raise DatasetError(f"{where}: {len(names)} class names for labels up to {num_classes - 1}")
    return names


def class_index(value: str, class_names: list[str] | None, num_classes: int) -> int:
    """A class given as its index or (when the dataset recorded them) its name -> its index."""
    if value.strip().isdigit() and int(value) < num_classes:
        return int(value)
    if class_names and value in class_names:
        return class_names.index(value)
    known = f"0..{num_classes - 1}" + (f" or a name such as {', '.join(class_names[:3])}" if class_names else "")
    raise DatasetError(f"unknown class '{value}' (expected {known})")


def path_sort_key(rel: str) -> tuple[str, ...]:
    """Component-wise order of relative paths, as pathlib sorts them: 'a/x' < 'a-b/x' (strings disagree)."""
    return tuple(rel.split("/"))


class Archive:
    """Read-only view of a folder or zip of images. Lazy; safe to pickle and to use after fork.

    `names` are relative paths with '/' separators in plain string order, as EDM's reader sorts them.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        if self.path.is_dir():
            self.kind = "dir"
            names = []
            for root, dirs, files in os.walk(self.path):
                dirs.sort()
                rel_root = os.path.relpath(root, self.path)
                for f in files:
                    names.append(f if rel_root == "." else f"{rel_root}/{f}".replace(os.sep, "/"))
            self.names = sorted(names)
        elif self.path.is_file():
            if not zipfile.is_zipfile(self.path):
                raise DatasetError(f"{self.path} is not a zip archive or a folder")
            self.kind = "zip"
            try:
                self.names = sorted(n for n in self._zipfile().namelist() if not n.endswith("/"))
            except ZIP_ERRORS as e:
                raise DatasetError(f"{self.path}: not a readable zip archive ({_reason(e)})") from None
        else:
            raise DatasetError(f"dataset path {self.path} does not exist")
        self.image_names = [n for n in self.names if is_image(n)]

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():  # one handle per (worker) process
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def open(self, name: str) -> IO[bytes]:
        """One member, for reading; a member that is no regular file (a FIFO, a device) or that the zip
        cannot give (damaged, encrypted, deflate64) raises DatasetError."""
        try:
            if self.kind == "zip":
                return self._zipfile().open(name, "r")
            fd = os.open(self.path / name, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without blocking
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise DatasetError(f"{self.describe(name)} is not a regular file")
            return os.fdopen(fd, "rb")
        except ZIP_ERRORS as e:
            raise DatasetError(f"cannot read {self.describe(name)}: {_reason(e)}") from None

    def describe(self, name: str) -> str:
        return str(self.path / name) if self.kind == "dir" else f"{self.path}:{name}"

    def read_image(self, name: str, *, keep_gray: bool = False) -> PIL.Image.Image:
        with self.open(name) as f:
            return decode_image(f, self.describe(name), keep_gray=keep_gray)

    def _metadata_size(self) -> int:
        if self.kind == "dir":
            return (self.path / METADATA_NAME).stat().st_size
        return self._zipfile().getinfo(METADATA_NAME).file_size

    def read_metadata(self) -> dict[str, Any]:
        """`dataset.json` as a dict ({} when absent), read only if its size fits the image count."""
        if METADATA_NAME not in self.names:
            return {}
        where = self.describe(METADATA_NAME)
        limit = METADATA_SLACK + METADATA_BYTES_PER_IMAGE * len(self.image_names)
        try:
            size = self._metadata_size()
        except ZIP_ERRORS as e:
            raise DatasetError(f"cannot read {where}: {_reason(e)}") from None
        if size > limit:
            raise DatasetError(f"{where} is {size:,} bytes, more than the {limit:,} allowed for "
                               f"{len(self.image_names):,} images (damaged or hostile)")
        try:
            with self.open(METADATA_NAME) as f:
                meta = json.loads(f.read(limit + 1))
        except DatasetError:
            raise
        except ZIP_ERRORS as e:
            raise DatasetError(f"cannot read {where}: {_reason(e)}") from None
        except (ValueError, RecursionError) as e:
            raise DatasetError(f"{where} is not valid JSON ({str(e)[:80]})") from None
        if not isinstance(meta, dict):
            raise DatasetError(f"{where}: expected an object {{\"labels\": ...}}")
        return meta

    def read_labels(self, meta: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """`dataset.json`'s labels (from ``meta`` if already read) as {relative name: label}, checked
        (see check_labels); None when absent or null."""
        labels = (self.read_metadata() if meta is None else meta).get("labels")
        if labels is None:
            return None
        where = self.describe(METADATA_NAME)
        try:
            pairs = {str(k).replace("\\", "/"): v for k, v in labels}
        except (ValueError, TypeError) as e:
            raise DatasetError(f"{where}: expected {{\"labels\": [[name, label], ...] or null}} ({e})") from None
        check_labels(list(pairs.values()), where)
        return pairs

    def read_class_names(self, num_classes: int, meta: dict[str, Any] | None = None) -> list[str] | None:
        """Names of classes 0..num_classes-1 when dataset.json records them (``class_names``)."""
        names = (self.read_metadata() if meta is None else meta).get("class_names")
        return None if names is None else check_class_names(names, num_classes, self.describe(METADATA_NAME))

    def has_metadata(self) -> bool:
        return METADATA_NAME in self.names

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        self._zip = None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _zip=None, _zip_pid=-1)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def check_dest(dest: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a destination that exists (unless `overwrite`) or whose kind (zip vs folder) differs."""
    dest = Path(dest)
    is_zip = dest.suffix.lower() == ".zip"
    if dest.is_dir() and is_zip:
        raise DatasetError(f"{{dest}} {dest} is a folder but its name ends in .zip; choose another name")
    if dest.exists() and not is_zip and not dest.is_dir():
        raise DatasetError(f"{{dest}} {dest} is a file; a folder destination must not exist (or use a .zip name)")
    empty_dir = dest.is_dir() and not any(dest.iterdir())
    if dest.exists() and not empty_dir and not overwrite:
        raise DatasetError(f"{{dest}} {dest} already exists; pass {{overwrite}} to replace it")
    return dest


class ArchiveWriter:
    """Write an EDM-format zip (dest ends in .zip) or folder, atomically.

    Use as a context manager: entries go to a temp zip / temp folder beside `dest`, which replaces
    `dest` only when the block completes; an exception (Ctrl-C included) leaves `dest` untouched.
    """

    def __init__(self, dest: str | os.PathLike):
        self.dest = Path(dest)
        self.is_zip = self.dest.suffix.lower() == ".zip"

    @contextlib.contextmanager
    def _open(self) -> Iterator[None]:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        if self.is_zip:
            with atomic_write(self.dest, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
                self._zf = zf
                yield
            return
        tmp = Path(tempfile.mkdtemp(dir=self.dest.parent, prefix=f".{self.dest.name}.", suffix=".tmp"))
        try:
            os.chmod(tmp, 0o777 & ~umask())
            self._root = tmp
            yield
            trash = None
            if self.dest.exists():
                trash = Path(tempfile.mkdtemp(dir=self.dest.parent, prefix=f".{self.dest.name}.", suffix=".old"))
                os.replace(self.dest, trash / "old")
            os.replace(tmp, self.dest)
            if trash is not None:
                shutil.rmtree(trash)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def __enter__(self) -> ArchiveWriter:
        self._cm = self._open()
        self._cm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        return self._cm.__exit__(*exc)

    def write(self, name: str, data: bytes) -> None:
        if self.is_zip:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
            info.external_attr = 0o644 << 16
            self._zf.writestr(info, data, compress_type=zipfile.ZIP_STORED)
        else:
            path = self._root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def write_labels(self, labels: list[list] | None, class_names: list[str] | None = None) -> None:
        """dataset.json in EDM's exact format (json.dumps with default separators); ``class_names``
        (the name of each class index), when known, is an extra key EDM's reader ignores."""
        meta: dict[str, Any] = {"labels": labels}
        if class_names is not None:
            meta["class_names"] = class_names
        self.write(METADATA_NAME, json.dumps(meta).encode("utf8"))
