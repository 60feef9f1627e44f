"""DINOv2 ViT-L/14 features for FD-DINOv2 (Stein et al. 2023), the second metric EDM2 reports beside FID.

Images are prepared as EDM2's ``calculate_metrics.py`` prepares them: uint8 values resized to 224x224 by
antialiased bicubic interpolation, scaled to [0, 1] and normalised with ImageNet's mean and std; the feature
is the final-normed class token (1024-d). The ViT is loaded from the official weights file
(`dinov2_vitl14_pretrain.pth`; `--dinov2-weights`, `$VCDM_DINOV2_WEIGHTS`, torch.hub's or EDM2's cache)
by vcdm.embedders.dinov2, which gives the official code's features exactly.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

from vcdm.embedders.dinov2 import (IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE, DINOv2WeightsError, build_vit,
                                   read_state, resolve_weights)

__all__ = ["DINOv2Features", "DINOv2WeightsError"]


class DINOv2Features(nn.Module):
    """uint8 images (B, 1|3, H, W), any size → (B, D) float32 DINOv2 class-token features (D = 1024 for ViT-L/14).

    Grayscale is replicated to RGB. The ViT's size is read from the weights file, so the same code loads the
    real ViT-L/14 and the small random-weight models of the tests.
    """

    def __init__(self, weights: str | os.PathLike | None = None, *, allow_download: bool = True,
                 progress: bool = True) -> None:
        super().__init__()
        self.weights_path = resolve_weights(weights, variant="vitl14", allow_download=allow_download, progress=progress)
        state = read_state(self.weights_path)
        self.vit = build_vit(state)
        self.dim = int(state["cls_token"].shape[-1])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"DINOv2 expects uint8 images (B, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.mean.device, torch.float32).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
        return self.vit((x / 255 - self.mean) / self.std).float()
