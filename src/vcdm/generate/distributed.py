"""Just enough torch.distributed for sampling under torchrun: ranks split the seeds, nothing is reduced."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(device: str | torch.device | None = None) -> torch.device:
    """Join the torchrun process group if there is one; return this process's device.

    ``device=None`` means CUDA when available (one GPU per local rank), else CPU; CPU ranks talk over gloo.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
