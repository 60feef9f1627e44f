"""What a run writes and under which names, all in one place: network snapshots, training states and
preview grids, written by process 0 under one policy for failed writes (full disk, permissions, I/O errors).

Names (<kimg>: images seen // 1000, six digits):

- ``network-snapshot-<kimg>.safetensors``: the network of EDM's EMA; ``network-snapshot-<kimg>-<std>.safetensors``:
  one per power-function EMA profile (EDM2's names, <std> to three decimals). A later snapshot within the same
  kimg (ticks under 1 kimg apart) takes the name, and the earlier one moves to
  ``network-snapshot-<kimg>[-<std>]-<images>img.safetensors`` (sorting just before it): the plain name holds the
  latest, as in EDM, and no snapshot overwrites another of another time.
- ``training-state-<kimg>.pt`` with a sidecar ``<name>.json`` (its size, SHA-256 and images seen). A later state
  within the same kimg (short ticks, a resumed run) is ``training-state-<kimg>_<n>.pt``: no state overwrites
  another. A state saved after non-finite losses is ``...-nonfinite.pt``, a name ``--resume`` never picks.
- ``samples-<kimg>.png`` and ``samples-conditioning.png``: preview grids of image models.
- ``training_options.json``, ``stats.jsonl``, ``loss.png`` and ``log.txt`` (vcdm.train.loggers).

Every file but log.txt (a stream of whole lines) is written atomically (vcdm.fileio): a killed run leaves
a temp file, never a truncated one, and the next run in the folder removes those temps (`TEMP_GLOBS`).
A write that fails leaves the earlier files as they were and becomes one line naming the file and how to
resume; `check()` stops every process with it.

A state records the run's options as JSON text (the options of training_options.json and the dataset
identity), not as a nested dict, although ``torch.load(weights_only=True)`` would read either: every state
written so far holds that text, and its reader (vcdm.train.rundir) parses it as untrusted input, falling
back to the run's training_options.json; a dict would be a second format to read for no gain.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from vcdm import distributed as dist
from vcdm.checkpoints import CheckpointConfig, CheckpointError, read_checkpoint_config, save_checkpoint
from vcdm.fileio import atomic_path, atomic_write, file_sha256, temp_glob

if TYPE_CHECKING:
    from vcdm.train.options import TrainOptions
    from vcdm.train.state import TrainState

STATE_RE = re.compile(r"training-state-(\d+)(?:_(\d+))?\.pt")  # resumable names; "-nonfinite" ones never match
PROFILE_SNAPSHOT_RE = re.compile(r"network-snapshot-(\d+)-(\d+\.\d+)(?:-\d+img)?\.safetensors")  # (kimg, EMA length)
NONFINITE = "-nonfinite"
CONDITIONING_GRID = "samples-conditioning.png"
SIDECAR_BYTES = 1 << 16  # a sidecar holds a size, a digest and a count
# Every file process 0 writes atomically, as globs: their temp files are what a killed run leaves.
ATOMIC_FILES = ("training-state-*", "network-snapshot-*", "samples-*", "loss.png", "stats.jsonl",
                "training_options.json")
TEMP_GLOBS = tuple(temp_glob(name) for name in ATOMIC_FILES)
# torch.save reports a failed write (e.g. a full disk) as a RuntimeError from its zip writer.
TORCH_WRITE_ERRORS = ("inline_container", "PytorchStreamWriter", "file write failed", "unexpected pos")


def snapshot_name(nimg: int, ema_std: float | None = None, exact: bool = False) -> str:
    """``network-snapshot-<kimg>.safetensors``, or ``...-<std>.safetensors`` for a power-function EMA profile;
    ``exact``: ending ``-<images>img`` (a snapshot moved aside by a later one of the same kimg)."""
    length = "" if ema_std is None else f"-{ema_std:.3f}"
    images = f"-{nimg}img" if exact else ""
    return f"network-snapshot-{nimg // 1000:06d}{length}{images}.safetensors"


def move_aside(path: Path, nimg: int, ema_std: float | None) -> None:
    """Before the snapshot of `nimg` images is written to `path`: an earlier snapshot there of another time moves
    to its exact name; one whose config cannot be read (or names another kimg) to ``<name>-unreadable[_<n>]``."""
    if not path.exists():
        return
    try:
        held = read_checkpoint_config(path).training.get("nimg")
    except CheckpointError:
        held = None
    if held == nimg:
        return  # the same point again (a resumed run): replaced
    if isinstance(held, int) and held // 1000 == nimg // 1000:
        target = path.with_name(snapshot_name(held, ema_std, exact=True))
    else:
        target = path.with_name(f"{path.stem}-unreadable{path.suffix}")
    stem, counter = target.stem, 0
    while target.exists():
        counter += 1
        target = target.with_name(f"{stem}_{counter}{target.suffix}")
    os.replace(path, target)


def state_name(nimg: int, suffix: str = "", counter: int = 0) -> str:
    """``training-state-<kimg>[_<counter>].pt``; with a suffix (`NONFINITE`) a name ``--resume`` never picks."""
    return f"training-state-{nimg // 1000:06d}{f'_{counter}' if counter else ''}{suffix}.pt"


def resumable_states(run_dir: Path) -> list[Path]:
    """The states in `run_dir` whose names ``--resume`` may pick (not ``-nonfinite`` ones, not sidecars)."""
    return [p for p in run_dir.glob("training-state-*.pt") if STATE_RE.fullmatch(p.name)]


def sidecar_path(state_path: Path) -> Path:
    """``<state>.json``: the state's size, SHA-256 and images seen."""
    return state_path.with_name(state_path.name + ".json")


