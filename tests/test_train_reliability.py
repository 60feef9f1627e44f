"""Training under failure: full disks (a real one where the test may mount a tmpfs, and the exception
types the real writers raise), temp files of killed runs, bad numbers."""
from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import pytest
import torch

import vcdm.train.loggers
from tiny_runs import PRIOR, base_args, error_lines, run, run_dir
from vcdm.train import build as build_mod
from vcdm.train.state import load_state

pytestmark = pytest.mark.usefixtures("one_thread")


def on_loss_call(monkeypatch, action, *, start: int = 1, stop: int | None = None, scale: float = 1.0):
    """Run `action()` before every loss evaluation from the `start`-th to the `stop`-th, and multiply
    those losses by `scale` (nan: divergence)."""
    real, count = build_mod.make_loss, {"n": 0}

    def make_loss(*args):
        loss = real(*args)

        def wrapped(*a, **k):
            count["n"] += 1
            hit = count["n"] >= start and (stop is None or count["n"] <= stop)
            if hit:
                action()
            return loss(*a, **k) * (scale if hit else 1.0)
        return wrapped

    monkeypatch.setattr(build_mod, "make_loss", make_loss)


def fill(directory: Path) -> None:
    """Take all the free space of `directory`'s file system."""
    with open(directory / f"filler-{uuid.uuid4().hex}", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_real_full_disk_stops_with_one_line_and_keeps_the_last_state(data, tmpfs, monkeypatch):
    small_tmpfs = tmpfs("8m")
    out = small_tmpfs / "runs"
    filled = []
    on_loss_call(monkeypatch, lambda: filled or (fill(small_tmpfs), filled.append(1)), start=3)
    r = run(base_args(data, out, *PRIOR, "--dump", "1", "--duration", "1"), code=1)
    (err,) = error_lines(r.output)
    d = run_dir(out)
    assert "disk full" in err and str(d) in err and f"--resume={d}" in err, err
    assert load_state(d / "training-state-000000.pt")["counters"]["nimg"] == 8  # written before the disk filled
    assert not list(d.glob(".*.tmp"))


@pytest.mark.parametrize("target, exc", [
    ("torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374")),
    ("torch.save", OSError(errno.EDQUOT, "Disk quota exceeded")),
    ("stats", OSError(errno.ENOSPC, "No space left on device")),
    ("loss.png", OSError(errno.ENOSPC, "No space left on device")),
    ("snapshot", OSError(errno.EACCES, "Permission denied")),
])
def test_failed_writes_give_one_line_naming_the_file(data, tmp_path, monkeypatch, target, exc):
    """The exception types the writers raise: torch.save's RuntimeError from its zip writer on ENOSPC,
    OSError from file writes, matplotlib and safetensors."""
    def fail(*a, **k):
        raise exc

    name = {"torch.save": "training-state-000000.pt", "stats": "stats.jsonl", "loss.png": "loss.png",
            "snapshot": "network-snapshot-000000.safetensors"}[target]
    if target == "torch.save":
        monkeypatch.setattr(torch, "save", fail)
    elif target == "stats":
        real = vcdm.train.loggers.atomic_write
        monkeypatch.setattr("vcdm.train.loggers.atomic_write",
                            lambda path, *a: fail() if Path(path).name == "stats.jsonl" else real(path, *a))
    elif target == "loss.png":
        monkeypatch.setattr("matplotlib.figure.Figure.savefig", fail)
    else:
        monkeypatch.setattr("vcdm.checkpoints.save_checkpoint", fail)
    out = tmp_path / "runs"
    r = run(base_args(data, out, *PRIOR, "--duration", "0.000008"), code=1)
    (err,) = error_lines(r.output)
    assert name in err and "Traceback" not in r.output, r.output
    assert "no training state was saved yet; fix that, then rerun the command" in err  # the run's first state


def test_stale_temp_files_are_removed_on_resume(data, tmp_path):
    out = tmp_path / "runs"
    args = base_args(data, out, *PRIOR, "--duration", "0.000004")
    run(args)
    d = run_dir(out)
    stale = [d / ".training-state-000000.pt.abc123.tmp", d / ".network-snapshot-000000.safetensors.x1.tmp",
             d / ".loss.png.q9.tmp"]
    for p in stale:
        p.write_bytes(b"left by a killed run")
    keep = d / ".hidden-note.tmp"  # not one of ours
    keep.write_text("")
    r = run(args[:-2] + ["--duration", "0.000008", "--resume", "auto"])
    assert "Resuming from" in r.output and not any(p.exists() for p in stale) and keep.exists()


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--duration", "inf"),
                                         ("--lr-rampup", "nan"), ("--ema", "inf"), ("--noise_mult", "1,nan")])
def test_non_finite_numbers_are_rejected(data, tmp_path, flag, value):
    r = run(base_args(data, tmp_path / "runs", *PRIOR, flag, value), code=2)
    (err,) = error_lines(r.output)
    assert flag in err and not (tmp_path / "runs").exists()


def test_failed_log_write_gives_one_line(data, tmp_path, monkeypatch):
    """log.txt is written by every print (a tee): a failure there is reported at the tick, not raised
    from whatever printed."""
    real = os.write

    def write(fd, data):
        if b"tick 1 " in data:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    r = run(base_args(data, tmp_path / "runs", *PRIOR, "--duration", "0.000012"), code=1)
    (err,) = error_lines(r.output)
    assert "log.txt" in err and "No space left" in err and "rerun the command" in err
