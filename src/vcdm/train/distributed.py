"""torch.distributed from torchrun's environment; plain `python` is one process without a process group.

The same code runs on CPU (gloo) and CUDA (NCCL): the backend follows the device.
"""
from __future__ import annotations

import copy
import inspect
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str) -> torch.device:
    """Join torchrun's process group (if any) and return this process's device.

    `device` is 'cpu', 'cuda' or 'cuda:N'; under torchrun 'cuda' becomes cuda:LOCAL_RANK.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if launched_by_torchrun() and not dist.is_initialized():
        extra = {}
        if dev.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters:
            extra["device_id"] = dev  # binds NCCL to this GPU (torch >= 2.3)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://", **extra)
    return dev


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*args, **kwargs) -> None:
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all processes (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (on every process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


class DDP(nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that also exposes the wrapped network's attributes (e.g. label_dim)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap_ddp(net: nn.Module, device: torch.device) -> nn.Module:
    """DDP over `net` when there are several processes, else `net` itself. Buffers are not re-sent
    at every forward (the networks' buffers are constants)."""
    if world_size() == 1:
        return net
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DDP(net, device_ids=[device] if device.type == "cuda" else None, **no_sync)


def with_net(denoiser: nn.Module, net: nn.Module) -> nn.Module:
    """A shallow view of `denoiser` whose `.net` is `net` (e.g. its DDP wrapper); parameters are shared."""
    if net is denoiser.net:
        return denoiser
    view = copy.copy(denoiser)
    view._modules = dict(denoiser._modules)
    view._modules["net"] = net
    return view
