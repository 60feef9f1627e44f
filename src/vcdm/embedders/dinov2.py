"""DINOv2 ViTs from the official weights files, as an embedder (`dinov2-vitb14`) and for FD-DINOv2.

The network is timm's VisionTransformer filled with an official DINOv2 state dict
(`dinov2_vit{s,b,l,g}14_pretrain.pth`, the files torch.hub downloads for `facebookresearch/dinov2`); its
size is read from the file. The official model resizes its 37x37 position embedding to the patch grid
of each input at every call; for the fixed 224x224 input used here that resize is done once, the same
way (bicubic, scale factor (16 + 0.1) / 37, no antialiasing), so the features equal the official code's.

``dinov2-vitb14`` (768-d) is the embedder: ViT-B/14 is the DINOv2 size that representation-guided
diffusion work conditions on (REPA aligns to it), its features are as linearly separable on ImageNet as
ViT-L's within 2 points, and it embeds a dataset 3.5x cheaper (86M vs 304M parameters), which matters
when every augmented training image is embedded. FD-DINOv2 uses ViT-L/14, as EDM2 reports it.

Weights are looked up in this order: an explicit path (flag), the variant's environment variable,
torch.hub's checkpoint cache, EDM2's (dnnlib's) cache, then a download into torch.hub's cache where
the network allows. Files are read by ``vcdm.safeload.load_weights`` (bounded, no code run).
"""
from __future__ import annotations

import math
import os
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vcdm.embedders.base import Embedder, EmbedderError, state_fingerprint
from vcdm.fileio import atomic_write, find_weights
from vcdm.safeload import first_line, load_weights

URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{variant}/dinov2_{variant}_pretrain.pth"
ENV = {"vitl14": "VCDM_DINOV2_WEIGHTS", "vitb14": "VCDM_DINOV2_VITB14_WEIGHTS"}
INPUT_SIZE = 224
POS_OFFSET = 0.1  # the official interpolate_offset
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_DIM = 64  # every DINOv2 ViT attends with 64 channels per head
MAX_BLOCKS = 64


class DINOv2WeightsError(EmbedderError):
    """DINOv2 weights that are missing, unreadable, or not a DINOv2 ViT state dict."""


def weights_file(variant: str) -> str:
    return f"dinov2_{variant}_pretrain.pth"


def cached_weights_paths(variant: str) -> list[Path]:
    """torch.hub's checkpoint cache (where torch.hub.load puts the file), then EDM2's dnnlib cache."""
    dnnlib_cache = Path(os.environ.get("DNNLIB_CACHE_DIR") or Path.home() / ".cache" / "dnnlib")
    file = weights_file(variant)
    return [Path(torch.hub.get_dir()) / "checkpoints" / file, dnnlib_cache / "torch_hub" / "checkpoints" / file]


