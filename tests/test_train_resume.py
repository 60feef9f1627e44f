"""Resume: a SIGTERM'd run resumed is bit-identical to a straight one; damaged states are refused and
skipped; --resume DIR reuses the run's options; --resume=auto resumes only a matching run (its dataset
matched by content, wherever it lies now); finished runs, --dry-run's plan, stale temp files, one writer
per run folder. The requeued-job cases run train.py in a subprocess, as a cluster job script would."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from tiny_runs import (PRIOR, REPO, TINY_UNET, TRAIN_DRIVER, assert_same_weights, base_args, error_lines, last_state,
                       run, run_dir, write_dataset)
from vcdm.checkpoints import read_checkpoint_config
from vcdm.data.archive import Archive
from vcdm.train import build as build_mod
from vcdm.train.rundir import RunLock, dataset_identity, same_data
from vcdm.train.outputs import save_state
from vcdm.train.state import STATE_RE, StateError, load_state, newest_valid_state

pytestmark = pytest.mark.usefixtures("one_thread")


def _interrupt_after(monkeypatch, calls: int, sig=signal.SIGTERM):
    """Deliver `sig` to this process during the `calls`-th loss evaluation."""
    real = build_mod.make_loss
    count = {"n": 0}

    def make_loss(*args):
        loss = real(*args)

        def wrapped(*a, **k):
            count["n"] += 1
            if count["n"] == calls:
                os.kill(os.getpid(), sig)
            return loss(*a, **k)
        return wrapped

    monkeypatch.setattr(build_mod, "make_loss", make_loss)


@pytest.mark.determinism
def test_resume_is_bit_identical(data, tmp_path, monkeypatch):
    args = ["--exist", "1,1", "--observed", "0,1", *TINY_UNET, "--augment", "0.3", "--dropout", "0.2",
            "--duration", "0.000024", "--sample", "100", "--snap", "100", "--dump", "100"]
    straight = tmp_path / "straight"
    run(base_args(data, straight, *args))
    reference = last_state(run_dir(straight))
    assert reference["counters"]["nimg"] == 24

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        r = run(base_args(data, interrupted, *args))  # SIGTERM: finish the step, save, exit 0
    assert "SIGTERM" in r.output
    d = run_dir(interrupted)
    half = load_state(d / "training-state-000000.pt")
    assert half["counters"]["nimg"] == 12
    # A truncated state from elsewhere looks newer but must be skipped by --resume=auto.
    bad = d / "training-state-000007.pt"
    bad.write_bytes((d / "training-state-000000.pt").read_bytes()[:5000])
    shutil.copy(d / "training-state-000000.pt.json", d / "training-state-000007.pt.json")
    with pytest.warns(UserWarning, match="training-state-000007.pt"):
        r = run(base_args(data, interrupted, *args, "--resume", "auto"))
    assert "Resuming from" in r.output and "training-state-000000.pt" in r.output
    assert run_dir(interrupted) == d  # continued in the same run directory
    assert_same_weights(reference, load_state(d / "training-state-000000_1.pt"))  # the resumed run's state
    stats = [json.loads(line)["nimg"] for line in (d / "stats.jsonl").read_text().splitlines()]
    assert stats == [json.loads(line)["nimg"] for line in (run_dir(straight) / "stats.jsonl").read_text().splitlines()]


def test_damaged_states_are_refused_and_newest_valid_skips_them(tmp_path):
    state = {"net": {"w": torch.ones(3)}, "ema": {}, "optimizer": {}, "counters": {"nimg": 5}}
    save_state(tmp_path / "training-state-000000.pt", state)
    assert torch.equal(load_state(tmp_path / "training-state-000000.pt")["net"]["w"], torch.ones(3))
    blob = (tmp_path / "training-state-000000.pt").read_bytes()
    (tmp_path / "training-state-000001.pt").write_bytes(blob[:-10])  # truncated, no sidecar
    with pytest.raises(StateError, match="training-state-000001.pt"):
        load_state(tmp_path / "training-state-000001.pt")
    with pytest.warns(UserWarning, match="skipping"):
        path, _ = newest_valid_state([tmp_path])
    assert path.name == "training-state-000000.pt"
    (tmp_path / "training-state-000000.pt").write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))  # same size, damaged
    with pytest.raises(StateError, match="SHA-256"):
        load_state(tmp_path / "training-state-000000.pt")


def test_a_state_without_a_count_of_images_is_refused(tmp_path):
    path = tmp_path / "training-state-000000.pt"
    save_state(path, {"net": {}, "ema": {}, "optimizer": {}, "counters": {"nimg": "8"}})
    with pytest.raises(StateError, match="counters lack a count of images seen"):
        load_state(path)


def test_resume_dir_reuses_the_recorded_options(data, tmp_path, monkeypatch):
    monkeypatch.chdir(data.parent)
    out = tmp_path / "runs"
    args = base_args(Path(data.name), out, *PRIOR, "--duration", "0.000004", "--lr", "2e-3")  # a relative path
    run(args)
    d = run_dir(out)
    recorded = json.loads((d / "training_options.json").read_text())
    assert recorded["path"] == str(data) and recorded["exist"] == [0, 1]  # absolute; lists as lists
    assert read_checkpoint_config(d / "network-snapshot-000000.safetensors").data_path == str(data)
    log = (d / "log.txt").read_text()
    assert "lr 0.002" in log and json.loads((d / "stats.jsonl").read_text().splitlines()[0])["lr"] == 2e-3

    monkeypatch.chdir(tmp_path)
    r = run(["--resume", str(d), "--duration", "0.000008", "--workers", "0", "--device", "cpu"])  # nothing else
    assert "Resuming from" in r.output and "lr 0.002" in r.output  # the run's --lr, its data, its model
    assert load_state(d / "training-state-000000_1.pt")["counters"]["nimg"] == 8  # the first state kept

    r = run(["--resume", str(d), "--cbase", "16", "--prior-dim", "64"], code=2)
    (err,) = error_lines(r.output)
    assert "--cbase 16 differs from the resumed run's None" in err and "training_options.json" in err

def test_resume_auto_starts_fresh_when_the_model_changed(data, tmp_path):
    out = tmp_path / "runs"
    run(base_args(data, out, *PRIOR, "--duration", "0.000004"))
    (first,) = out.iterdir()
    r = run(base_args(data, out, *PRIOR[:-4], "--prior-dim", "16", *PRIOR[-4:], "--duration", "0.000004",
                      "--resume", "auto"))
    assert "starting a new run" in r.output and len(list(out.iterdir())) == 2
    r = run(base_args(data, out, *PRIOR, "--duration", "0.000008", "--resume", "auto"))
    assert f"Resuming from {first}" in r.output


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


def test_dataset_identity_is_the_content_not_the_place(data, tmp_path):
    """The identity follows the images' names and sizes and the labels, wherever the files lie; a folder
    and a zip are told apart (the zip's CRCs catch same-size edits a folder's sizes cannot)."""
    ident = dataset_identity(data)
    assert ident["kind"] == "zip" and ident["images"] == 16 and ident["bytes"] == sum(
        i.file_size for i in zipfile.ZipFile(data).infolist())  # the images and dataset.json
    shutil.copy(data, tmp_path / "copy.zip")
    os.symlink(tmp_path / "copy.zip", tmp_path / "link.zip")
    assert dataset_identity(tmp_path / "copy.zip") == dataset_identity(tmp_path / "link.zip") == ident
    assert dataset_identity(write_dataset(tmp_path / "other.zip", seed=1))["sha256"] != ident["sha256"]

    folder = tmp_path / "folder"
    zipfile.ZipFile(data).extractall(folder)
    assert Archive(folder).names == Archive(data).names
    as_folder = dataset_identity(folder)
    assert as_folder["kind"] == "folder" and as_folder["images"] == 16
    (folder / "dataset.json").write_text((folder / "dataset.json").read_text().replace('", 1]', '", 0]', 1))
    assert dataset_identity(folder)["sha256"] != as_folder["sha256"]  # one label changed, same size

    recorded = {"path": str(tmp_path / "elsewhere.zip"), "dataset": ident}
    assert same_data(recorded, str(tmp_path / "link.zip"), ident)
    assert not same_data(recorded, str(folder), as_folder)
    old_run = {"path": str(tmp_path / "copy.zip")}  # recorded before identities: its resolved path
    assert same_data(old_run, str(tmp_path / "link.zip"), ident) and not same_data(old_run, str(data), ident)
    tampered = dict(old_run, dataset=dict(ident, bytes="many"))  # counts as no identity, never as a crash
    assert same_data(tampered, str(tmp_path / "link.zip"), ident) and not same_data(tampered, str(data), ident)


# ------------------------------------------------------------------------------------------ requeued jobs

def train(cwd: Path, *args: str, code: int = 0, patch: str = "") -> str:
    """Run train.py in `cwd`; its stdout and stderr, after checking the exit code and that no traceback shows."""
    driver = cwd / "driver.py"
    driver.write_text(TRAIN_DRIVER.format(patch=patch))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, str(driver), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == code and "Traceback" not in out, out[-3000:]
    return out


def tiny(data: Path | str, *extra: str, out: str = "runs") -> list[str]:
    return base_args(Path(data), Path(out), *PRIOR, *extra)

def newest(d: Path) -> dict:
    return max((load_state(p) for p in d.glob("training-state-*.pt") if STATE_RE.fullmatch(p.name)),
               key=lambda s: s["counters"]["nimg"])

def files(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()}


@pytest.mark.slow
def test_resume_a_state_with_the_same_command(data, tmp_path):
    """Item 1: the release's workflow, a relative --path given again with --resume=<state>; item 3: the
    first command's --time-limit does not carry over."""
    shutil.copy(data, tmp_path / "tiny.zip")
    train(tmp_path, *tiny("tiny.zip", "--duration", "1", "--time-limit", "0.001"))
    d = run_dir(tmp_path / "runs")
    assert newest(d)["counters"]["nimg"] == 4  # stopped after one step
    out = train(tmp_path, *tiny("tiny.zip", "--duration", "0.000008", "--resume", f"runs/{d.name}/training-state-000000.pt"))
    assert "Resuming from" in out and newest(d)["counters"]["nimg"] == 8
    out = train(tmp_path, "--resume", f"runs/{d.name}", "--duration", "0.000016", "--workers", "0")
    assert "Stopped by" not in out and newest(d)["counters"]["nimg"] == 16  # no --time-limit: ran to the end

