"""Training guard rails: --resume DIR reuses the run's options, --resume=auto resumes only a matching
run, the lr ramp-up warning and the lr in the logs, absolute dataset paths, no empty run folders."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tiny_runs import PRIOR, base_args, error_lines, run, run_dir
from vcdm.checkpoints import read_config
from vcdm.train.state import load_state

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resume_dir_reuses_the_recorded_options(data, tmp_path, monkeypatch):
    monkeypatch.chdir(data.parent)
    out = tmp_path / "runs"
    args = base_args(Path(data.name), out, *PRIOR, "--duration", "0.000004", "--lr", "2e-3")  # a relative path
    run(args)
    d = run_dir(out)
    recorded = json.loads((d / "training_options.json").read_text())
    assert recorded["path"] == str(data) and recorded["exist"] == [0, 1]  # absolute; lists as lists
    assert read_config(d / "network-snapshot-000000.safetensors")["data"]["path"] == str(data)
    log = (d / "log.txt").read_text()
    assert "lr 0.002" in log and json.loads((d / "stats.jsonl").read_text().splitlines()[0])["lr"] == 2e-3

    monkeypatch.chdir(tmp_path)
    r = run(["--resume", str(d), "--duration", "0.000008", "--workers", "0", "--device", "cpu"])  # nothing else
    assert "Resuming from" in r.output and "lr 0.002" in r.output  # the run's --lr, its data, its model
    assert load_state(d / "training-state-000000.pt")["counters"]["nimg"] == 8

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


def test_warns_when_the_lr_ramp_up_outlasts_the_run(data, tmp_path):
    r = run(base_args(data, tmp_path / "runs", *PRIOR, "--duration", "0.000004", "--lr-rampup", "10"))
    assert "warning: --lr-rampup 10 kimg is longer than --duration 0.004 kimg" in r.output
    assert "never gets past 4e-07" in r.output  # 4 of 10,000 images: lr 1e-3 * 4e-4


def test_failed_start_leaves_no_run_folder(data, tmp_path, monkeypatch):
    def fail(self, options):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("vcdm.train.loggers.RunLogger.write_options", fail)
    out = tmp_path / "runs"
    r = run(base_args(data, out, *PRIOR, "--duration", "0.000004"), code=1)
    (err,) = error_lines(r.output)
    assert "disk full" in err and not os.listdir(out)
