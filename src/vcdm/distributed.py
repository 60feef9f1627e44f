"""torch.distributed from torchrun's environment; plain `python` is one process without a process group.

The same code runs on CPU (gloo) and CUDA (NCCL): the backend follows the device.
"""
from __future__ import annotations

import contextlib
import gc
import inspect
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
# Imported before any process group exists: torch.distributed.nn binds `group.WORLD` into default
# arguments when first imported, which otherwise happens lazily (building a network on the meta device
# imports it through torch._dynamo). Bound to a live group, it would keep the group and its gloo threads
# alive past destroy_process_group, and a late gloo thread then aborts the exiting interpreter.
import torch.distributed.nn  # noqa: F401


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class DeviceError(ValueError):
    """A device argument torch cannot use here (a usage error on the command line)."""
    usage_error = True


def parse_device(device: str | torch.device | None, name: str = "--device") -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' (None: CUDA when available, else CPU) → torch.device; DeviceError naming
    ``name`` and the valid forms otherwise ('gpu' raises torch's own RuntimeError, and 'cpu:7' is a valid
    torch device that fails later, in whatever it is used for first)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise DeviceError(f"{name} {device!r}: expected 'cpu', 'cuda' or 'cuda:N' (N: a GPU index)")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"{name} {device}: CUDA is not available on this machine (use cpu)")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"{name} {device}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    return dev


def init(device: str | torch.device | None = None) -> torch.device:
    """Join torchrun's process group (if any) and return this process's device.

    `device` is 'cpu', 'cuda' or 'cuda:N' (None: CUDA when available, else CPU); under torchrun
    'cuda' becomes cuda:LOCAL_RANK.
    """
    dev = parse_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if launched_by_torchrun() and not dist.is_initialized():
        extra = {}
        if dev.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters:
            extra["device_id"] = dev  # binds NCCL to this GPU (torch >= 2.3)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://", **extra)
    return dev


@contextlib.contextmanager
def session(device: str | torch.device | None = None) -> Iterator[torch.device]:
    """`init(device)` for the duration of a `with` block.

    The process group is destroyed on exit only if this block created it: sessions nest (two-stage
    sampling holds one around both stages) and a caller's own group is left alone. Destroying it before
    the interpreter exits matters: a gloo group torn down by interpreter shutdown can abort the process
    ("terminate called without an active exception") after its work is done.
    """
    owner = launched_by_torchrun() and not dist.is_initialized()
    try:
        yield init(device)
    finally:
        if owner and dist.is_initialized():
            gc.collect()  # garbage in reference cycles (a finished run's DDP wrapper) may still hold the group
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
