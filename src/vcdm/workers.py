"""How many worker processes read and decode images by default: the DataLoaders of training and FID and
the dataset tool's converters (whose output never depends on the count).

The cap is 8, training's: there the loader must keep a GPU fed every step, and beyond 8 workers per
process each one's start-up and prefetched batches cost more than they return (EDM2 trains with 2 per
GPU). FID had EDM's 3 and the dataset tool 16; they differ only on machines with more than 3 (8) CPUs.
"""
from __future__ import annotations

import os

MAX_WORKERS = 8


def default_workers() -> int:
    """This process's share of the CPUs it may run on (divided among torchrun's LOCAL_WORLD_SIZE processes
    on the node), at least 1 and at most MAX_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no CPU affinity on macOS and Windows
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