def resolve_weights(path: str | os.PathLike | None = None, *, variant: str = "vitl14", flag: str = "--dinov2-weights",
                    allow_download: bool = True, progress: bool = True) -> Path:
    """Find a DINOv2 weights file (see the module docstring for the order); download if allowed."""
    return find_weights(path, what=f"DINOv2 {variant}", flag=flag, env=ENV[variant], file=weights_file(variant),
                        url=URL.format(variant=variant), caches=cached_weights_paths(variant), error=DINOv2WeightsError,
                        allow_download=allow_download, progress=progress)


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
        state = load_weights(path, mmap=True)
    except Exception as e:  # truncated, not a torch zip, or a pickle that would run code (refused)
        raise DINOv2WeightsError(f"{path}: cannot be read as a state dict of tensors ({first_line(e)}); "
                                 "expected an official DINOv2 weights file (dinov2_vit*14_pretrain.pth)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DINOv2WeightsError(f"{path}: expected a state dict of tensors (dinov2_vit*14_pretrain.pth)")
    token, pos, proj = state.get("cls_token"), state.get("pos_embed"), state.get("patch_embed.proj.weight")
    if token is None or pos is None or proj is None or token.ndim != 3 or pos.ndim != 3 or proj.ndim != 4:
        raise DINOv2WeightsError(f"{path}: not a DINOv2 ViT state dict (no cls_token/pos_embed/patch_embed)")
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    dim = token.shape[-1]
    if dim % HEAD_DIM or not 0 < depth <= MAX_BLOCKS:
        raise DINOv2WeightsError(f"{path}: not a DINOv2 ViT state dict (width {dim}, {depth} blocks)")
    expected = state_shapes(dim, depth, math.isqrt(pos.shape[1] - 1), proj.shape[-1])
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        wrong = sorted(set(got) ^ set(expected)) or [k for k in expected if got[k] != expected[k]]
        raise DINOv2WeightsError(f"{path}: does not fit DINOv2's ViT (e.g. {wrong[0]}); a model with registers "
                                 "or SwiGLU blocks is not supported")
    return state


def resize_pos_embed(pos_embed: torch.Tensor, patches: int) -> torch.Tensor:
    """The official model's resize of its (1, 1 + M*M, D) position embedding to a ``patches`` x ``patches`` grid."""
    cls, grid = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    m, dim = math.isqrt(grid.shape[1]), grid.shape[2]
    scale = (patches + POS_OFFSET) / m
    grid = F.interpolate(grid.reshape(1, m, m, dim).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                         mode="bicubic", antialias=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def build_vit(state: dict[str, torch.Tensor]) -> nn.Module:
    """timm's ViT holding an official DINOv2 state dict, for 224x224 inputs; returns the final-normed class token."""
    from timm.models.vision_transformer import VisionTransformer  # lazy: timm's import costs every command ~3 s

    dim, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
    depth = sum(1 for k in state if k.endswith(".ls1.gamma"))
    with torch.device("meta"):
        vit = VisionTransformer(img_size=INPUT_SIZE, patch_size=patch, embed_dim=dim, depth=depth,
                                num_heads=dim // HEAD_DIM, mlp_ratio=4, qkv_bias=True, init_values=1.0,
                                num_classes=0, global_pool="token", norm_layer=partial(nn.LayerNorm, eps=1e-6))
    state = {k: v for k, v in state.items() if k != "mask_token"}
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], INPUT_SIZE // patch)
    vit.load_state_dict(state, assign=True)
    return vit.eval().requires_grad_(False)


def save_random_weights(path: str | os.PathLike, *, dim: int = 128, depth: int = 2, seed: int = 0) -> Path:
    """Write an official-format DINOv2 state dict with random weights (tests and benchmarks where the real
    file is absent: same loading path, meaningless features). Tensors are filled in sorted-name order from
    one seeded generator, as the vendored parity numbers were made."""
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


class DINOv2Embedder(Embedder):
    """`dinov2-vitb14`: the final-normed class token of DINOv2 ViT-B/14 (768-d) of images in [-1, 1].

    Preprocessing as for FD-DINOv2: antialiased bicubic resize to 224x224, [0, 1], ImageNet mean/std;
    grayscale is replicated to RGB. Frozen; the weights file is checked by fingerprint.
    """

    name = "dinov2-vitb14"
    normalisation = "none (final-normed class token)"
    variant = "vitb14"

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__(trainable=False)
        self.vit = build_vit(state)
        self.dim = int(state["cls_token"].shape[-1])
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._fingerprint = state_fingerprint(self.vit.state_dict(), {"model": self.name})

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> "DINOv2Embedder":
        """Load from `path`, or from wherever `resolve_weights` finds ViT-B/14 weights (no download)."""
        file = resolve_weights(path, variant=cls.variant, flag="--embedder-weights", allow_download=False)
        return cls(read_state(file)).to(device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] not in (1, 3):
            raise EmbedderError(f"{self.name}: expected RGB (or grayscale) images, got {images.shape[1]} channels")
        x = F.interpolate(images.expand(-1, 3, -1, -1), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
        return self.vit(((x + 1) / 2 - self.pixel_mean) / self.pixel_std)

    def config(self) -> dict[str, Any]:
        return {"model": f"DINOv2 {self.variant}", "trainable": False,
                "preprocess": f"bicubic antialiased {INPUT_SIZE}x{INPUT_SIZE}, [0,1], ImageNet mean/std"}

    def fingerprint(self) -> str:
        return self._fingerprint
