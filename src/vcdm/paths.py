"""Output paths that fail early and clearly: writability checks before any work, OS errors as one line
naming the path, and file names shortened deterministically when they would pass the 255-byte limit."""
from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

NAME_MAX = 255  # bytes per path component on ext4, xfs, btrfs, APFS, NTFS
HASH_CHARS = 16

REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a parent is a file, not a directory",
    errno.EISDIR: "is a directory",
    errno.EEXIST: "already exists",
}


class OutputError(ValueError):
    """An output that cannot be written; the message is one line naming the path."""


def describe_os_error(error: OSError, path: str | os.PathLike | None = None) -> str:
    """``cannot write <path>: <reason>`` for an OS error (the path it names, else ``path``)."""
    where = error.filename if error.filename is not None else path
    reason = REASONS.get(error.errno) or error.strerror or str(error)
    return f"cannot write {where}: {reason}" if where is not None else f"cannot write: {reason}"


def fit_name(name: str, limit: int = NAME_MAX) -> str:
    """``name`` if it fits ``limit`` bytes; else a readable prefix, '~' and a hash of the whole name,
    ``limit`` bytes at most (the same name always gives the same result)."""
    data = name.encode()
    if len(data) <= limit:
        return name
    digest = hashlib.sha256(data).hexdigest()[:HASH_CHARS]
    prefix = data[:limit - HASH_CHARS - 1].decode(errors="ignore")
    return f"{prefix}~{digest}"


def _existing_ancestor(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(".")


def check_writable(path: str | os.PathLike, flag: str, *, is_dir: bool = True) -> None:
    """Raise OutputError (naming ``flag`` and ``path``) unless ``path`` — a directory to fill, or a file to
    write when ``is_dir`` is False — can be created or written. Creates nothing."""
    path = Path(path)
    try:
        long = next((p for p in path.parts if len(p.encode()) > NAME_MAX), None)
        if long is not None:
            raise OSError(errno.ENAMETOOLONG, "File name too long", str(path))
        if path.exists():
            if is_dir != path.is_dir():
                kind = "a file, not a directory" if is_dir else "a directory, not a file"
                raise OutputError(f"{flag}: {path} is {kind}")
            target = path if is_dir else path.parent
        else:
            target = _existing_ancestor(path.parent if not is_dir else path)
            if not target.is_dir():
                raise OSError(errno.ENOTDIR, "Not a directory", str(target))
        if not os.access(target, os.W_OK | os.X_OK):
            raise OSError(errno.EACCES, "Permission denied", str(target))
    except OSError as e:
        raise OutputError(f"{flag}: {describe_os_error(e, path)}") from None
