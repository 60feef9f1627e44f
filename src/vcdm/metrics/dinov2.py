"""DINOv2 ViT features for FD-DINOv2 (Stein et al. 2023), the second metric EDM2 reports beside FID.

The network is timm's VisionTransformer filled with the official DINOv2 weights file
(`dinov2_vitl14_pretrain.pth`, the file torch.hub downloads for `facebookresearch/dinov2`'s
`dinov2_vitl14`). Images are prepared as EDM2's ``calculate_metrics.py`` prepares them: resized to
224x224 by antialiased bicubic interpolation, scaled to [0, 1] and normalised with ImageNet's mean and
std; the feature is the final-normed class token (1024-d for ViT-L/14). The official model resizes its
37x37 position embedding to the 16x16 patch grid of a 224x224 image at every call; that fixed resize
is done once here, the same way (bicubic, scale factor (16 + 0.1) / 37, no antialiasing).

The weights are looked up in this order: an explicit path (`--dinov2-weights`), `$VCDM_DINOV2_WEIGHTS`,
torch.hub's checkpoint cache, EDM2's (dnnlib's) cache, then downloaded into torch.hub's cache where a
network allows. The file is read with ``torch.load(weights_only=True)`` after its tensor table is checked.
"""
from __future__ import annotations

import http.client
import math
import os
import re
from functools import partial
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F

from vcdm.metrics.inception import download

WEIGHTS_FILE = "dinov2_vitl14_pretrain.pth"
WEIGHTS_URL = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/{WEIGHTS_FILE}"
WEIGHTS_ENV = "VCDM_DINOV2_WEIGHTS"
INPUT_SIZE = 224
POS_OFFSET = 0.1  # the official interpolate_offset
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_DIM = 64  # every DINOv2 ViT (S, B, L, g) attends with 64 channels per head
MAX_DEPTH = 64


class DINOv2WeightsError(ValueError):
    """The DINOv2 weights are missing, unreadable, or not a DINOv2 ViT state dict."""


def cached_weights_paths(file: str = WEIGHTS_FILE) -> list[Path]:
    """torch.hub's checkpoint cache (where torch.hub.load puts the file), then EDM2's dnnlib cache."""
    dnnlib_cache = Path(os.environ.get("DNNLIB_CACHE_DIR") or Path.home() / ".cache" / "dnnlib")
    return [Path(torch.hub.get_dir()) / "checkpoints" / file, dnnlib_cache / "torch_hub" / "checkpoints" / file]


def resolve_weights(path: str | os.PathLike | None = None, *, allow_download: bool = True,
                    progress: bool = True) -> Path:
    """Find the DINOv2 ViT-L/14 weights file (see the module docstring for the order); download if allowed."""
    for given, origin in ((path, "--dinov2-weights"), (os.environ.get(WEIGHTS_ENV) or None, f"${WEIGHTS_ENV}")):
        if given is not None:
            if not Path(given).is_file():
                raise DINOv2WeightsError(f"{origin}: no such file '{given}' (expected {WEIGHTS_FILE} from {WEIGHTS_URL})")
            return Path(given)
    cached = cached_weights_paths()
    for candidate in cached:
        if candidate.is_file():
            return candidate
    hint = (f"DINOv2 ViT-L/14 weights not found. Download {WEIGHTS_URL} and either put it at {cached[0]}, "
            f"pass --dinov2-weights PATH, or set ${WEIGHTS_ENV}=PATH")
    if not allow_download:
        raise DINOv2WeightsError(hint)
    try:
        return download(WEIGHTS_URL, cached[0], progress=progress)
    except (OSError, http.client.HTTPException) as e:
        raise DINOv2WeightsError(f"{hint} (download failed: {e})") from None


