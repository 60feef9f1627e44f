"""`clip-vit-b32`: the paper's embedder, OpenAI's CLIP ViT-B/32 image tower (512-d), via open_clip.

Preprocessing is the original release's: bilinear resize of the [-1, 1] image to 224×224 (no antialias,
``align_corners=False``), map to [0, 1], OpenAI CLIP mean/std, ``encode_image``, no L2 normalisation.
Computed in float32 (the release ran OpenAI's fp16 model on GPUs; use autocast to match that closely).

Weights come from a local file, never implicitly from code: ``--clip-weights PATH`` / ``clip_weights=``,
else ``$VCDM_CLIP_WEIGHTS``, else a copy already in the Hugging Face or ``~/.cache/clip`` cache, else a
download from the Hugging Face hub when the network answers within seconds. Accepted files: open_clip
state dicts (.safetensors, or .bin/.pt read with ``weights_only=True``) and OpenAI's original TorchScript
``ViT-B-32.pt``, whose tensors are read by a restricted unpickler (its code is never run).

open_clip and huggingface_hub are imported where they are used: both are slow to import, and only
building the tower or finding its weights needs them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vcdm.embedders.base import Embedder, EmbedderError, state_fingerprint
from vcdm.legacy.records import LegacyError, Record
from vcdm.legacy.unpickle import TORCHSCRIPT_ARCHIVE, read_pickle
from vcdm.safeload import load_weights

MODEL = "ViT-B-32-quickgelu"
ENV = "VCDM_CLIP_WEIGHTS"
HF_REPO = "timm/vit_base_patch32_clip_224.openai"
HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_URL = f"https://huggingface.co/{HF_REPO}/resolve/main/{HF_FILES[0]}"
OPENAI_URL = ("https://openaipublic.azureedge.net/clip/models/"
              "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
RESOLUTION = 224
MISSING = (f"no CLIP ViT-B/32 weights found (looked at --clip-weights, ${ENV}, the Hugging Face cache and "
           f"~/.cache/clip; no network): download {HF_URL} (or OpenAI's {OPENAI_URL}) and pass "
           f"--clip-weights PATH or set {ENV}=PATH; to work offline without it use the 'pixel-pca' embedder")


class ClipWeightsError(EmbedderError):
    """CLIP weights that are missing, unreadable, or not ViT-B/32's."""


