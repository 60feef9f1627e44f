"""What a run writes, under one policy for failed writes (full disk, permissions, I/O errors).

Process 0 writes; a write that fails leaves the earlier files as they were (every write is atomic)
and becomes one line naming the file and how to resume; `check()` stops every process with it.
"""
from __future__ import annotations

import errno
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

from vcdm import distributed as dist
from vcdm.checkpoints import CheckpointConfig

# Temp files of atomic writes (vcdm.fileio: ".<name>.<random>.tmp") that a killed run leaves behind.
TEMP_GLOBS = (".training-state-*.tmp", ".network-snapshot-*.tmp", ".samples-*.tmp", ".loss.png.*.tmp",
              ".stats.jsonl.*.tmp", ".training_options.json.*.tmp")
# torch.save reports a failed write (e.g. a full disk) as a RuntimeError from its zip writer.
TORCH_WRITE_ERRORS = ("inline_container", "PytorchStreamWriter", "file write failed", "unexpected pos")


class TrainingError(RuntimeError):
    """A run that had to stop (non-finite losses, a failed write); the message is one line."""


def write_failure(e: BaseException, path: Path) -> str | None:
    """Why writing `path` failed, in a few words, if `e` is a write failure (else None: a bug)."""
    if isinstance(e, OSError):
        return {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(e.errno, e.strerror or str(e))
    if isinstance(e, RuntimeError) and any(s in str(e) for s in TORCH_WRITE_ERRORS):
        try:
            full = shutil.disk_usage(path.parent).free < 1 << 20
        except OSError:
            full = False
        return "disk full" if full else f"write failed: {str(e).splitlines()[0][:200]}"
    return None


class Outputs:
    """Guarded writes into one run directory (process 0 writes, every process checks)."""

    def __init__(self, run_dir: Path, resumable: bool = False):
        self.run_dir, self.error = run_dir, ""
        self.resumable = resumable  # whether run_dir holds a training state to resume from

    def attempt(self, path: Path, write: Callable[[], None]) -> bool:
        """Run `write` on process 0 unless a write already failed; record a write failure. True if written."""
        if dist.rank() != 0 or self.error:
            return False
        try:
            write()
            return True
        except (OSError, RuntimeError) as e:
            why = write_failure(e, Path(path))
            if why is None:
                raise
            if Path(path).is_dir() and isinstance(e, OSError) and e.filename:
                path = e.filename  # a directory's set-up: name the file that failed
            self.fail(path, why)
            return False

    def fail(self, path: Path, why: str) -> None:
        if self.error:
            return
        if self.resumable:
            then = f"earlier snapshots and training states are intact; fix that, then: vcdm train --resume={self.run_dir}"
        else:
            then = "no training state was saved yet; fix that, then rerun the command"
        self.error = f"cannot write {path} ({why}); {then}"

    def check(self) -> None:
        """Stop every process, with one line, if a write of process 0 failed (a collective)."""
        error = dist.broadcast_object(self.error)
        if error:
            raise TrainingError(error)


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temp files that killed runs left in `run_dir` (a complete state among them can be GBs)."""
    removed = []
    for pattern in TEMP_GLOBS:
        for p in run_dir.glob(pattern):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def write_snapshot(path: Path, weights: dict, embedder, config: CheckpointConfig, nimg: int, record: dict | None = None) -> None:
    """An EMA network's weights (and a fitted embedder's state) with the checkpoint config; `record`: more
    entries for its training section (e.g. the EMA profile)."""
    from vcdm import checkpoints

    tensors = {"net": weights}
    if embedder is not None:
        extra = embedder.export_state()
        if extra:
            tensors["embedder"] = extra
    training = dict(config.training, nimg=nimg, **(record or {}))
    checkpoints.save_checkpoint(path, tensors, replace(config, training=training))


def write_snapshots(outputs: Outputs, run_dir: Path, ema, embedder, config: CheckpointConfig, nimg: int) -> None:
    """A snapshot per network the EMA keeps: network-snapshot-<kimg>.safetensors for EDM's EMA,
    network-snapshot-<kimg>-<std>.safetensors for each power-function profile (process 0 writes)."""
    if dist.rank() != 0:
        return
    for suffix, weights, record in ema.snapshots():
        path = run_dir / f"network-snapshot-{nimg // 1000:06d}{suffix}.safetensors"
        outputs.attempt(path, lambda: write_snapshot(path, weights, embedder, config, nimg, record))  # noqa: B023 (called at once)
        del weights