def state_shapes(dim: int, depth: int, grid: int = 37, patch: int = 14) -> dict[str, tuple[int, ...]]:
    """Names and shapes of an official DINOv2 ViT state dict (no registers, MLP blocks, unchunked)."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                       b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                       b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,), b + "ls1.gamma": (dim,),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                       b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                       b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,), b + "ls2.gamma": (dim,)})
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, checked to be a whole DINOv2 ViT state dict (memory-mapped: no second copy)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, not a torch zip, or a pickle that would run code (refused)
        raise DINOv2WeightsError(f"{path}: cannot be read as a state dict of tensors ({type(e).__name__}); "
                                 f"expected {WEIGHTS_FILE} from {WEIGHTS_URL}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DINOv2WeightsError(f"{path}: expected a state dict of tensors ({WEIGHTS_FILE})")
    token, pos = state.get("cls_token"), state.get("pos_embed")
    if token is None or pos is None or token.ndim != 3 or pos.ndim != 3:
        raise DINOv2WeightsError(f"{path}: not a DINOv2 ViT state dict (no cls_token/pos_embed)")
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    grid = math.isqrt(pos.shape[1] - 1)
    dim = token.shape[-1]
    if dim % HEAD_DIM or not 0 < depth <= MAX_DEPTH or "patch_embed.proj.weight" not in state:
        raise DINOv2WeightsError(f"{path}: not a DINOv2 ViT state dict (width {dim}, {depth} blocks)")
    expected = state_shapes(dim, depth, grid, state["patch_embed.proj.weight"].shape[-1])
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        wrong = sorted(set(got) ^ set(expected)) or [k for k in expected if got[k] != expected[k]]
        raise DINOv2WeightsError(f"{path}: does not fit DINOv2's ViT (e.g. {wrong[0]}); expected {WEIGHTS_FILE} "
                                 "(a model with registers or SwiGLU blocks is not supported)")
    return state


def resize_pos_embed(pos_embed: torch.Tensor, patches: int) -> torch.Tensor:
    """The official model's resize of its (1, 1 + M*M, D) position embedding to a ``patches`` x ``patches`` grid."""
    cls, grid = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    m, dim = math.isqrt(grid.shape[1]), grid.shape[2]
    scale = (patches + POS_OFFSET) / m
    grid = F.interpolate(grid.reshape(1, m, m, dim).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                         mode="bicubic", antialias=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


class DINOv2Features(nn.Module):
    """uint8 images (B, 1|3, H, W), any size → (B, D) float32 DINOv2 class-token features (D = 1024 for ViT-L/14).

    Grayscale is replicated to RGB. The ViT's size (S, B, L, g) is read from the weights file, so the same
    code loads the real ViT-L/14 and the small random-weight models of the tests.
    """

    def __init__(self, weights: str | os.PathLike | None = None, *, allow_download: bool = True,
                 progress: bool = True) -> None:
        super().__init__()
        self.weights_path = resolve_weights(weights, allow_download=allow_download, progress=progress)
        state = read_state(self.weights_path)
        dim, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
        depth = sum(1 for k in state if k.endswith(".ls1.gamma"))
        with torch.device("meta"):
            self.vit = VisionTransformer(img_size=INPUT_SIZE, patch_size=patch, embed_dim=dim, depth=depth,
                                         num_heads=dim // HEAD_DIM, mlp_ratio=4, qkv_bias=True, init_values=1.0,
                                         num_classes=0, global_pool="token",
                                         norm_layer=partial(nn.LayerNorm, eps=1e-6))
        state = {k: v for k, v in state.items() if k != "mask_token"}
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], INPUT_SIZE // patch)
        self.vit.load_state_dict(state, assign=True)
        self.vit.eval().requires_grad_(False)
        self.dim = dim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"DINOv2 expects uint8 images (B, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.mean.device, torch.float32).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
        x = (x / 255 - self.mean) / self.std
        return self.vit(x).float()


def save_random_weights(path: str | os.PathLike, *, dim: int = 128, depth: int = 2, seed: int = 0) -> Path:
    """Write an official-format DINOv2 state dict with random weights (for tests and benchmarks where the real
    file is absent: same loading path, meaningless features). Tensors are filled in sorted-name order from
    one seeded generator, as the vendored parity numbers were made."""
    from vcdm.fileio import atomic_write

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(state_shapes(dim, depth).items()):
        value = torch.randn(shape, generator=g) * 0.05
        if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
            value += 1
        if name.endswith("gamma"):
            value *= 4
        state[name] = value
    with atomic_write(path) as f:
        torch.save(state, f)
    return Path(path)
