"""The command line: `vcdm <command>` and the root scripts.

Command modules import torch and the packages only their command runs inside the command function, so
`vcdm --help`, most commands' `--help` and flag errors answer without loading them (train and tune
need torch for their options' defaults, so they import at the top).

Importing it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is already set: with libgomp's
default policy, threads that wait at an OpenMP barrier spin before they sleep, and when other
processes keep a core busy the spinning and the preempted threads stall every parallel region
(measured: benchmarks/results/perf-notes.md). OpenMP reads the variable once, when torch loads it, so
it is set here, before any command imports torch.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
