"""Atomic file writes and small parsing helpers shared by every command that writes files."""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import http.client
import itertools
import operator
import os
import re
import shutil
import stat
import tempfile
import urllib.request
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

from tqdm import tqdm


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _permit(fd: int) -> None:
    """Give a temp file normal permissions (mkstemp makes it 0600; by descriptor, so a link planted at its
    name is never followed)."""
    os.fchmod(fd, 0o666 & ~umask())


def _rename(tmp: str, path: Path) -> None:
    """Move a finished temp file into place; an error names ``path``, the file the user knows."""
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def open_regular(path: str | os.PathLike, flags: int = os.O_RDONLY) -> int | None:
    """A descriptor of ``path`` if it is a regular file itself: never follows a symlink (O_NOFOLLOW) and
    never blocks on a FIFO (O_NONBLOCK, then checked); None otherwise (also when absent)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temp file ``.<name>.<random>.tmp`` beside `path` (`temp_glob` matches it): (descriptor, path)."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def temp_glob(name_glob: str) -> str:
    """The glob of the temp files that atomic writes of names matching `name_glob` leave if killed."""
    return f".{name_glob}.*.tmp"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """Open a temp file beside `path`; rename it over `path` only if the block finishes and the file closes.

    A crash, Ctrl-C or a full disk leaves `path` as it was (absent or the previous version). ``durable``:
    the bytes also reach the disk (fsync) before the rename, so that a power cut cannot leave a renamed but
    torn file. Samples skip it (``durable=False``): their readers check each file's end
    (vcdm.generate.results.complete) and redo a torn one, and an fsync per file is most of the time spent
    writing thousands of small samples.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
            _permit(f.fileno())
        _rename(tmp, path)  # after the close, which reports what some file systems (NFS) defer to it
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` for libraries that insist on writing by name; rename on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    try:
        yield Path(tmp)
        _permit(fd)
        _rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


class IntRanges(Sequence[int]):
    """Integers as EDM's --seeds writes them ('1,5,7-9'), kept as ranges until used: length, indexing,
    slicing and iteration cost as much for '0-999999999' as for '0-9'. Adjacent ranges are merged."""

    def __init__(self, ranges: Iterable[range] = ()):
        merged: list[range] = []
        for r in ranges:
            if r.step != 1:
                raise ValueError(f"IntRanges holds ranges of step 1, got {r}")
            if not r:
                continue
            if merged and merged[-1].stop == r.start:
                merged[-1] = range(merged[-1].start, r.stop)
            else:
                merged.append(r)
        self.ranges = tuple(merged)
        self._ends = list(itertools.accumulate(len(r) for r in self.ranges))

    @classmethod
    def parse(cls, text: str, name: str = "value") -> "IntRanges":
        """'1,5,7-9' → 1, 5, 7, 8, 9; ValueError naming ``name`` for anything else."""
        ranges = []
        for part in str(text).split(","):
            m = INT_OR_RANGE.fullmatch(part.strip())
            if m is None:
                raise ValueError(f"{name}: expected integers or ranges like '0-9,12', got '{text}'")
            lo = _int(m.group(1), name)
            hi = lo if m.group(2) is None else _int(m.group(2), name)
            if hi < lo:
                raise ValueError(f"{name}: range '{part.strip()}' ends before it starts")
            ranges.append(range(lo, hi + 1))
        return cls(ranges)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            pieces, offset = [], 0
            for r in self.ranges:
                lo, hi = max(start - offset, 0), min(stop - offset, len(r))
                if lo < hi:
                    pieces.append(r[lo:hi])
                offset += len(r)
            return IntRanges(pieces)
        i = operator.index(index)
        i += len(self) if i < 0 else 0
        if not 0 <= i < len(self):
            raise IndexError("IntRanges index out of range")
        k = bisect.bisect_right(self._ends, i)
        return self.ranges[k][i - (self._ends[k - 1] if k else 0)]

    def __iter__(self) -> Iterator[int]:
        return itertools.chain.from_iterable(self.ranges)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, IntRanges):
            return self.ranges == other.ranges
        if isinstance(other, (list, tuple, range)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __str__(self) -> str:
        return ",".join(str(r.start) if len(r) == 1 else f"{r.start}-{r.stop - 1}" for r in self.ranges)

    def __repr__(self) -> str:
        return f"IntRanges('{self}')"

    def min(self) -> int:
        return min(r.start for r in self.ranges)

    def max(self) -> int:
        return max(r.stop - 1 for r in self.ranges)

    def unique(self) -> "IntRanges":
        """The integers without repeats, each where it first occurs; linear in the number of ranges."""
        starts: list[int] = []  # the integers seen so far, as sorted disjoint intervals [start, stop)
        stops: list[int] = []
        pieces = []
        for r in self.ranges:
            lo, hi = r.start, r.stop
            i, j = bisect.bisect_right(stops, lo), bisect.bisect_left(starts, hi)  # intervals i..j-1 overlap
            cursor = lo
            for a, b in zip(starts[i:j], stops[i:j]):
                if cursor < a:
                    pieces.append(range(cursor, a))
                cursor = max(cursor, b)
            if cursor < hi:
                pieces.append(range(cursor, hi))
            new = (min(lo, starts[i]) if i < j else lo, max(hi, stops[j - 1]) if i < j else hi)
            starts[i:j], stops[i:j] = [new[0]], [new[1]]
        return IntRanges(pieces)


INT_OR_RANGE = re.compile(r"(-?\d+)(?:-(-?\d+))?")


def _int(digits: str, name: str) -> int:
    if len(digits.lstrip("-")) > 100:
        raise ValueError(f"{name}: {digits[:20]}... is not a usable integer ({len(digits)} digits)")
    return int(digits)


def as_int(value: object, name: str = "value") -> int:
    """An integer given as an int (numpy's and 0-d integer tensors too); TypeError for bools, floats
    and anything else, which int() would silently truncate or reinterpret."""
    if isinstance(value, bool) or getattr(value, "dtype", None) is not None and "bool" in str(value.dtype):
        raise TypeError(f"{name}: expected integers, got the bool {value}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected integers, got {type(value).__name__} {value!r}") from None


def parse_int_list(text: str | Sequence[int], flag: str = "value", limit: int = 1 << 16) -> list[int]:
    """Parse '1,5,7-9' (EDM's --seeds syntax), or check a sequence of true ints, into a list of at most
    ``limit`` integers (a longer one is refused before it is built)."""
    values = IntRanges.parse(text, flag) if isinstance(text, str) else text
    if not isinstance(values, (IntRanges, Sequence)):
        raise TypeError(f"{flag}: expected integers as a list or as text like '0-9,12', got {type(text).__name__}")
    if len(values) > limit:
        raise ValueError(f"{flag}: {len(values)} values; at most {limit} are accepted")
    return [as_int(v, flag) for v in values]


def download(url: str, dest: str | os.PathLike, *, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download `url` to `dest` atomically (a broken transfer leaves nothing behind)."""
    request = urllib.request.Request(url, headers={"User-Agent": "vcdm"})
    with urllib.request.urlopen(request, timeout=timeout) as response, atomic_write(dest) as f:
        size = response.headers.get("Content-Length")
        with tqdm.wrapattr(f, "write", total=int(size) if size else None, desc=Path(dest).name,
                           unit="B", unit_scale=True, unit_divisor=1024, disable=not progress) as out:
            shutil.copyfileobj(response, out)
    return Path(dest)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_weights(path: str | os.PathLike | None, *, what: str, flag: str, env: str, file: str, url: str,
                 caches: Sequence[Path], error: type[Exception], allow_download: bool = True,
                 progress: bool = True) -> Path:
    """A pretrained weights file: ``path`` (given as ``flag``), else ``$env``, else the first of ``caches``
    that exists, else downloaded from ``url`` into ``caches[0]`` where allowed. Raises ``error`` with one
    line saying which file to put where."""
    for given, origin in ((path, flag), (os.environ.get(env) or None, f"${env}")):
        if given is not None:
            if not Path(given).is_file():
                raise error(f"{origin}: no such file '{given}' (expected {file} from {url})")
            return Path(given)
    for candidate in caches:
        if candidate.is_file():
            return candidate
    hint = f"{what} weights not found. Download {url} and either put it at {caches[0]}, pass {flag} PATH, or set ${env}=PATH"
    if not allow_download:
        raise error(hint)
    try:
        return download(url, caches[0], progress=progress)
    except (OSError, http.client.HTTPException) as e:  # no network, timeouts, HTTP errors, read-only cache …
        raise error(f"{hint} (download failed: {e})") from None
