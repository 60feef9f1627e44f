"""Training stops: bad input (one line, nothing written), --time-limit, non-finite losses (and their
states never resumed), full disks (a real one where the test may mount a tmpfs, and the exception types the
real writers raise), failed writes and starts; and at any stage a failing run exits: DataLoader workers
and process groups never keep it alive (those cases run train.py in a subprocess with workers; a hang
would hit the subprocess timeout)."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

import vcdm.train.loggers
from tiny_runs import (PRIOR, REPO, TINY_PRIOR, TRAIN_DRIVER, base_args, error_lines, last_state, on_loss_call, run,
                       run_dir)
from vcdm.train.outputs import TEMP_GLOBS
from vcdm.train.state import STATE_RE, load_state

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("extra, flag", [
    (["--exist", "1", "--observed", "0,1"], "--exist"),
    (["--observed", "1,1"], "--exist/--observed"),
    (["--exist", "1,1", "--observed", "0,1", "--arch", "dalle2"], "--arch=dalle2"),
    (["--exist", "0,1", "--observed", "0,0", "--arch", "ddpmpp"], "--arch=ddpmpp"),
    (["--exist", "1,1", "--observed", "0,1", "--cres", "1,x"], "--cres"),
    (["--exist", "1,1", "--observed", "0,1", "--resume", "nowhere.pt"], "--resume"),
])
def test_bad_flags_give_one_line_errors(data, tmp_path, extra, flag):
    r = run(base_args(data, tmp_path / "runs", *extra), code=2)
    (err,) = error_lines(r.output)
    assert flag in err, r.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--duration", "inf"),
                                         ("--lr-rampup", "nan"), ("--ema", "inf"), ("--noise_mult", "1,nan")])
def test_non_finite_numbers_are_rejected(data, tmp_path, flag, value):
    r = run(base_args(data, tmp_path / "runs", *PRIOR, flag, value), code=2)
    (err,) = error_lines(r.output)
    assert flag in err and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ stops with a state

def test_time_limit_stops_after_one_step_with_a_state(data, tmp_path):
    out = tmp_path / "runs"
    r = run(base_args(data, out, *PRIOR, "--duration", "1", "--time-limit", "0.001"))
    assert "Stopped by --time-limit" in r.output
    state = last_state(run_dir(out))
    assert state["counters"]["nimg"] == 4  # the deadline passed at once: one whole step of 4, then a state


def test_non_finite_losses_stop_the_run_and_poisoned_states_are_never_resumed(data, tmp_path, monkeypatch):
    """Losses turn NaN from the 5th step; --max-nonfinite 3 stops the run at the 3rd in a row. States are
    dumped every tick (one step): those since the first NaN are -nonfinite, with finite weights (the
    non-finite steps' gradients were zeroed), none overwrites another, and --resume auto picks the newest
    state whose losses were all finite; there the count of consecutive non-finite losses starts afresh."""
    out = tmp_path / "runs"
    args = base_args(data, out, *PRIOR, "--dump", "1", "--duration", "0.0001", "--max-nonfinite", "3")
    with monkeypatch.context() as m:
        on_loss_call(m, start=5, scale=float("nan"))
        r = run(args, code=1)
    (err,) = error_lines(r.output)
    d = run_dir(out)
    assert "3 consecutive non-finite losses" in err and "training-state-000000_2.pt" in err, err
    resumable = sorted(p.name for p in d.glob("training-state-*.pt") if STATE_RE.fullmatch(p.name))
    assert resumable == ["training-state-000000.pt", "training-state-000000_1.pt", "training-state-000000_2.pt"]
    assert [load_state(d / n)["counters"]["nimg"] for n in resumable] == [8, 12, 16]
    poisoned = [load_state(p) for p in sorted(d.glob("training-state-*-nonfinite.pt"))]
    counts = sorted((s["counters"]["nimg"], s["counters"]["nonfinite"]) for s in poisoned)
    assert counts == [(20, 1), (24, 2), (28, 3)]
    assert all(torch.isfinite(v).all() for s in poisoned for v in s["net"].values())
    with monkeypatch.context() as m:  # a lower lr; one more NaN is tolerated
        on_loss_call(m, start=1, stop=1, scale=float("nan"))
        r = run(args + ["--resume", "auto", "--lr", "1e-4"])
    assert f"Resuming from {d / 'training-state-000000_2.pt'} at " in r.output
    newest = max((load_state(p) for p in d.glob("training-state-*.pt") if STATE_RE.fullmatch(p.name)),
                 key=lambda s: s["counters"]["nimg"])
    assert newest["counters"]["nimg"] == 100 and newest["counters"]["nonfinite"] == 0


# -------------------------------------------------------------------------------- full disks, failed writes

def fill(directory: Path) -> None:
    """Take all the free space of `directory`'s file system."""
    with open(directory / f"filler-{uuid.uuid4().hex}", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.mark.parametrize("how", ["simulated", "real"])
def test_full_disk_stops_with_one_line_and_keeps_the_last_state(data, tmp_path, tmpfs, monkeypatch, how):
    """The disk fills after the first states: a real file system (a tmpfs, where the test may mount one),
    or torch.save failing after writing part of the run's second state. One line says so and how to
    resume; the state written before stays intact; no temp file is left."""
    if how == "real":
        disk, filled = tmpfs("8m"), []
        on_loss_call(monkeypatch, lambda: filled or (fill(disk), filled.append(1)), start=3)
    else:
        disk, real_save, calls = tmp_path, torch.save, {"n": 0}

        def save(obj, f, *a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                Path(f).write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", save)
    r = run(base_args(data, disk / "runs", *PRIOR, "--dump", "1", "--duration", "1"), code=1)
    (err,) = error_lines(r.output)
    d = run_dir(disk / "runs")
    assert "disk full" in err and str(d) in err and f"--resume={d}" in err, err
    if how == "simulated":
        assert "training-state-000000_1.pt" in err, err
    assert load_state(d / "training-state-000000.pt")["counters"]["nimg"] == 8
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
        monkeypatch.setattr("vcdm.train.outputs.save_checkpoint", fail)  # where the loop calls it
    out = tmp_path / "runs"
    r = run(base_args(data, out, *PRIOR, "--duration", "0.000008"), code=1)
    (err,) = error_lines(r.output)
    assert name in err and "Traceback" not in r.output, r.output
    assert "no training state was saved yet; fix that, then rerun the command" in err  # the run's first state

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


def test_failed_start_leaves_no_run_folder(data, tmp_path, monkeypatch):
    def fail(self, options):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("vcdm.train.loggers.RunLogger.write_options", fail)
    out = tmp_path / "runs"
    r = run(base_args(data, out, *PRIOR, "--duration", "0.000004"), code=1)
    (err,) = error_lines(r.output)
    assert "disk full" in err and not os.listdir(out)


# ------------------------------------------------------------------------------------------------ failing runs exit

PATCHES = {
    "start-up": """
        import errno, vcdm.train.loggers as m
        def fail(*a, **k): raise OSError(errno.EROFS, "Read-only file system")
        m.RunLogger.write_options = fail
    """,
    "first step": """
        import vcdm.diffusion.loss as m
        def fail(*a, **k): raise RuntimeError("injected failure in the first step")
        for cls in (m.EDMLoss, m.VPLoss, m.VELoss): cls.__call__ = fail
    """,
    "state write": """
        import errno, torch
        def fail(*a, **k): raise OSError(errno.ENOSPC, "No space left on device")
        torch.save = fail
    """,
    "snapshot write": """
        import errno, vcdm.checkpoints as m
        def fail(*a, **k): raise OSError(errno.EIO, "Input/output error")
        m.save_checkpoint = fail
    """,
}


def run_failing(tmp_path: Path, args: list[str], patch: str = "", timeout: float = 120,
                launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(TRAIN_DRIVER.format(patch=textwrap.dedent(patch)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    try:
        return subprocess.run([sys.executable, *launcher, str(driver), *args], env=env, capture_output=True,
                              text=True, timeout=timeout, cwd=tmp_path)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"training did not exit within {timeout} s after a failure:\n{(e.stderr or b'')[-2000:]!r}")


def prior_args(data: Path, out: Path, workers: int = 2) -> list[str]:
    args = base_args(data, out, "--exist", "0,1", "--observed", "0,0", *TINY_PRIOR, "--augment", "0",
                     "--duration", "0.000008")
    args[args.index("--workers") + 1] = str(workers)
    return args


def test_unwritable_outdir_exits(data, tmp_path):
    """The reported case: --outdir cannot be made (below a regular file)."""
    (tmp_path / "a-file").write_text("")
    proc = run_failing(tmp_path, prior_args(data, tmp_path / "a-file" / "runs"))
    (err,) = error_lines(proc.stderr)
    assert proc.returncode != 0 and "a-file" in err and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("stage", list(PATCHES))
def test_failure_in_training_exits(data, tmp_path, stage):
    proc = run_failing(tmp_path, prior_args(data, tmp_path / "runs"), PATCHES[stage])
    assert proc.returncode != 0, proc.stdout[-2000:]
    if stage == "first step":
        assert "injected failure" in proc.stderr
    else:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, proc.stderr[-2000:]

@pytest.mark.slow
@pytest.mark.parametrize("stage", ["first step", "state write"])
def test_failure_under_torchrun_exits(data, tmp_path, stage):
    """Two processes (gloo), each with workers: a failure in both (first step) or in process 0 only (its
    state write, which the other learns of) ends the job with its cause, no process of it left running
    (DataLoader workers included) and no temp file left in the run folder."""
    args = prior_args(data, tmp_path / "runs")
    proc = run_failing(tmp_path, args, PATCHES[stage], timeout=240,
                       launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert proc.returncode != 0, proc.stdout[-2000:]
    cause = "injected failure in the first step" if stage == "first step" else "Error: cannot write: no space left on device"
    assert cause in proc.stderr, proc.stderr[-2000:]
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "driver.py")], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the failed job still running: {left}"
    temps = [p.name for g in TEMP_GLOBS for p in (tmp_path / "runs").rglob(g)]
    assert not temps, temps
