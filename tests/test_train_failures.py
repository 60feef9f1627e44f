"""A training run that fails, at any stage, exits: DataLoader workers and process groups never keep it
alive. Each case runs `train.py` in a subprocess with worker processes and a failure injected at one
stage; a hang would hit the subprocess timeout (the original hang lasted until killed)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tiny_runs import REPO, TINY_PRIOR, base_args

# Injected failures, run in the child before the command: (stage, patch code, expected exit code).
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
DRIVER = """
import sys
{patch}
from vcdm.cli.main import run_click
from vcdm.cli.train import command
sys.argv[0] = "train.py"
run_click(command, "train.py")
"""


def run_failing(tmp_path: Path, args: list[str], patch: str = "", timeout: float = 120,
                launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(patch=textwrap.dedent(patch)))
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
    assert proc.returncode != 0
    assert "a-file" in proc.stderr


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
    state write, which the other learns of) ends the job; process groups are shut down."""
    args = prior_args(data, tmp_path / "runs")
    proc = run_failing(tmp_path, args, PATCHES[stage], timeout=240,
                       launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert proc.returncode != 0, proc.stdout[-2000:]