def grid_name(nimg: int) -> str:
    """``samples-<kimg>.png``: a preview grid."""
    return f"samples-{nimg // 1000:06d}.png"


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
    tensors = {"net": weights}
    if embedder is not None:
        extra = embedder.export_state()
        if extra:
            tensors["embedder"] = extra
    training = dict(config.training, nimg=nimg, **(record or {}))
    save_checkpoint(path, tensors, replace(config, training=training))


def write_snapshots(outputs: Outputs, run_dir: Path, ema, embedder, config: CheckpointConfig, nimg: int) -> None:
    """A snapshot per network the EMA keeps (`snapshot_name`), one at a time (process 0 writes)."""
    if dist.rank() != 0:
        return
    for std, weights, record in ema.snapshots():
        path = run_dir / snapshot_name(nimg, std)

        def write() -> None:
            move_aside(path, nimg, std)  # noqa: B023 (called at once)
            write_snapshot(path, weights, embedder, config, nimg, record)  # noqa: B023

        outputs.attempt(path, write)
        del weights


def free_state_path(run_dir: Path, nimg: int, resumable: bool) -> Path:
    """The first name for a state at `nimg` images that no earlier state (resumable or not) of the run holds."""
    counter = 0
    while any((run_dir / state_name(nimg, s, counter)).exists() for s in ("", NONFINITE)):
        counter += 1
    return run_dir / state_name(nimg, "" if resumable else NONFINITE, counter)


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write atomically, then the sidecar. A stale sidecar (same name) goes first, so a crash in between
    leaves a state without sidecar (checked by loading), never one that fails its check."""
    path = Path(path)
    side = sidecar_path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        sidecar = {"size": tmp.stat().st_size, "sha256": file_sha256(tmp), "nimg": int(state["counters"]["nimg"])}
        side.unlink(missing_ok=True)
    with atomic_write(side, "w") as f:
        json.dump(sidecar, f)


def write_state(outputs: Outputs, run_dir: Path, state: TrainState, opts: TrainOptions, dataset: dict[str, Any],
                resumable: bool) -> Path | None:
    """Save `state` with the run's options and dataset identity under the next free name at its kimg
    (``-nonfinite`` unless `resumable`). Every process calls it (the random states are gathered); returns
    the path process 0 wrote, else None."""
    data = state.state_dict(json.dumps(dict(opts.to_dict(), dataset=dataset)))
    path = free_state_path(run_dir, state.counters["nimg"], resumable)
    return path if outputs.attempt(path, lambda: save_state(path, data)) else None
