"""Image archives, datasets and the Structure of named tensors.

Submodules are imported on first use, so the dataset tool's worker processes never import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ImageDataset": "vcdm.data.dataset",
    "to_float": "vcdm.data.dataset",
    "to_uint8": "vcdm.data.dataset",
    "DatasetError": "vcdm.data.archive",
    "convert_dataset": "vcdm.data.dataset_tool",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vcdm.data' has no attribute '{name}'")
