"""TensorFlow-compatible Inception-v3 pool features (2048-d) through torch-fidelity.

The network is torch-fidelity's port of the 2015-12-05 TensorFlow graph that FID was defined with,
so scores are comparable with EDM's and the literature's. Its weights are one file,
`weights-inception-2015-12-05-6726825d.pth`, looked up in this order: an explicit path
(`--inception-weights`), `$VCDM_INCEPTION_WEIGHTS`, torch.hub's checkpoint cache (where
torch-fidelity itself keeps it), then downloaded into that cache. The file is read with
`vcdm.safeload.load_weights` (bounded by its size, no code run). torch-fidelity is imported where
it is used: it is slow to import, and most commands never compute Inception features.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from vcdm.fileio import atomic_write, find_weights
from vcdm.safeload import first_line, load_weights

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
WEIGHTS_ENV = "VCDM_INCEPTION_WEIGHTS"
FEATURE_DIM = 2048


class InceptionWeightsError(ValueError):
    """The Inception weights are missing, unreadable, or not torch-fidelity's Inception-v3."""


def cached_weights_path() -> Path:
    """Where torch-fidelity (via torch.hub) keeps the weights: $TORCH_HOME/hub/checkpoints/…"""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def resolve_weights(path: str | os.PathLike | None = None, *, allow_download: bool = True,
                    progress: bool = True) -> Path:
    """Find the Inception weights file (see the module docstring for the order); download if needed."""
    return find_weights(path, what="Inception-v3", flag="--inception-weights", env=WEIGHTS_ENV, file=WEIGHTS_FILE,
                        url=WEIGHTS_URL, caches=[cached_weights_path()], error=InceptionWeightsError,
                        allow_download=allow_download, progress=progress)


def save_random_weights(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write torch-fidelity's Inception-v3 with random weights, in the real weights file's format.

    For tests and benchmarks where the real file is absent: same architecture, cost and loading
    path, meaningless features. Convolutions get He-normal weights so activations neither vanish nor
    explode through the network (PyTorch's default init shrinks them to ~1e-8).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", [str(FEATURE_DIM)], feature_extractor_weights_path=empty)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
    with atomic_write(path) as f:
        torch.save(net.state_dict(), f)
    return Path(path)


class InceptionFeatures(nn.Module):
    """uint8 images (B, 1|3, H, W), any size → (B, 2048) float32 pool3 features.

    Grayscale is replicated to RGB; torch-fidelity resizes to 299x299 the way TensorFlow 1.x did.
    """

    dim = FEATURE_DIM

    def __init__(self, weights: str | os.PathLike | None = None, *, allow_download: bool = True,
                 progress: bool = True) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights_path = resolve_weights(weights, allow_download=allow_download, progress=progress)
        try:
            state = load_weights(self.weights_path)
        except Exception as e:  # truncated, not a torch file, or a pickle that would run code (refused)
            raise InceptionWeightsError(f"{self.weights_path}: cannot be read as a state dict of tensors "
                                        f"({first_line(e)}); expected {WEIGHTS_FILE} from {WEIGHTS_URL}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InceptionWeightsError(f"{self.weights_path}: expected a state dict of tensors ({WEIGHTS_FILE})")
        # torch-fidelity unpickles the path it is given; hand it the tensors just read safely instead.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", [str(FEATURE_DIM)],
                                                   feature_extractor_weights_path=buffer)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise InceptionWeightsError(f"{self.weights_path}: does not fit torch-fidelity's Inception-v3 ({first})") from None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception expects uint8 images (B, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        device = next(self.net.parameters()).device
        return self.net(images.to(device))[0]