@pytest.mark.slow
def test_moved_dataset_resumes_by_content(data, tmp_path):
    """Item 2: the job is requeued where the data was staged elsewhere; a symlink is the same dataset;
    a different dataset at the recorded path is refused in one line."""
    (tmp_path / "node1").mkdir()
    shutil.copy(data, tmp_path / "node1" / "tiny.zip")
    train(tmp_path, *tiny("node1/tiny.zip", "--duration", "0.000004"))
    d = run_dir(tmp_path / "runs")
    (tmp_path / "node1").rename(tmp_path / "node2")

    out = train(tmp_path, "--resume", str(d), "--duration", "0.000008", code=2)  # the recorded path is gone
    (err,) = error_lines(out)
    assert str(tmp_path / "node1" / "tiny.zip") in err and "--path" in err and "not there" in err

    out = train(tmp_path, "--resume", str(d), "--path", "node2/tiny.zip", "--duration", "0.000008")
    assert "Dataset moved" in out and newest(d)["counters"]["nimg"] == 8
    recorded = json.loads((d / "training_options.json").read_text())
    assert recorded["path"] == str(tmp_path / "node2" / "tiny.zip") and recorded["duration"] == 8e-6

    (tmp_path / "node3").mkdir()
    shutil.copy(tmp_path / "node2" / "tiny.zip", tmp_path / "node3" / "tiny.zip")  # staged again elsewhere
    out = train(tmp_path, *tiny("node3/tiny.zip", "--duration", "0.000012", "--resume", "auto"))
    assert f"Resuming from {Path('runs') / d.name}" in out and "Dataset moved" in out
    assert newest(d)["counters"]["nimg"] == 12
    (tmp_path / "node4").mkdir()
    os.symlink(tmp_path / "node2" / "tiny.zip", tmp_path / "node4" / "tiny.zip")
    out = train(tmp_path, *tiny("node4/tiny.zip", "--duration", "0.000016", "--resume", "auto"))
    assert f"Resuming from {Path('runs') / d.name}" in out and newest(d)["counters"]["nimg"] == 16
    assert len(list((tmp_path / "runs").iterdir())) == 1  # never silently a new run from 0

    os.unlink(tmp_path / "node2" / "tiny.zip")
    write_dataset(tmp_path / "node2" / "tiny.zip", seed=1)  # another dataset where the run's data is recorded
    before = files(d)
    for args in (tiny("node4/tiny.zip", "--duration", "0.00002", "--resume", "auto"),
                 ["--resume", str(d), "--duration", "0.00002"]):
        (err,) = error_lines(train(tmp_path, *args, code=2))
        assert "node4/tiny.zip" in err and "changed since" in err and "16 images" in err, err
    assert files(d) == before

