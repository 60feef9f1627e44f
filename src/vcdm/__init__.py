"""vcdm: two-stage ("visual chain-of-thought") diffusion models in PyTorch.

The Python API (imported on first use, so ``import vcdm`` stays light):
``vcdm.Pipeline.from_checkpoint(path)``, ``vcdm.TwoStagePipeline.from_checkpoints(prior, image_model)``,
``vcdm.fid(images_or_dir, ref)``, ``vcdm.train(vcdm.TrainOptions(...))``.
"""
from __future__ import annotations

import importlib
from typing import Any

from vcdm.lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "Pipeline": "vcdm.pipeline",
    "TwoStagePipeline": "vcdm.pipeline",
    "PipelineOutput": "vcdm.pipeline",
    "fid": "vcdm.pipeline",
    "SamplerOptions": "vcdm.generate.options",
    "TrainOptions": "vcdm.train.options",
}

__all__ = [*_LAZY, "train", "__version__"]

_lazy_getattr, _lazy_dir = lazy_exports(__name__, _LAZY)


def __getattr__(name: str) -> Any:
    if name == "train":  # the subpackage, callable as vcdm.train(options)
        return importlib.import_module("vcdm.train")
    return _lazy_getattr(name)


def __dir__() -> list[str]:
    return sorted({*_lazy_dir(), "train"})
