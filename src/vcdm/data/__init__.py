"""Image archives, datasets and the Structure of named tensors.

Submodules are imported on first use, so the dataset tool's worker processes never import torch.
"""
from __future__ import annotations

from vcdm.lazy import lazy_exports

_EXPORTS = {
    "ImageDataset": "vcdm.data.dataset",
    "to_float": "vcdm.data.dataset",
    "to_uint8": "vcdm.data.dataset",
    "DatasetError": "vcdm.data.archive",
    "convert_dataset": "vcdm.data.dataset_tool",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
