"""Training states: what a run resumes from (`TrainState`), and reading a saved one back.

A state holds only state dicts, tensors and plain numbers, so ``torch.load(weights_only=True)`` reads
it. vcdm.train.outputs names and writes states (atomically, with a sidecar of their size and SHA-256); a
state damaged elsewhere fails its sidecar check or ``torch.load`` and is skipped by ``--resume=auto``
with a warning.
"""
from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vcdm import distributed as dist
from vcdm.fileio import file_sha256
from vcdm.safeload import load_json, load_torch_zip
from vcdm.train.outputs import SIDECAR_BYTES, STATE_RE, resumable_states, sidecar_path


class StateError(ValueError):
    """A training state that cannot be used."""


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a state; raise StateError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"{path}: no such training state")
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        try:
            meta = load_json(sidecar, SIDECAR_BYTES, dict)
        except ValueError as e:
            raise StateError(f"{sidecar}: unreadable sidecar ({e})") from None
        size = path.stat().st_size
        if size != meta.get("size"):
            raise StateError(f"{path}: {size} bytes, its sidecar records {meta.get('size')} (truncated or replaced)")
        if file_sha256(path) != meta.get("sha256"):
            raise StateError(f"{path}: SHA-256 differs from its sidecar (file damaged)")
    try:
        state = load_torch_zip(path)
    except Exception as e:  # torch raises many types for damaged files
        raise StateError(f"{path}: not a readable training state ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or not {"net", "ema", "optimizer", "counters"} <= set(state):
        raise StateError(f"{path}: not a vcdm training state (missing net/ema/optimizer/counters)")
    nimg = state["counters"].get("nimg") if isinstance(state["counters"], dict) else None
    if type(nimg) is not int or nimg < 0:
        raise StateError(f"{path}: not a vcdm training state (its counters lack a count of images seen)")
    return state


def newest_valid_state(run_dirs: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable state (by images seen, then modification time) in `run_dirs`."""
    candidates = [p for d in run_dirs for p in resumable_states(d)]

    def key(p: Path):
        try:
            nimg = load_json(sidecar_path(p), SIDECAR_BYTES, dict).get("nimg")
        except ValueError:
            nimg = None
        if type(nimg) is not int:  # no sidecar, or a damaged one (load_state then says what is wrong)
            nimg = int(STATE_RE.fullmatch(p.name).group(1)) * 1000
        return nimg, int(STATE_RE.fullmatch(p.name).group(2) or 0), p.stat().st_mtime

    for p in sorted(candidates, key=key, reverse=True):
        try:
            return p, load_state(p)
        except StateError as e:
            warnings.warn(f"skipping training state: {e}", stacklevel=2)
    return None


def capture_rng(sampler_position: int) -> dict[str, Any]:
    """This process's random states as tensors and ints (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.stack(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "sampler_position": int(sampler_position),
    }


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng["cuda"].numel():
        states = list(rng["cuda"])
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


class TrainState:
    """Everything a run resumes from: the network, its EMA, the optimiser (and fp16 scaler), a trained
    embedder, a loss's own trained state (DMD's fake denoiser and its optimiser), the counters (images seen, tick, data position, consecutive non-finite steps, seconds)
    and every process's random states. `state_dict()` is what `save_state` writes."""

    def __init__(self, net: torch.nn.Module, ema, optimizer: torch.optim.Optimizer, *, scaler=None,
                 embedder: torch.nn.Module | None = None, frozen: list[str] | None = None, loss=None):
        self.net, self.ema, self.optimizer, self.scaler, self.embedder = net, ema, optimizer, scaler, embedder
        self.loss = loss if hasattr(loss, "state_dict") else None
        self.frozen = list(frozen or [])
        self.counters: dict[str, Any] = {"nimg": 0, "tick": 0, "position": 0, "nonfinite": 0, "total_sec": 0.0}
        self.rng: list[dict[str, Any]] = []  # per process, as loaded; see restore_rng

    def state_dict(self, options: str = "{}") -> dict[str, Any]:
        """The state to save, with the random states of every process (a collective: all must call it)."""
        return {"net": self.net.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "embedder": self.embedder.state_dict() if self.embedder is not None else {},
                "loss": self.loss.state_dict() if self.loss is not None else {},
                "rng": dist.gather_objects(capture_rng(self.counters["position"])),
                "counters": dict(self.counters), "frozen": list(self.frozen), "options": options}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load weights, optimiser and counters; raise StateError if they do not fit. The random states
        are kept for `restore_rng` (called once the data loader has drawn its own seed)."""
        try:
            self.net.load_state_dict(state["net"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            if self.embedder is not None and state.get("embedder"):
                self.embedder.load_state_dict(state["embedder"])
            if self.loss is not None:
                self.loss.load_state_dict(state["loss"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise StateError(" ".join(str(e).split())[:300]) from None
        self.counters.update(state["counters"])
        self.rng = list(state.get("rng", []))

    def finite(self) -> bool:
        """Whether every weight of the network and its EMA and every optimiser moment is finite."""
        moments = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        tensors = list(self.net.state_dict().values()) + list(self.ema.state_dict().values()) + moments
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())

    def restore_rng(self, rank: int, world_size: int) -> bool:
        """Restore this process's random states; False if the state was saved by another number of processes."""
        if len(self.rng) != world_size:
            return False
        restore_rng(self.rng[rank])
        return True
