"""Training under torchrun across two "nodes" (two agents on this machine, one process each, gloo on CPU)
trains what one node with two processes trains: the same snapshot bytes, the same state, and only
process 0 writes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_runs import PRIOR, REPO, base_args, run_dir
from vcdm.train.state import load_state

ARGS = [*PRIOR, "--duration", "0.000008", "--batch-gpu", "2"]  # two steps of a global batch of 4, 2 per process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*launch: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, str(REPO / "train.py")]


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


@pytest.mark.slow
def test_two_nodes_train_what_one_node_with_two_processes_trains(data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes, single = tmp_path / "nodes", tmp_path / "single"
    nodes.mkdir(), single.mkdir()
    port = free_port()
    args = base_args(data, Path("runs"), *ARGS)  # the same relative --outdir: the runs record the same options
    launch = [(nodes, ["--nnodes=2", f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
                       "--nproc_per_node=1"]) for rank in (0, 1)] + [(single, ["--standalone", "--nproc_per_node=2"])]
    procs = [subprocess.Popen(torchrun(*flags) + args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cwd, flags in launch]  # all at once
    node0, node1, _ = (finish(p) for p in procs)

    assert "Batch 4 = 2 processes x 1 rounds x 2" in node0 and "Run directory" in node0
    assert "Run directory" not in node1 and "tick" not in node1  # process 1 reports nothing
    a, b = run_dir(nodes / "runs"), run_dir(single / "runs")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())  # process 1 wrote no second state or snapshot
    assert [n for n in names if n.startswith(("network-snapshot", "training-state"))] == [  # snapshots at 4 and 8
        "network-snapshot-000000-4img.safetensors", "network-snapshot-000000.safetensors", "training-state-000000.pt",
        "training-state-000000.pt.json"]
    snapshot = "network-snapshot-000000.safetensors"
    assert (a / snapshot).read_bytes() == (b / snapshot).read_bytes()
    sa, sb = load_state(a / "training-state-000000.pt"), load_state(b / "training-state-000000.pt")
    assert sa["counters"]["nimg"] == sb["counters"]["nimg"] == 8 and len(sa["rng"]) == len(sb["rng"]) == 2
    for part in ("net", "ema"):
        assert sa[part].keys() == sb[part].keys()
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part]), part
    moments = lambda s: [t for v in s["optimizer"]["state"].values() for t in v.values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(moments(sa), moments(sb), strict=True))
