"""A results folder's bookkeeping: the manifest of the settings that made its files, which seed files are
complete, claims that let several processes share one folder, and temp files left by killed runs.

The manifest (``vcdm-manifest.json``) is written before the first sample; a run whose settings differ
from it is refused (``--overwrite`` deletes the folder's samples first) so that a folder never mixes
samples of two settings. Claims are ``flock``ed files, one per batch: the kernel drops a dead process's
locks, so a killed run never leaves a claim that blocks a later one.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from vcdm.fileio import atomic_write
from vcdm.generate.files import naming
from vcdm.generate.options import GenerateError

MANIFEST = "vcdm-manifest.json"
SEED_FILE = re.compile(r"\d{6,}\.(png|pt)")
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def complete(path: Path) -> bool:
    """Whether a seed file is whole: a PNG ends with its IEND chunk, a .pt (a zip) has its central directory."""
    try:
        if path.suffix == ".png":
            with open(path, "rb") as f:
                f.seek(-len(PNG_END), os.SEEK_END)
                return f.read() == PNG_END
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def seed_files(outdir: Path) -> list[Path]:
    """The folder's seed files (also in thousands sub-directories)."""
    if not outdir.is_dir():
        return []
    found = [p for p in outdir.iterdir() if p.is_file() and SEED_FILE.fullmatch(p.name)]
    for sub in outdir.iterdir():
        if sub.is_dir() and sub.name.isdigit():
            found += [p for p in sub.iterdir() if p.is_file() and SEED_FILE.fullmatch(p.name)]
    return found


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _show(value: Any) -> str:
    return "unset" if value is None else str(value)


def claim_manifest(outdir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse a folder holding samples of other settings (unless ``overwrite``: delete them), then record
    ``settings`` (JSON-able, flag name → value) in its manifest."""
    path = outdir / MANIFEST
    try:
        old = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError) as e:
        raise GenerateError(f"{path}: cannot read the results manifest ({e}); pass --overwrite to replace "
                            "the folder's samples") from None
    old_settings = old.get("settings") if isinstance(old, dict) else None
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
    dirs = [outdir] + ([p for p in outdir.iterdir() if p.is_dir() and p.name.isdigit()] if outdir.is_dir() else [])
    for folder in dirs:
        for p in folder.iterdir():
            if p.is_file() and p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.startswith(".claim-")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed


def manifest_digest(outdir: str | os.PathLike) -> str | None:
    """A short hash of the settings in a folder's manifest (None without one): names the samples a
    --load_obs_from folder holds, wherever it lies."""
    try:
        settings = json.loads((Path(outdir) / MANIFEST).read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class FolderLock:
    """A shared lock on the folder's manifest, held while a run writes into the folder. The run that
    finds no other holder first takes it exclusively and removes stale temp files."""

    def __init__(self, outdir: Path, clean: bool = True):
        self.fd = os.open(outdir / MANIFEST, os.O_RDONLY)
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


@contextlib.contextmanager
def claim(outdir: Path, first_seed: int, wait: bool) -> Iterator[bool]:
    """Claim a batch (named by its first seed): yields True once this process holds it, False if another
    live process does (only when ``wait`` is False). The claim file goes when the batch is done or fails."""
    path = outdir / f".claim-{first_seed:06d}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
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