class CLIPEmbedder(Embedder):
    name = "clip-vit-b32"
    dim = 512
    normalisation = "none (raw encode_image, no L2)"

    def __init__(self, visual_state: Mapping[str, torch.Tensor], trainable: bool = False):
        super().__init__(trainable)
        self.visual = build_visual(visual_state).requires_grad_(trainable)
        self.register_buffer("pixel_mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        self._fingerprint: str | None = None
        self.train(False)

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, *, trainable: bool = False,
                  device: str | torch.device = "cpu") -> "CLIPEmbedder":
        """Load from `path`, or from wherever `resolve_weights` finds ViT-B/32 weights."""
        return cls(read_state_dict(resolve_weights(path)), trainable).to(device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (B, 3, H, W) (or 1 channel, repeated) → CLIP input (B, 3, 224, 224)."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise EmbedderError(f"{self.name}: expected RGB (or grayscale) images, got {images.shape[1]} channels")
        x = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
        return ((x + 1) / 2 - self.pixel_mean) / self.pixel_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(self.preprocess(images))

    def config(self) -> dict[str, Any]:
        return {"model": MODEL, "trainable": self.trainable,
                "preprocess": f"bilinear {RESOLUTION}x{RESOLUTION} (no antialias), [0,1], OpenAI CLIP mean/std"}

    def export_state(self) -> dict[str, torch.Tensor]:
        """Frozen: nothing (the weights file is checked by fingerprint). Trained: the image tower."""
        return {f"visual.{k}": v for k, v in self.visual.state_dict().items()} if self.trainable else {}

    def fingerprint(self) -> str:
        """Hash of the image tower's float32 weights (the same for every file format holding them)."""
        if self._fingerprint is None or self.trainable:
            self._fingerprint = state_fingerprint(self.visual.state_dict(), {"model": MODEL})
        return self._fingerprint


def _not_random_init_notice(record: logging.LogRecord) -> bool:
    return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs 'No pretrained weights loaded … initialized randomly' for the empty shell we
    fill with the user's weights; that line would mislead, so it is filtered out here."""
    root = logging.getLogger()
    root.addFilter(_not_random_init_notice)
    try:
        yield
    finally:
        root.removeFilter(_not_random_init_notice)


def build_visual(state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """open_clip's ViT-B/32 (QuickGELU) image tower holding `state` (open_clip names, no 'visual.')."""
    import open_clip

    with _quiet_open_clip(), torch.device("meta"):
        visual = open_clip.create_model(MODEL, pretrained=None, device="meta").visual
    expected = visual.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ClipWeightsError(f"CLIP weights lack {len(missing)} of the {len(expected)} ViT-B/32 image-tower "
                               f"tensors (e.g. {missing[:3]}): not an open_clip/OpenAI ViT-B/32 checkpoint")
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ClipWeightsError(f"CLIP weights: '{key}' has shape {tuple(state[key].shape)}, ViT-B/32 needs "
                                   f"{tuple(ref.shape)} (weights of another CLIP model?)")
    visual.load_state_dict({k: state[k].to(torch.float32).clone() for k in expected}, assign=True)
    return visual


def resolve_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file to use: `path`, else $VCDM_CLIP_WEIGHTS, else a cached copy, else a download."""
    source = "--clip-weights"
    if path is None and os.environ.get(ENV):
        path, source = os.environ[ENV], f"${ENV}"
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ClipWeightsError(f"{source}: no such file '{p}' (expected CLIP ViT-B/32 weights, e.g. {HF_URL})")
        return p
    for p in cached_candidates():
        if p.is_file():
            return p
    if network_allowed():
        try:
            from huggingface_hub import hf_hub_download
            return Path(hf_hub_download(HF_REPO, HF_FILES[0]))
        except Exception as e:  # any hub failure ends in the one message below
            logging.getLogger(__name__).warning("CLIP download from %s failed: %s", HF_REPO, e)
    raise ClipWeightsError(MISSING)


def cached_candidates() -> list[Path]:
    """Copies open_clip / OpenAI's clip package may already have downloaded."""
    found = []
    try:
        from huggingface_hub import try_to_load_from_cache
        found += [Path(p) for f in HF_FILES if isinstance(p := try_to_load_from_cache(HF_REPO, f), str)]
    except ImportError:
        pass
    return found + [Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "clip" / "ViT-B-32.pt"]


def network_allowed(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE/VCDM_OFFLINE is set or huggingface.co does not answer in `timeout`
    seconds (DNS included, hence the thread), so an offline machine never hangs here."""
    if any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "VCDM_OFFLINE")):
        return False
    ok = []

    def probe():
        with contextlib.suppress(OSError), socket.create_connection(("huggingface.co", 443), timeout=timeout):
            ok.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The image tower's tensors from a weights file, with open_clip names minus the 'visual.' prefix."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            sd: Any = load_file(str(path))
        elif _is_torchscript(path):
            sd = _read_torchscript(path)
        else:
            sd = load_weights(path)
    except Exception as e:  # every reader has its own exception types; all mean "not usable"
        text = str(e).strip().removeprefix(f"{path}: ")  # the restricted unpickler names the file too
        reason = text.splitlines()[0][:200] if text else type(e).__name__
        raise ClipWeightsError(f"{path}: cannot read CLIP weights ({reason}); expected an open_clip state dict "
                               f"(.safetensors/.bin/.pt) or OpenAI's ViT-B-32.pt") from None
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ClipWeightsError(f"{path}: holds a {type(sd).__name__}, not a CLIP state dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("visual.") for k in sd):
        return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if "conv1.weight" in sd:
        return sd
    if any(k.startswith("patch_embed.") for k in sd):
        raise ClipWeightsError(f"{path}: this is timm's naming; download {HF_FILES[0]} (open_clip's) from "
                               f"the same repository instead: {HF_URL}")
    raise ClipWeightsError(f"{path}: no CLIP image-tower tensors ('visual.*') in this file")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """Named tensors of a TorchScript archive (e.g. OpenAI's ViT-B-32.pt), read by vcdm's restricted
    unpickler: its code is never run, its modules become Records of their attributes."""
    out: dict[str, torch.Tensor] = {}

    def walk(node: Record, prefix: str) -> None:
        for key, value in node.state.items():
            if isinstance(value, torch.Tensor):
                out[prefix + key] = value
            elif isinstance(value, Record):
                walk(value, f"{prefix}{key}.")

    root = read_pickle(path, TORCHSCRIPT_ARCHIVE)
    if not isinstance(root, Record):
        raise LegacyError(f"the archive holds a {type(root).__name__}, expected a TorchScript module")
    walk(root, "")
    return out
