"""How networks are evaluated at inference time: memory format, reduced precision, compilation.

One place decides the fastest numerically sound settings per device (``default_settings``), one applies
them to a denoiser (``prepare``) and one wraps its evaluation (``autocast``). The sampler state stays
float64 and the preconditioning float32 (the Denoiser casts); only the network's convolutions and
matrix products run in bfloat16 under autocast, with float32 accumulation.

Measured with ``benchmarks/denoiser.py`` (DDPM++ 64x64, 61.9 M parameters, on a 2-core AVX-512-BF16
CPU): channels_last + bfloat16 autocast is the fastest eager path, and its outputs differ from float32
by about 1% of their RMS, far below the difference between two seeds (see ``tests/test_perf.py`` for the
distribution-level check). ``torch.compile`` (inductor, weights frozen) is faster still per evaluation
but costs minutes of compilation per process and batch shape, so it stays opt-in.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from typing import Any, ContextManager

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class InferenceSettings:
    """``channels_last``: 4-D weights (and so activations) in NHWC order; ``autocast_dtype``: run the
    network under ``torch.autocast`` with this dtype (None: float32); ``compile``: ``torch.compile`` the
    network (inductor, weights frozen as constants)."""
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.autocast_dtype not in (None, *DTYPES.values()):
            raise ValueError(f"autocast_dtype: expected None, torch.bfloat16 or torch.float16, got {self.autocast_dtype}")

    @property
    def name(self) -> str:
        """Short label: 'fp32', 'channels_last+bf16', 'channels_last+bf16+compile', ..."""
        dtype = {v: k for k, v in DTYPES.items()}.get(self.autocast_dtype, "fp32")
        parts = (["channels_last"] if self.channels_last else []) + ([dtype] if dtype != "fp32" or not
                                                                     self.channels_last else [])
        return "+".join(parts + (["compile"] if self.compile else []))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["autocast_dtype"] = None if self.autocast_dtype is None else str(self.autocast_dtype).removeprefix("torch.")
        return d

    def replace(self, **changes: Any) -> "InferenceSettings":
        return replace(self, **changes)


FP32 = InferenceSettings()


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bfloat16 matrix products are native (not emulated) on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def default_settings(device: torch.device | str) -> InferenceSettings:
    """The fastest numerically sound eager settings: channels_last + bfloat16 autocast on CPUs with native
    bfloat16 (AVX512-BF16/AMX) and on CUDA GPUs since Ampere; plain float32 elsewhere. Never compiles."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return FP32
    return InferenceSettings(channels_last=True, autocast_dtype=torch.bfloat16 if bf16_is_fast(device) else None)


def resolve(device: torch.device | str, *, bf16: bool | None = None, channels_last: bool | None = None,
            compile: bool | None = None) -> InferenceSettings:
    """``default_settings(device)`` with the command-line overrides that are not None."""
    settings = default_settings(device)
    if bf16 is not None:
        settings = settings.replace(autocast_dtype=torch.bfloat16 if bf16 else None)
    if channels_last is not None:
        settings = settings.replace(channels_last=channels_last)
    if compile is not None:
        settings = settings.replace(compile=compile)
    return settings


def prepare(denoiser: nn.Module, settings: InferenceSettings) -> nn.Module:
    """Apply ``settings`` to ``denoiser`` in place (for inference) and return it.

    channels_last converts the 4-D parameters and buffers; convolutions then produce NHWC activations
    whatever the input's layout. compile compiles ``denoiser.net`` (or the module itself) in place, so
    parameter names are unchanged; the weights are frozen into the compiled graph, so do not train or
    load new weights into a compiled module.
    """
    denoiser.eval()
    if settings.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if settings.compile:
        target = getattr(denoiser, "net", denoiser)
        target.compile(options={"freezing": True})
    return denoiser


def autocast(settings: InferenceSettings, device: torch.device | str) -> ContextManager:
    """The autocast context for evaluating a prepared network (a no-op for float32)."""
    if settings.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=settings.autocast_dtype)
