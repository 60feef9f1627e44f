"""A results folder's bookkeeping: the manifest of the settings that made its files, which seed files are
complete, claims that let several processes share one folder, and temp files left by killed runs.

The manifest (``vcdm-manifest.json``) is written before the first sample; a run whose settings differ
from it is refused (``--overwrite`` deletes the folder's samples first) so that a folder never mixes
samples of two settings. A run that fails before any sample is written puts the folder back as it found
it (``FolderState``): no folder holding only a manifest is left behind. Claims are ``flock``ed files, one per batch: the kernel drops a dead process's
locks, so a killed run never leaves a claim that blocks a later one.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from vcdm.fileio import atomic_write, file_sha256, open_regular
from vcdm.generate.files import naming
from vcdm.generate.options import GenerateError
from vcdm.safeload import JSONFileError, load_json

MANIFEST = "vcdm-manifest.json"
MANIFEST_BYTES = 1 << 20  # a manifest is a few hundred bytes; a larger one is not vcdm's
SEED_FILE = re.compile(r"\d{6,}\.(png|pt)")
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


@lru_cache(maxsize=8)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def network_sha256(path: str | os.PathLike) -> str:
    """A network file's SHA-256, computed once per (path, size, modification time) in a process."""
    st = os.stat(path)
    return _cached_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def complete(path: Path) -> bool:
    """Whether a seed file is whole: a regular file (a link or FIFO planted in the folder is not trusted)
    whose PNG ends with its IEND chunk, or whose .pt (a zip) has its central directory."""
    fd = open_regular(path)
    if fd is None:
        return False
    with os.fdopen(fd, "rb") as f:
        try:
            if path.suffix == ".png":
                f.seek(-len(PNG_END), os.SEEK_END)
                return f.read() == PNG_END
            return zipfile.is_zipfile(f)
        except OSError:
            return False


def _entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return list(it)


def subfolders(outdir: Path) -> list[Path]:
    """The folder and its thousands sub-folders (--subdirs); a symlink is not followed out of the folder."""
    if not outdir.is_dir():
        return []
    return [outdir] + [Path(e.path) for e in _entries(outdir) if e.name.isdigit() and e.is_dir(follow_symlinks=False)]


def seed_files(outdir: Path) -> list[Path]:
    """The folder's seed files (also in thousands sub-directories): anything but a folder named like one,
    links included (a link is removed as itself, never followed)."""
    return [Path(e.path) for folder in subfolders(outdir) for e in _entries(folder)
            if SEED_FILE.fullmatch(e.name) and not e.is_dir(follow_symlinks=False)]


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _show(value: Any) -> str:
    return "unset" if value is None else str(value)


def read_manifest(path: Path) -> dict[str, Any] | None:
    """A folder's recorded settings (None without a manifest); GenerateError for a manifest that is not a
    regular file itself (never followed through a link), is larger than MANIFEST_BYTES, too deep, not JSON,
    or holds no dict of settings (a tampered or foreign file)."""
    if not os.path.lexists(path):
        return None
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise JSONFileError("not a regular file")
        settings = load_json(path, MANIFEST_BYTES, dict).get("settings")
        if not isinstance(settings, dict):
            raise JSONFileError("no settings recorded")
    except (JSONFileError, OSError) as e:
        raise GenerateError(f"{path}: cannot read the results manifest ({e})") from None
    return settings


def claim_manifest(outdir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse a folder holding samples of other settings (unless ``overwrite``: delete them), then record
    ``settings`` (JSON-able, flag name → value) in its manifest."""
    path = outdir / MANIFEST
    try:
        old_settings = read_manifest(path)
    except GenerateError as e:
        if not overwrite:
            raise GenerateError(f"{e}; pass --overwrite to replace the folder's samples") from None
        old_settings = None
    existing = seed_files(outdir)
    if old_settings == settings:
        return
    if existing and not overwrite:
        if old_settings is None:
            raise GenerateError(f"{outdir} holds samples without a {MANIFEST} (settings unknown); pass --overwrite "
                                "to replace them, or another --outdir")
        key = differences(old_settings, settings)[0]
        raise GenerateError(f"{outdir} holds samples made with {key} {_show(old_settings.get(key))}, not "
                            f"{_show(settings.get(key))}; pass --overwrite to replace them, or another --outdir")
    for file in existing:
        file.unlink()
    with naming(path), atomic_write(path, "w") as f:
        json.dump({"format": 1, "settings": settings}, f, indent=2, allow_nan=True)
        f.write("\n")


def remove_stale_temps(outdir: Path) -> list[Path]:
    """Delete temp files (``.<name>.*.tmp``) and claim files of earlier, killed runs. Call only while
    holding the folder's lock exclusively (no other run is writing)."""
    removed = []
    for folder in subfolders(outdir):
        for e in _entries(folder):
            if e.name.startswith(".") and (e.name.endswith(".tmp") or e.name.startswith(".claim-")) \
                    and not e.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)
                    removed.append(Path(e.path))
    return removed


