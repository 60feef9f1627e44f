"""A deterministic, endless, rank-sharded stream of training samples whose position is resumable.

Global position p maps to dataset index ``perm_e[p mod n]``, with e = p div n and ``perm_e`` a
permutation seeded by (seed, e), so the index at a position depends on nothing else: resuming at a
position needs no replay. Each optimiser step consumes `batch` consecutive positions; process r of W
takes the r-th contiguous block of them (`batch / W`), which it splits into accumulation rounds of
`batch_gpu`. The diffusion noise of a round is seeded by the position of its first sample, so a
global batch sees the same images and noise whatever the number of processes.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (1 << 63))
    return torch.randperm(n, generator=g)


def mix_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed for (seed, position): splitmix64, so neighbouring positions decorrelate."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(position) + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class PositionSampler(Sampler[int]):
    """This process's global positions from `start` on: for step s the block
    ``start + s*batch + rank*(batch/W) + [0, batch/W)``, forever."""

    def __init__(self, *, batch: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if batch % world_size:
            raise ValueError(f"--batch {batch} is not divisible by the number of processes {world_size}")
        self.batch, self.rank, self.per_rank, self.start = batch, rank, batch // world_size, start

    def __iter__(self) -> Iterator[int]:
        base = self.start + self.rank * self.per_rank
        while True:
            yield from range(base, base + self.per_rank)
            base += self.batch


class ShuffledDataset(Dataset):
    """Indexed by global position; yields ``(position, index, *dataset[index])``."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.size = dataset, seed, len(dataset)
        if self.size == 0:
            raise ValueError("the dataset is empty: nothing to train on")
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:
        return self.size

    def index(self, position: int) -> int:
        epoch = position // self.size
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_permutation(self.size, self.seed, epoch)
        return int(self._perm[position % self.size])

    def __getitem__(self, position: int):
        i = self.index(position)
        return (position, i, *self.dataset[i])


@contextlib.contextmanager
def running(loader: torch.utils.data.DataLoader) -> Iterator[Iterator]:
    """Iterate `loader` and stop its worker processes however the block ends.

    An endless iterator never shuts its workers down itself, and at interpreter exit it no longer
    can: multiprocessing then sends them SIGTERM, which they ignore (see the training loop's
    worker_init_fn), and waits for them forever. So the workers are stopped here, killed if need be.
    """
    batches = iter(loader)
    try:
        yield batches
    finally:
        stop_workers(batches)


def stop_workers(batches: Iterator) -> None:
    getattr(batches, "_shutdown_workers", lambda: None)()
    for w in getattr(batches, "_workers", []):
        if w.is_alive():
            w.kill()
            w.join(timeout=5)
