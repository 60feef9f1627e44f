"""Safe checkpoints: safetensors weights + a JSON config in the file's metadata.

One file per snapshot. The config records everything needed to rebuild the denoiser (network class
and kwargs, preconditioning, Structure) and to check compatibility (embedder identity, dimension,
normalisation). Tensors are stored under prefixes: ``net.`` (the raw network, EDM parameter names),
``embedder.`` (a fitted embedder's state, if any). Nothing here unpickles anything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from vcdm.fileio import atomic_write

FORMAT = "vcdm-checkpoint"
VERSION = 1
METADATA_KEY = "vcdm"


class CheckpointError(ValueError):
    """A file that is not a usable vcdm checkpoint."""


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, Mapping[str, torch.Tensor]],
                    config: Mapping[str, Any]) -> None:
    """Write `{prefix: state_dict}` and `config` atomically to a .safetensors file."""
    flat = {}
    for prefix, state in tensors.items():
        for key, value in state.items():
            flat[f"{prefix}.{key}"] = value.detach().to("cpu").contiguous().clone()
    meta = {METADATA_KEY: json.dumps({"format": FORMAT, "version": VERSION, **config}, sort_keys=True)}
    data = save(flat, metadata=meta)
    with atomic_write(path, "wb") as f:
        f.write(data)


def read_config(path: str | os.PathLike) -> dict:
    """Read only the JSON config of a checkpoint (cheap: no tensors are loaded)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        hint = " (an EDM/VCDM .pkl? convert it with `vcdm import-edm`)" if path.suffix == ".pkl" else ""
        raise CheckpointError(f"{path}: not a safetensors file{hint}: {e}") from None
    if METADATA_KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file, but not a vcdm checkpoint (no '{METADATA_KEY}' metadata)")
    try:
        config = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: vcdm metadata is not valid JSON (file damaged or edited)") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: metadata format is {config.get('format')!r}, expected {FORMAT!r}")
    if int(config.get("version", -1)) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {config['version']} is newer than this vcdm "
                              f"(reads up to {VERSION}); upgrade vcdm")
    return config


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """Load all tensors, grouped by prefix."""
    try:
        flat = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read tensors: {e}") from None
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        prefix, _, rest = key.partition(".")
        groups.setdefault(prefix, {})[rest] = value
    return groups


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the denoiser of a checkpoint. Returns ``(denoiser, config, tensors)``; ``tensors`` holds
    any other groups (e.g. ``embedder``) for their owners to load."""
    from vcdm.nets import build_denoiser

    config = read_config(path)
    tensors = load_tensors(path, device)
    try:
        denoiser = build_denoiser(config)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: config does not describe a buildable network: {e}") from None
    state = tensors.pop("net", {})
    problem = state_dict_mismatch(denoiser.net.state_dict(), state)
    if problem:
        raise CheckpointError(f"{path}: weights do not match the recorded network: {problem}")
    denoiser.net.load_state_dict(state)
    return denoiser.to(device).eval().requires_grad_(False), config, tensors


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> str | None:
    """Describe, in one line, how `got` fails to fit `expected` (missing/unexpected keys, shapes); None if it fits."""
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        return f"{len(missing)} missing e.g. {missing[:3]}, {len(unexpected)} unexpected e.g. {unexpected[:3]}"
    wrong = [k for k in expected if tuple(got[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        return f"{len(wrong)} tensors differ in shape, e.g. {k}: {tuple(got[k].shape)} in the file vs {tuple(expected[k].shape)} expected"
    return None