def manifest_digest(outdir: str | os.PathLike) -> str | None:
    """A short hash of the settings in a folder's manifest (None without one): names the samples a
    --load_obs_from folder holds, wherever it lies."""
    try:
        settings = read_manifest(Path(outdir) / MANIFEST)
    except GenerateError:
        return None
    if settings is None:
        return None
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FolderState:
    """What a results folder held before a run wrote its manifest: the manifest's bytes (None: none; an
    oversized one is not kept, and the folder is then left as the run leaves it) and the outermost folder
    the run creates (None: the folder existed)."""
    outdir: Path
    manifest: bytes | None
    created: Path | None
    restorable: bool = True

    @classmethod
    def of(cls, outdir: Path) -> "FolderState":
        created = None
        for folder in (outdir, *outdir.parents):
            if os.path.lexists(folder):
                break
            created = folder
        fd = open_regular(outdir / MANIFEST)
        if fd is None:
            return cls(outdir, None, created)
        with os.fdopen(fd, "rb") as f:
            old = f.read(MANIFEST_BYTES + 1)
        return cls(outdir, old, created, restorable=len(old) <= MANIFEST_BYTES)

    def restore(self) -> None:
        """Put the manifest back as it was (or remove it) and remove the empty folders the run made, unless
        the folder now holds samples or another run holds it."""
        if not self.restorable or seed_files(self.outdir):
            return
        path = self.outdir / MANIFEST
        fd = open_regular(path)
        if fd is not None:
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another run writes into the folder
                    return
                if self.manifest is None:
                    path.unlink()
                elif path.read_bytes() != self.manifest:
                    with naming(path), atomic_write(path, "wb") as f:
                        f.write(self.manifest)
            finally:
                os.close(fd)
        if self.created is not None:
            folders = [*reversed(subfolders(self.outdir)[1:]), self.outdir]
            folders += [p for p in self.outdir.parents if p.is_relative_to(self.created)]
            for folder in folders:
                with contextlib.suppress(OSError):  # not empty: something else lives there
                    folder.rmdir()


@contextlib.contextmanager
def restored_on_failure(outdir: Path, restore: bool = True) -> Iterator[None]:
    """Put the folder back as ``FolderState`` found it if the block fails before any sample is written
    (``restore``: False on every process but the first)."""
    before = FolderState.of(outdir) if restore else None
    try:
        yield
    except BaseException:
        if before is not None:
            with contextlib.suppress(OSError):  # the run's own error is the one to report
                before.restore()
        raise


class FolderLock:
    """A shared lock on the folder's manifest, held while a run writes into the folder. The run that
    finds no other holder first takes it exclusively and removes stale temp files."""

    def __init__(self, outdir: Path, clean: bool = True):
        fd = open_regular(outdir / MANIFEST)
        if fd is None:
            raise GenerateError(f"{outdir / MANIFEST}: the results manifest is not a regular file (replaced while "
                                "starting?)")
        self.fd = fd
        if clean:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                remove_stale_temps(outdir)
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def close(self) -> None:
        os.close(self.fd)  # releases the lock

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_claim(path: Path) -> int:
    """A descriptor of the claim file ``path``: created (O_EXCL) or, when another process made it, opened;
    never through a symlink (O_NOFOLLOW) and never blocking on a FIFO. GenerateError for a claim name
    taken by something other than a regular file."""
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        except FileExistsError:
            pass
        fd = open_regular(path, os.O_RDWR)
        if fd is not None:
            return fd
        if os.path.lexists(path):
            raise GenerateError(f"{path}: a claim name taken by a link or special file, not a claim of vcdm; "
                                "remove it")
        # The holder finished and removed it between our two opens: try again.


@contextlib.contextmanager
def claim(outdir: Path, first_seed: int, wait: bool) -> Iterator[bool]:
    """Claim a batch (named by its first seed): yields True once this process holds it, False if another
    live process does (only when ``wait`` is False). The claim file goes when the batch is done or fails."""
    path = outdir / f".claim-{first_seed:06d}"
    fd = open_claim(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(fd)
