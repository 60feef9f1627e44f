"""Where a run writes and what it resumes: the run directory, the training state to resume, the seed,
the dataset's identity and the run folder's lock.

A run records its dataset by content (`dataset_identity`), so a run whose data was staged elsewhere
(a requeued cluster job) resumes from the new path, and a different dataset at the old path is refused.
Process 0 decides (`plan_run`), locks the run folder, and every process follows its plan.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import socket
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vcdm import distributed as dist
from vcdm.data.archive import METADATA_NAME, Archive, DatasetError, is_image
from vcdm.fileio import file_sha256
from vcdm.train.loggers import new_run_id, start_wandb, wandb_wanted
from vcdm.safeload import load_json
from vcdm.train.options import IDENTITY, OPTIONS_BYTES, OptionError, TrainOptions
from vcdm.train.outputs import TrainingError, resumable_states, write_failure
from vcdm.train.state import StateError, load_state, newest_valid_state

RESUME_MATCH = tuple(k for k in (*IDENTITY, "desc") if k != "path")  # the data is matched by its identity
LOCK_NAME = "training.lock"


@dataclass
class RunPlan:
    run_dir: Path
    resume: Path | None  # the training state to resume from
    seed: int  # the resumed run's seed if it recorded one, else a random one
    dataset: dict[str, Any]  # dataset_identity(--path)
    wandb_id: str | None = None
    finished_nimg: int | None = None  # the resumed state already reached --duration: nothing to do
    moved_from: str | None = None  # where the resumed run's dataset was recorded, if not at --path
    created: bool = False  # process 0 made run_dir for this run
    bf16: bool | None = None  # the resumed run's precision (False if it recorded none: vcdm trained in float32 then)


# ------------------------------------------------------------------------------------------ dataset identity

def dataset_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What a dataset is, read cheaply from its index: the names and sizes of its images and of its
    dataset.json (labels), with the zip's CRCs or, for a folder, dataset.json's SHA-256. Image bytes
    are not read. Equal identities mean the same images and labels wherever the files lie."""
    p = Path(path)
    h = hashlib.sha256()
    images = nbytes = 0
    try:
        if p.is_dir():
            kind = "folder"
            entries = []
            for name in Archive(p).names:
                if is_image(name) or name == METADATA_NAME:
                    digest = file_sha256(p / name) if name == METADATA_NAME else ""
                    entries.append((name, (p / name).stat().st_size, digest))
        elif p.is_file():
            kind = "zip"
            with zipfile.ZipFile(p) as z:
                entries = sorted((i.filename, i.file_size, f"{i.CRC:08x}") for i in z.infolist() if not i.is_dir())
        else:
            raise OptionError(f"--path: {path} does not exist (expected a dataset zip or folder)")
    except (OSError, zipfile.BadZipFile, DatasetError) as e:
        raise OptionError(f"--path: cannot read {path} ({str(e) or type(e).__name__})") from None
    for name, size, check in entries:
        if is_image(name) or name == METADATA_NAME:
            h.update(f"{name}\0{size}\0{check}\n".encode("utf-8", "surrogateescape"))
            images += is_image(name)
            nbytes += size
    return {"kind": kind, "images": images, "bytes": nbytes, "sha256": h.hexdigest()}


def describe_identity(identity: dict[str, Any]) -> str:
    return f"{identity.get('images')} images, {identity.get('bytes'):,} bytes, content {str(identity.get('sha256'))[:12]}"


def _recorded_identity(recorded: dict[str, Any]) -> dict[str, Any] | None:
    """The dataset identity a run recorded, if well-formed (a tampered record counts as none)."""
    ident = recorded.get("dataset")
    types = {"kind": str, "images": int, "bytes": int, "sha256": str}
    ok = isinstance(ident, dict) and all(type(ident.get(k)) is t for k, t in types.items())
    return ident if ok else None


def same_data(recorded: dict[str, Any], path: str, identity: dict[str, Any]) -> bool:
    """Whether a run that recorded `recorded` (its options) trained on the dataset at `path`: by content,
    or, for runs that recorded no identity, by the resolved path (symlinks followed)."""
    ident = _recorded_identity(recorded)
    if ident is not None:
        return (ident.get("kind"), ident["sha256"]) == (identity["kind"], identity["sha256"])
    return os.path.realpath(str(recorded.get("path", ""))) == os.path.realpath(path)


def _same_place(recorded: dict[str, Any], path: str) -> bool:
    return os.path.realpath(str(recorded.get("path", ""))) == os.path.realpath(path)


# ------------------------------------------------------------------------------------------ which state