@pytest.mark.slow
def test_finished_run_writes_nothing_and_duration_extends(data, tmp_path):
    """Items 4 and 5: resuming a finished run says so and writes nothing; an extended --duration is
    recorded, so a later `--resume DIR` does not train past it."""
    args = tiny(data, "--duration", "0.000004")
    train(tmp_path, *args)
    d = run_dir(tmp_path / "runs")
    before = files(d)
    for resume in ("auto", str(d), str(d / "training-state-000000.pt")):
        out = train(tmp_path, *args, "--resume", resume)
        assert "already finished at 0.004 kimg" in out and "--duration" in out
        assert files(d) == before
    train(tmp_path, "--resume", str(d), "--duration", "0.000008")
    assert newest(d)["counters"]["nimg"] == 8
    after = files(d)
    out = train(tmp_path, "--resume", str(d))
    assert "already finished at 0.008 kimg" in out and files(d) == after

@pytest.mark.slow
def test_dry_run_says_what_it_would_resume(data, tmp_path):
    """Item 6: what a requeue script needs to know, and nothing written."""
    args = tiny(data, "--duration", "0.000004")
    out = train(tmp_path, *args, "--resume", "auto", "--dry-run")
    assert "resume: would start a new run in runs (no run in runs with this dataset" in out
    assert not (tmp_path / "runs").exists()
    train(tmp_path, *args)
    d = run_dir(tmp_path / "runs")
    before = files(d)
    out = train(tmp_path, *args[:-2], "--duration", "0.000008", "--resume", "auto", "--dry-run")
    assert f"resume: would resume {Path('runs') / d.name / 'training-state-000000.pt'} at 0.004 kimg" in out
    out = train(tmp_path, *args, "--resume", "auto", "--dry-run")
    assert "resume: would do nothing" in out and "already finished at 0.004 kimg" in out
    assert files(d) == before

