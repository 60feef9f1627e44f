"""How a network is evaluated: memory format, reduced precision, compilation.

One place decides the fastest numerically sound settings per device and network (``default_settings``,
``training_precision``), one applies them (``prepare``) and one wraps the evaluations (``autocast``). The
sampler state stays float64 and the preconditioning float32 (the Denoiser casts); under bfloat16 autocast
only the network's convolutions and matrix products run in bfloat16, accumulating in float32.

Per CPU path (``cpu_path``: 'amx', 'avx512_bf16', 'avx2', 'baseline', from /proc/cpuinfo's flags, capped by
ONEDNN_MAX_CPU_ISA so that a weaker CPU's choice can be emulated on a stronger one): U-Nets of 32x32 and up
run under bf16 autocast where bf16 is native (channels_last from 64x64), in float32 with channels_last
where it would be emulated; smaller U-Nets and the prior stay float32. ``torch.compile`` is opt-in. The
measurements behind these rules, and behind the command line's OMP_WAIT_POLICY=PASSIVE, are in
benchmarks/results/perf-notes.md; tests/test_perf.py checks the choice for each path.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, ContextManager

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class InferenceSettings:
    """``channels_last``: 4-D weights (so activations) in NHWC order; ``autocast_dtype``: evaluate the
    network under ``torch.autocast`` with this dtype (None: float32); ``compile``: ``torch.compile`` the
    network (inductor, weights frozen into the graph)."""
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.autocast_dtype not in (None, *DTYPES.values()):
            raise ValueError(f"autocast_dtype: expected None, torch.bfloat16 or torch.float16, got {self.autocast_dtype}")

    @property
    def name(self) -> str:
        """Short label: 'fp32', 'channels_last', 'bf16', 'channels_last+bf16', 'fp32+compile', ..."""
        dtype = {v: k for k, v in DTYPES.items()}.get(self.autocast_dtype)
        parts = (["channels_last"] if self.channels_last else []) + ([dtype] if dtype else [])
        return "+".join((parts or ["fp32"]) + (["compile"] if self.compile else []))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["autocast_dtype"] = None if self.autocast_dtype is None else str(self.autocast_dtype).removeprefix("torch.")
        return d

    def replace(self, **changes: Any) -> "InferenceSettings":
        return replace(self, **changes)


FP32 = InferenceSettings()


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


# oneDNN's ISA levels (ONEDNN_MAX_CPU_ISA), lowest first; a cap below a level hides what it adds.
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16")
CPU_PATHS = ("amx", "avx512_bf16", "avx2", "baseline")  # best first


def cpu_path(flags: frozenset[str] | None = None, env: dict[str, str] | None = None) -> str:
    """Which kernels the CPU offers for the network: 'amx' (AMX tiles, bf16), 'avx512_bf16', 'avx2' (no
    native bf16: bf16 would be emulated) or 'baseline'. ``flags``: /proc/cpuinfo's (default: this CPU's);
    ``env``: ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY caps (default os.environ), so a path can be
    emulated on a better CPU, e.g. ``ONEDNN_MAX_CPU_ISA=AVX2`` for the AVX2-only choice."""
    flags = _cpu_flags() if flags is None else flags
    env = os.environ if env is None else env
    cap = env.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    level = _ONEDNN_ISAS.index(cap) if cap in _ONEDNN_ISAS else len(_ONEDNN_ISAS)
    aten = env.get("ATEN_CPU_CAPABILITY", "").lower()
    if "amx_bf16" in flags and level >= _ONEDNN_ISAS.index("AVX512_CORE_AMX"):
        return "amx"
    if "avx512_bf16" in flags and level >= _ONEDNN_ISAS.index("AVX512_CORE_BF16"):
        return "avx512_bf16"
    if {"avx2", "fma"} <= flags and level >= _ONEDNN_ISAS.index("AVX2") and aten != "default":
        return "avx2"
    return "baseline"


NATIVE_BF16_PATHS = ("amx", "avx512_bf16")
MIN_BF16_RESOLUTION = 32  # U-Nets below it gain nothing clear from bf16, in sampling or in training


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 natively: CPUs with AVX512-BF16 or AMX (``cpu_path``, which
    honours an ONEDNN_MAX_CPU_ISA cap), CUDA GPUs since Ampere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                and cpu_path() in NATIVE_BF16_PATHS)
    return False


def training_precision(device: torch.device | str, resolution: int | None, cpu: str | None = None) -> tuple[bool, str]:
    """Whether to train under bfloat16 autocast when --bf16 is not given, and why (for the run's start line);
    measured by benchmarks/precision.py (results/precision-digits.md).

    ``resolution``: the generated images' (None: a model of vectors, the prior); ``cpu``: a ``CPU_PATHS``
    entry (default: this CPU's, ``cpu_path()``, which honours ONEDNN_MAX_CPU_ISA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return False, "EDM's choice on CUDA (bf16 training is unmeasured on GPUs; --bf16 1 to use it)"
    if device.type != "cpu":
        return False, f"bf16 training is unmeasured on {device.type}"
    path = cpu_path() if cpu is None else cpu
    native = bf16_is_fast(device) if cpu is None else path in NATIVE_BF16_PATHS
    if not native:
        return False, f"CPU path {path}: no native bf16; emulated, it trained 7x slower on AVX2 (measured)"
    if resolution is None:
        return False, f"CPU path {path}: a model of vectors (the prior); bf16 training is unmeasured for it"
    if resolution < MIN_BF16_RESOLUTION:
        return False, f"CPU path {path}: below {MIN_BF16_RESOLUTION}x{MIN_BF16_RESOLUTION} bf16 gains nothing clear (measured 0.94-1.26x at 16x16)"
    return True, (f"CPU path {path} multiplies bf16 natively: {resolution}x{resolution} U-Net; measured 1.7x float32's "
                  f"speed at 64x64, FD on the digits within seed noise")


def default_settings(device: torch.device | str, denoiser: nn.Module | None = None) -> InferenceSettings:
    """The fastest numerically sound eager settings for ``denoiser`` (a Denoiser or a bare network; None:
    a large U-Net) on ``device`` (measurements: benchmarks/results/perf-notes.md). Never compiles."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return FP32
    net = getattr(denoiser, "net", denoiser)
    resolution = 1 << 30 if net is None else getattr(net, "img_resolution", None)  # None: a model of vectors
    bf16 = torch.bfloat16 if bf16_is_fast(device) else None
    if device.type == "cuda":
        return InferenceSettings(channels_last=resolution is not None, autocast_dtype=bf16)
    if resolution is None or resolution < MIN_BF16_RESOLUTION:
        return FP32
    if resolution < 64:
        return InferenceSettings(channels_last=bf16 is None, autocast_dtype=bf16)
    return InferenceSettings(channels_last=True, autocast_dtype=bf16)


def resolve_settings(device: torch.device | str, denoiser: nn.Module | None = None, *, bf16: bool | None = None,
                     channels_last: bool | None = None, compile: bool | None = None) -> InferenceSettings:
    """``default_settings(device, denoiser)`` with the command-line choices that are not None."""
    settings = default_settings(device, denoiser)
    if bf16 is not None:
        settings = settings.replace(autocast_dtype=torch.bfloat16 if bf16 else None)
    if channels_last is not None:
        settings = settings.replace(channels_last=channels_last)
    if compile is not None:
        settings = settings.replace(compile=compile)
    return settings


def prepare(denoiser: nn.Module, settings: InferenceSettings) -> nn.Module:
    """Apply ``settings`` to ``denoiser`` in place, put it in eval mode, and return it.

    channels_last converts the 4-D parameters and buffers (back to contiguous when off); convolutions
    then produce NHWC activations whatever the input's layout. compile compiles ``denoiser.net`` (or
    the module itself) in place, once, so parameter names do not change; the weights are frozen into the
    compiled graph, so load new weights into a fresh module, not into a compiled one.
    """
    denoiser.eval()
    denoiser.to(memory_format=torch.channels_last if settings.channels_last else torch.contiguous_format)
    target = getattr(denoiser, "net", denoiser)
    if settings.compile and getattr(target, "_compiled_call_impl", None) is None:
        target.compile(options={"freezing": True})
    return denoiser


def autocast(settings: InferenceSettings, device: torch.device | str) -> ContextManager:
    """The context to evaluate a prepared network in (a no-op for float32)."""
    if settings.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=settings.autocast_dtype)