def _recorded_options(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's training_options.json, normalised (None if absent or unreadable)."""
    try:
        raw = load_json(run_dir / "training_options.json", OPTIONS_BYTES, dict)
        recorded = TrainOptions.from_dict(raw).to_dict()
    except (OSError, ValueError, TypeError, RecursionError, AttributeError):
        return None
    return dict(recorded, dataset=raw.get("dataset"))


def _state_options(state: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The options a state was trained with (its own record, else its run directory's)."""
    try:
        recorded = json.loads(state.get("options") or "{}")
    except (TypeError, ValueError, RecursionError):
        recorded = {}
    if not isinstance(recorded, dict) or _recorded_identity(recorded) is None:
        recorded = _recorded_options(run_dir) or (recorded if isinstance(recorded, dict) else {})
    return recorded


def _has_states(run_dir: Path) -> bool:
    return bool(resumable_states(run_dir))


def find_resume(opts: TrainOptions, identity: dict[str, Any]) -> tuple[Path | None, dict | None, str]:
    """(the training state to resume from, loaded and checked, or None; why, in a few words). Process 0.
    Raises OptionError when the named run cannot be continued with this data."""
    if not opts.resume:
        return None, None, "no --resume"
    target = Path(opts.resume)
    if opts.resume == "auto":
        return _find_auto(opts, identity)
    if target.is_file():
        found = target, load_state(target)  # raises StateError naming the problem
    elif target.is_dir():
        found = newest_valid_state([target])
        if found is None:
            raise OptionError(f"--resume: no finite, readable training-state-*.pt in {opts.resume}")
    else:
        raise OptionError(f"--resume: {opts.resume} is neither a training state, a run directory nor 'auto'")
    path, state = found
    recorded = _state_options(state, path.parent)
    if not same_data(recorded, opts.path, identity):
        then = _recorded_identity(recorded)
        if then is None:
            raise OptionError(f"--path {opts.path} differs from the resumed run's {recorded.get('path')} (an older run "
                              f"that recorded no dataset identity); pass that path or start a new run")
        change = "changed since the run started" if _same_place(recorded, opts.path) else "is not the run's dataset"
        raise OptionError(f"--path {opts.path} {change}: the run trained on {describe_identity(then)} (from "
                          f"{recorded.get('path')}), this is {describe_identity(identity)}; start a new run for it")
    return path, state, f"the newest finite state in {path.parent}" if target.is_dir() else "named by --resume"


def _find_auto(opts: TrainOptions, identity: dict[str, Any]) -> tuple[Path | None, dict | None, str]:
    out = Path(opts.outdir)
    candidates = [out] if opts.nosubdir else (sorted(d for d in out.iterdir() if d.is_dir()) if out.is_dir() else [])
    same, changed = [], []
    for d in candidates:
        recorded = _recorded_options(d)
        if recorded is None or not _has_states(d) or any(recorded.get(k) != getattr(opts, k) for k in RESUME_MATCH):
            continue
        if same_data(recorded, opts.path, identity):
            same.append(d)
        elif _same_place(recorded, opts.path):
            changed.append((d, recorded))
    if not same and changed:
        d, recorded = changed[0]
        raise OptionError(f"--resume=auto: the dataset at {opts.path} changed since {d} started (then "
                          f"{describe_identity(_recorded_identity(recorded))}, now {describe_identity(identity)}); "
                          f"restore it, or start a new run (another --outdir, or no --resume)")
    if not same:
        return None, None, f"no run in {out} with this dataset and these model options"
    found = newest_valid_state(same)
    if found is None:
        return None, None, f"no finite, readable training state in {', '.join(map(str, same))}"
    return found[0], found[1], f"the newest finite state of the runs in {out} with this dataset and these options"


# ------------------------------------------------------------------------------------------ run directory

class RunLock:
    """One writer per run folder: an exclusive fcntl lock on `<run_dir>/training.lock`, held for the run's
    life and dropped by the kernel when the process ends, however it ends (a lock is never stale). A
    POSIX record lock (lockf), not flock: forked DataLoader workers do not inherit it, so a killed run's
    lingering workers cannot hold its folder. The file names its holder; it is never replaced (a lock
    lives on the file's inode). A run folder made for this run and left holding only the lock (a run
    that failed while starting) is removed."""

    def __init__(self, run_dir: Path, created: bool = False):
        self.run_dir, self.created = run_dir, created
        path = run_dir / LOCK_NAME
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise TrainingError(f"cannot lock {path} ({write_failure(e, path)})") from None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise TrainingError(f"cannot lock {path} ({e.strerror})") from None
            holder = _holder(self.fd)
            os.close(self.fd)
            raise TrainingError(f"{run_dir} is in use by another training process ({holder}); one process "
                                f"trains into a run folder at a time") from None
        os.ftruncate(self.fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode())

    def release(self) -> None:
        if self.fd < 0:
            return
        if self.created:
            with contextlib.suppress(OSError):  # e.g. removed already by a failed start
                if [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
                    (self.run_dir / LOCK_NAME).unlink()
                    self.run_dir.rmdir()
        os.close(self.fd)
        self.fd = -1


def _holder(fd: int) -> str:
    return (os.read(fd, 4096).decode("utf-8", "replace").strip().splitlines() or ["unknown"])[0][:200]


def lock_holder(run_dir: Path) -> str | None:
    """Who holds `run_dir`'s lock now (its line), or None; takes no lock and writes nothing."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError:
        return _holder(fd)
    finally:
        os.close(fd)  # also drops the probe's own shared lock


def make_run_dir(opts: TrainOptions, resume: Path | None) -> tuple[Path, str | None]:
    """(run directory, wandb id or None); the directory is not created here."""
    if resume is not None:
        run_dir = resume.parent
        run_id = run_dir.name.split("-")[0]
        wandb_id = start_wandb(opts.to_dict(), run_id=run_id, wandb_dir=opts.wandb_dir) if wandb_wanted() else None
        return run_dir, wandb_id
    wandb_id = start_wandb(opts.to_dict(), run_id=opts.resume_id, wandb_dir=opts.wandb_dir) if wandb_wanted() else None
    run_id = wandb_id or new_run_id()
    if opts.nosubdir:
        return Path(opts.outdir), wandb_id
    run_dir = Path(opts.outdir) / (f"{run_id}-{opts.desc}" if opts.desc else run_id)
    if run_dir.exists():
        raise OptionError(f"--outdir: run directory {run_dir} already exists")
    return run_dir, wandb_id


def decide(opts: TrainOptions) -> tuple[RunPlan, dict | None, str]:
    """Process 0, writing nothing: the plan (its run directory not made yet), the loaded state, and why
    that state (or a new run)."""
    identity = dataset_identity(opts.path)
    resume, state, why = find_resume(opts, identity)
    plan = RunPlan(Path(opts.outdir), resume, secrets.randbelow(1 << 31), identity)
    if resume is not None:
        recorded = _state_options(state, resume.parent)
        plan.run_dir = resume.parent
        plan.seed = recorded["seed"] if isinstance(recorded.get("seed"), int) else plan.seed
        plan.bf16 = recorded.get("bf16") is True
        plan.moved_from = None if _same_place(recorded, opts.path) else str(recorded.get("path"))
        _check_finished(plan, state, opts)
    return plan, state, why


def _check_finished(plan: RunPlan, state: dict, opts: TrainOptions) -> None:
    nimg = int(state["counters"]["nimg"])
    plan.finished_nimg = nimg if nimg >= max(round(opts.duration * 1e6), 1) else None


def plan_run(opts: TrainOptions) -> tuple[RunPlan, dict | None, RunLock | None]:
    """Process 0 finds the state to resume, names and makes the run directory and locks it; the others
    receive its plan. Returns (plan, the loaded state on process 0, its lock on process 0)."""
    plan, state, lock = None, None, None
    if dist.rank() == 0:
        try:
            plan, state, why = decide(opts)
            if plan.resume is None and opts.resume:
                print(f"--resume={opts.resume}: {why}; starting a new run", flush=True)
            if plan.finished_nimg is None:
                plan.run_dir, plan.wandb_id = make_run_dir(opts, plan.resume)
                plan.created, lock = _make_and_lock(plan.run_dir)
                if plan.resume is not None and (opts.resume == "auto" or Path(opts.resume).is_dir()):
                    state = _newest_after_lock(plan, state, opts)
            if plan.moved_from is not None and plan.finished_nimg is None:
                print(f"Dataset moved: {opts.path} holds the run's dataset (recorded at {plan.moved_from}); "
                      f"continuing with the new path, recorded in training_options.json", flush=True)
        except (OptionError, StateError) as e:
            plan = ("option", str(e))
        except TrainingError as e:
            plan = ("training", str(e))
    plan = dist.broadcast_object(plan)
    if isinstance(plan, tuple):
        if lock is not None:
            lock.release()
        raise (OptionError if plan[0] == "option" else TrainingError)(plan[1])
    return plan, state, lock


def _make_and_lock(run_dir: Path) -> tuple[bool, RunLock]:
    created = not run_dir.is_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot write {run_dir} ({write_failure(e, run_dir)}); no training state was saved yet; "
                            f"fix that, then rerun the command") from None
    try:
        return created, RunLock(run_dir, created)
    except TrainingError:
        if created:
            os.rmdir(run_dir)
        raise


def _newest_after_lock(plan: RunPlan, state: dict, opts: TrainOptions) -> dict:
    """A process that held the folder until we locked it may have saved a newer state: take that one."""
    found = newest_valid_state([plan.run_dir])
    if found is not None and found[0] != plan.resume:
        plan.resume, state = found
        _check_finished(plan, state, opts)
    return state
