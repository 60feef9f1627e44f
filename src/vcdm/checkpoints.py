"""Safe checkpoints: safetensors weights + a JSON config in the file's metadata.

One file per snapshot. The config (:class:`CheckpointConfig`) records everything needed to rebuild the
denoiser (network class and kwargs, preconditioning, Structure) and to check compatibility (embedder
identity, dimension, normalisation). Tensors are stored under prefixes: ``net.`` (the raw network, EDM
parameter names), ``embedder.`` (a fitted embedder's state, if any). Nothing here unpickles anything.

Loading is bounded by the file: the recorded network is first built without memory (on the meta
device) and checked against the file's tensor table, so a tiny file cannot make vcdm allocate a large
network before finding out that its weights are not there.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from vcdm.data.structure import Structure
from vcdm.diffusion.settings import CONSISTENCY_STEPS, SamplerOptionError, SamplerOptions
from vcdm.fileio import atomic_write
from vcdm.nets import build_network
from vcdm.nets.precond import Denoiser

FORMAT = "vcdm-checkpoint"
VERSION = 1                    # schema of CheckpointConfig; files without a version are version 1
METADATA_KEY = "vcdm"
MAX_LATENT_ELEMENTS = 1 << 24  # per sample over all data tensors (a 3x1024x1024 image is 3.1M)
MAX_CONFIG_BYTES = 4 << 20     # the JSON config (a network's is a few KB)


class CheckpointError(ValueError):
    """A file that is not a usable vcdm checkpoint."""


def _mapping(d: Mapping[str, Any], key: str, optional: bool = False) -> dict | None:
    value = d.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, Mapping):
        raise CheckpointError(f"config entry '{key}' is {type(value).__name__}, expected a mapping")
    return dict(value)


def _sampler(value: Any) -> dict[str, Any] | None:
    """A recorded sampler: the consistency sampler, its steps and optionally its levels, checked as the commands check
    them (SamplerOptions), or None."""
    if value is None:
        return None
    lo, hi = CONSISTENCY_STEPS
    keys_ok = isinstance(value, Mapping) and set(value) - {"levels"} == {"name", "num_steps"}
    steps, levels = (value.get("num_steps"), value.get("levels")) if keys_ok else (None, None)
    try:
        ok = (keys_ok and value["name"] == "consistency" and type(steps) is int
              and (levels is None or isinstance(levels, list))
              and SamplerOptions(sampler="consistency", num_steps=steps, levels=levels) is not None)
    except SamplerOptionError:
        ok = False
    if not ok:
        raise CheckpointError(f"config entry 'sampler' is {json.dumps(value)[:80]}, expected "
                              f'{{"name": "consistency", "num_steps": {lo}..{hi}}} and optionally "levels": one falling '
                              "positive noise level per step")
    recorded = {"name": "consistency", "num_steps": steps}
    return recorded if levels is None else dict(recorded, levels=[float(v) for v in levels])


@dataclass
class CheckpointConfig:
    """What a checkpoint records, written by training and by import alike (JSON in the file's metadata).

    ``network``/``net_kwargs``: the network class and its constructor kwargs; ``denoiser``: the
    ``Denoiser`` kwargs (preconditioning); ``structure``: ``Structure.to_dict()``; ``embedder``: the
    embedder identity (None for none); ``data``/``training``: provenance; ``imported_from``: the source
    of an imported network; ``sampler``: the sampler the model was made for, used by default
    (``{"name": "consistency", "num_steps": 2}`` after `vcdm tune`, with ``"levels"`` where it chose them; None: the
    commands' own defaults);
    ``extra``: other top-level entries, kept as they are.
    """
    network: str
    net_kwargs: dict[str, Any]
    denoiser: dict[str, Any]
    structure: dict[str, Any]
    embedder: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    imported_from: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION
    sampler: dict[str, Any] | None = None

    _KEYS = ("format", "version", "network", "denoiser", "structure", "embedder", "data", "training", "imported_from",
             "sampler")

    def to_dict(self) -> dict[str, Any]:
        d = {**self.extra, "format": FORMAT, "version": self.version,
             "network": {"class": self.network, "kwargs": self.net_kwargs}, "denoiser": self.denoiser,
             "structure": self.structure, "embedder": self.embedder, "data": self.data, "training": self.training}
        if self.imported_from is not None:
            d["imported_from"] = self.imported_from
        if self.sampler is not None:
            d["sampler"] = self.sampler
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CheckpointConfig":
        """Parse and check a config (raises CheckpointError); configs written before ``version``
        existed are version 1."""
        if not isinstance(d, Mapping):
            raise CheckpointError(f"config is {type(d).__name__}, expected a mapping")
        if d.get("format", FORMAT) != FORMAT:
            raise CheckpointError(f"metadata format is {d.get('format')!r}, expected {FORMAT!r}")
        version = d.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CheckpointError(f"config version {version!r} is not a positive integer")
        if version > VERSION:
            raise CheckpointError(f"checkpoint version {version} is newer than this vcdm (reads up to {VERSION}); "
                                  "upgrade vcdm")
        net = _mapping(d, "network")
        if not isinstance(net.get("class"), str) or not isinstance(net.get("kwargs"), Mapping):
            raise CheckpointError("config entry 'network' needs a 'class' name and 'kwargs'")
        config = cls(network=net["class"], net_kwargs=dict(net["kwargs"]), denoiser=_mapping(d, "denoiser"),
                     structure=_mapping(d, "structure"), embedder=_mapping(d, "embedder", optional=True),
                     data=_mapping(d, "data", optional=True) or {},
                     training=_mapping(d, "training", optional=True) or {},
                     imported_from=_mapping(d, "imported_from", optional=True),
                     extra={k: v for k, v in d.items() if k not in cls._KEYS}, version=version,
                     sampler=_sampler(d.get("sampler")))
        config.structure_object()
        return config

    @property
    def data_path(self) -> str | None:
        """The training data's path as recorded (None for an imported network)."""
        path = self.data.get("path")
        return path if isinstance(path, str) and path else None

    @property
    def encoder(self) -> dict[str, Any]:
        """The recorded data encoder (EDM2's ``StandardRGBEncoder`` for pixels, a VAE for latents); {} when
        none is recorded (pixels)."""
        encoder = self.data.get("encoder")
        return dict(encoder) if isinstance(encoder, Mapping) else {}

    @property
    def makes_pixels(self) -> bool:
        """Whether the model's samples are pixels (no latent encoder to decode through)."""
        return self.encoder.get("class", "StandardRGBEncoder") == "StandardRGBEncoder"

    def structure_object(self):
        """The recorded Structure, checked to describe a plausible sample size."""
        try:
            structure = Structure.from_dict(self.structure)
            sizes = [math.prod(int(n) for n in shape) for shape in structure.shapes]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"config entry 'structure' is malformed: {e}") from None
        if sum(sizes) > MAX_LATENT_ELEMENTS or any(n < 0 for n in sizes):
            raise CheckpointError(f"config entry 'structure' describes {sum(sizes):,} values per sample "
                                  f"(at most {MAX_LATENT_ELEMENTS:,} are supported)")
        return structure

    def build_denoiser(self, device: str | torch.device = "cpu"):
        """The recorded denoiser with fresh weights (``device='meta'``: the network's shapes only, no memory;
        the denoiser's own buffers are bounded by the structure's size)."""
        try:
            with torch.device(device):
                net = build_network(self.network, self.net_kwargs)
            return Denoiser(net, self.structure_object(), **self.denoiser)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"config does not describe a buildable network: {e}") from None


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, Mapping[str, torch.Tensor]],
                    config: CheckpointConfig) -> None:
    """Write `{prefix: state_dict}` and `config` atomically to a .safetensors file."""
    if not isinstance(config, CheckpointConfig):
        raise TypeError(f"save_checkpoint: config is {type(config).__name__}, expected a CheckpointConfig "
                        "(CheckpointConfig.from_dict parses a stored one)")
    flat = {f"{prefix}.{key}": value for prefix, state in tensors.items() for key, value in state.items()}
    meta = {METADATA_KEY: json.dumps(config.to_dict(), sort_keys=True)}
    with atomic_write(path, "wb") as f:
        write_safetensors(f, flat, meta)


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(f: IO[bytes], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """The safetensors layout (the header's size as u64, the JSON header padded to 8 bytes, then each tensor's
    bytes in header order), written a tensor at a time from its own memory: safetensors' `save` builds the whole
    file in memory twice, a GPU network is copied to the host one tensor at a time."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name}: {t.dtype} cannot be stored")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(len(raw).to_bytes(8, "little") + raw)
    for t in tensors.values():
        data = t.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            f.write(data.view(torch.uint8).numpy().data)


def _read_metadata(path: Path) -> Any:
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
    if len(meta[METADATA_KEY]) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: the vcdm config is {len(meta[METADATA_KEY]):,} characters, more than the "
                              f"{MAX_CONFIG_BYTES:,} a checkpoint config can need (damaged or hostile)")
    try:
        return json.loads(meta[METADATA_KEY])
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: vcdm metadata is not valid JSON (file damaged or edited)") from None


def read_checkpoint_config(path: str | os.PathLike) -> CheckpointConfig:
    """Read and check only the config of a checkpoint (cheap: no tensors are loaded)."""
    path = Path(path)
    raw = _read_metadata(path)
    try:
        return CheckpointConfig.from_dict(raw)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The file's tensor table (names and shapes, read from its header; no tensor data is loaded)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the tensor table: {e}") from None


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


class _TensorCap:
    """Stops building a network once it registers more tensors than ``limit`` (a config that describes
    a far larger network than the file's weights is refused before it is built)."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def __call__(self, module: Any, name: str, value: Any) -> None:
        self.count += 1
        if self.count > self.limit:
            raise CheckpointError(f"the recorded network has more tensors than the file holds ({self.limit})")

    def __enter__(self) -> "_TensorCap":
        from torch.nn.modules import module as m

        self._handles = [m.register_module_parameter_registration_hook(self),
                         m.register_module_buffer_registration_hook(self)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()


def check_fits(path: str | os.PathLike, config: CheckpointConfig, shapes: Mapping[str, tuple[int, ...]]) -> torch.nn.Module:
    """Check, without allocating the network, that the file's ``net.`` tensors are the recorded network's.
    Returns that network on the meta device (shapes only), ready for the file's tensors."""
    net = {k.partition(".")[2]: s for k, s in shapes.items() if k.startswith("net.")}
    try:
        with _TensorCap(2 * len(net) + 64):
            network = config.build_denoiser("meta").net
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    problem = state_dict_mismatch(network.state_dict(), {k: torch.empty(s, device="meta") for k, s in net.items()})
    if problem:
        raise CheckpointError(f"{path}: weights do not match the recorded network: {problem}")
    return network


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the denoiser of a checkpoint. Returns ``(denoiser, config, tensors)``: ``config`` is its
    :class:`CheckpointConfig`; ``tensors`` holds any other groups (e.g. ``embedder``)
    for their owners to load. Memory stays within what the file's tensors need: the network is built
    on the meta device and takes the file's tensors as its own (no random initialisation to overwrite)."""
    config = read_checkpoint_config(path)
    net = check_fits(path, config, tensor_shapes(path))
    tensors = load_tensors(path, device)
    expected = net.state_dict()
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.pop("net", {}).items()}, assign=True)
    try:
        denoiser = Denoiser(net, config.structure_object(), **config.denoiser)
    except (CheckpointError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: config does not describe a buildable network: {e}") from None
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