@pytest.mark.slow
def test_one_writer_per_run_folder(data, tmp_path):
    """Issue 19 item 11: a second `--resume auto` on a run folder in use stops with one line naming the
    holder and touches nothing there; the lock dies with its process (kill -9 leaves no stale lock, also
    while the killed process's DataLoader workers linger)."""
    args = tiny(data, "--duration", "0.000004")
    train(tmp_path, *args)
    d = run_dir(tmp_path / "runs")
    driver = tmp_path / "driver.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    log = open(tmp_path / "holder.log", "w")
    holder = subprocess.Popen([sys.executable, str(driver), *args[:-2], "--duration", "1", "--tick", "1",
                               "--workers", "2", "--resume", "auto"],  # its workers must not inherit the lock
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while "Training from" not in (tmp_path / "holder.log").read_text():
            assert holder.poll() is None and time.time() < deadline, (tmp_path / "holder.log").read_text()
            time.sleep(0.2)
        planted = d / ".stats.jsonl.abc.tmp"  # as if the holder were writing it
        planted.write_text("")
        out = train(tmp_path, *args[:-2], "--duration", "0.000008", "--resume", "auto", code=1)
        (err,) = error_lines(out)
        assert f"{Path('runs') / d.name} is in use by another training process (pid {holder.pid} on " in err
        assert planted.exists() and (d / "log.txt").read_text().count("Resuming from") == 1  # the holder's only
        out = train(tmp_path, *args[:-2], "--duration", "0.000008", "--resume", "auto", "--dry-run")
        assert f"is in use now by another training process (pid {holder.pid} on " in out
    finally:
        holder.kill()
        holder.wait()
        log.close()
    out = train(tmp_path, *args[:-2], "--duration", "0.000008", "--resume", "auto")
    assert f"Resuming from {Path('runs') / d.name}" in out and newest(d)["counters"]["nimg"] == 8

@pytest.mark.slow
def test_a_locked_run_folder_stops_every_torchrun_process(data, tmp_path):
    """Under torchrun process 0 takes the lock; when another process holds it, every process stops with
    the holder's line and the job exits (no hang)."""
    args = tiny(data, "--duration", "0.000004")
    train(tmp_path, *args)
    d = run_dir(tmp_path / "runs")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(d / "training.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(tmp_path / "driver.py"), *args[:-2], "--duration", "0.000008", "--resume", "auto"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    finally:
        holder.kill()
        holder.wait()
    errors = set(error_lines(proc.stderr))
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "in use by another training process (pid 4242 on node-a since 01:00); one process" in errors.pop()
    assert "Resuming from" not in proc.stdout

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX)
os.write(fd, b"pid 4242 on node-a since 01:00\\nand a stray second line\\n")
print("locked", flush=True)
time.sleep(600)
"""


def test_a_forked_child_does_not_keep_a_dead_runs_lock(tmp_path):
    """DataLoader workers are forked: when the run dies (here: exits without cleanup, as under kill -9)
    while a child lives on, the folder must be free at once."""
    script = ("import os, sys, time\nfrom pathlib import Path\nfrom vcdm.train.rundir import RunLock\n"
              "lock = RunLock(Path(sys.argv[1]))\n"
              "if os.fork() == 0:\n    os.close(1)\n    os.close(2)\n    time.sleep(20)\n    os._exit(0)\n"
              "print('locked', flush=True)\nos._exit(0)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "locked", proc.stderr[-2000:]
    RunLock(tmp_path).release()  # the child still runs (20 s), the run is dead: free
