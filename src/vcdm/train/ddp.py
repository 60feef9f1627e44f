"""DDP wrappers for training; process-group set-up is in vcdm.distributed."""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from vcdm.distributed import world_size


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
