"""Power-function EMA profiles and post-hoc EMA reconstruction (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", section 3.1 and appendix C.2; NVlabs/edm2).

A profile averages the network over all of training so far with weights ∝ t**gamma, t being the
images seen. Its length is the relative standard deviation `std` of that weighting (0 < std < 0.289;
EDM2's defaults track 0.050 and 0.100). Training keeps a few profiles and writes each with every
snapshot; the EMA of any other length at a snapshot's time is then, approximately, a linear
combination of the snapshots. The coefficients solve a least-squares fit between the profiles'
response functions, whose inner products have a closed form; they are computed in float64.

The reconstruction streams: it reads one input snapshot at a time and adds it into the outputs, so its
memory is (outputs + one tensor of an input) whatever the run's length.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Container, Iterable, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open

from vcdm.checkpoints import SAFETENSORS_DTYPES, CheckpointConfig, read_checkpoint_config, save_checkpoint
from vcdm.legacy.edm2 import phema_input
from vcdm.train.outputs import PROFILE_SNAPSHOT_RE

MAX_STD = math.sqrt(1 / 12)  # gamma = 0 (a uniform average of all training); longer profiles need gamma < 0
EDM2_SNAPSHOT_RE = re.compile(r"(.*)-(\d+)-(\d+\.\d+)\.pkl")  # EDM2's raw snapshots; its reconstructions are phema-*


class PhemaError(ValueError):
    """Inputs that cannot be combined, or a length that cannot be reconstructed; one line, naming the file."""


# ------------------------------------------------------------------------------------------ the maths

def gamma_to_std(gamma: float) -> float:
    """Relative standard deviation of the weighting t**gamma on [0, T] (EDM2's Eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_gamma(std: float) -> float:
    """The exponent whose profile has relative standard deviation `std`: the largest real root of
    (gamma + 2)**2 (gamma + 3) std**2 = gamma + 1, a cubic (EDM2's Eq. 126, Algorithm 2)."""
    if not 0 < std < MAX_STD:
        raise PhemaError(f"EMA length {std}: a relative standard deviation must lie in (0, {MAX_STD:.4f})")
    k = 1 / std ** 2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(roots.real.max())


def power_beta(gamma: float, t_next: float, t_delta: float) -> float:
    """The decay of one training step of `t_delta` images ending at `t_next`: (1 - t_delta / t_next)**(gamma + 1),
    which keeps the average's weights ∝ t**gamma (EDM2's Eq. 127; 0 at the first step)."""
    return (1 - t_delta / t_next) ** (gamma + 1)


def profile_inner_products(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """∫ r_a r_b dt of the response functions r(t) = (gamma + 1) t**gamma / T**(gamma + 1) on [0, T]:
    (gamma_a + 1)(gamma_b + 1) (T_short / T_long)**gamma_long / ((gamma_a + gamma_b + 1) T_long), broadcast."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    t_long = np.maximum(t_a, t_b)
    gamma_long = np.where(t_a >= t_b, gamma_a, gamma_b)
    ratio = np.minimum(t_a, t_b) / t_long
    return (gamma_a + 1) * (gamma_b + 1) * ratio ** gamma_long / ((gamma_a + gamma_b + 1) * t_long)


def solve_coefficients(in_nimg: Sequence[float], in_std: Sequence[float], out_nimg: Sequence[float],
                       out_std: Sequence[float]) -> np.ndarray:
    """Coefficients [input, output] that combine the input profiles into each output profile: the least-squares
    fit of the response functions (normal equations G x = b from the inner products), columns summing to 1."""
    in_gamma = np.array([std_to_gamma(s) for s in in_std])
    out_gamma = np.array([std_to_gamma(s) for s in out_std])
    t_in, t_out = np.asarray(in_nimg, np.float64), np.asarray(out_nimg, np.float64)
    gram = profile_inner_products(t_in[:, None], in_gamma[:, None], t_in[None, :], in_gamma[None, :])
    rhs = profile_inner_products(t_in[:, None], in_gamma[:, None], t_out[None, :], out_gamma[None, :])
    try:
        x = np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        raise PhemaError("the input snapshots are linearly dependent (the same time and length twice?)") from None
    return x / x.sum(axis=0, keepdims=True)


# ----------------------------------------------------------------------------------- reconstruction

@dataclass(frozen=True)
class Snapshot:
    """One input of a reconstruction: a profile of length `std` after `nimg` images; `tensors()` yields the
    network's (name, tensor) pairs one at a time (any source: a vcdm checkpoint, an EDM2 pickle, memory)."""
    name: str
    nimg: int
    std: float
    tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]]


def select(inputs: Sequence[Snapshot], nimg: int | None = None) -> tuple[list[Snapshot], int]:
    """The inputs a reconstruction at `nimg` images uses (those at 0 < t <= nimg, sorted) and that time
    (default: the newest input's). `nimg` must be an input's time: later profiles know nothing of what came after."""
    if not inputs:
        raise PhemaError("no power-function EMA snapshots to reconstruct from")
    times = sorted({s.nimg for s in inputs})
    if nimg is None:
        nimg = times[-1]
    elif nimg not in times:
        raise PhemaError(f"no snapshot at {nimg} images; the snapshots are at kimg {', '.join(str(t // 1000) for t in times)}")
    used = sorted((s for s in inputs if 0 < s.nimg <= nimg), key=lambda s: (s.nimg, s.std))
    seen: dict[tuple[int, float], str] = {}
    for s in used:
        if (s.nimg, s.std) in seen:
            raise PhemaError(f"{s.name} and {seen[s.nimg, s.std]}: two snapshots of the same time and length")
        seen[s.nimg, s.std] = s.name
    if not used:
        raise PhemaError(f"no snapshot after 0 and up to {nimg} images")
    return used, nimg


def reconstruct(inputs: Sequence[Snapshot], out_std: Sequence[float], out_nimg: int, *,
                copied: Container[str] = (), group: int = 8) -> Iterator[tuple[float, dict[str, torch.Tensor]]]:
    """Yield (std, float32 state dict) for each length in `out_std` at `out_nimg` images, from `inputs` (all
    at or before that time; see `select`). The inputs are read once per group of up to `group` outputs;
    tensors named in `copied` (buffers) and integer tensors are taken from the newest input, as EDM2 does."""
    inputs = sorted(inputs, key=lambda s: (s.nimg, s.std))
    for start in range(0, len(out_std), group):
        stds = list(out_std[start:start + group])
        coefs = solve_coefficients([s.nimg for s in inputs], [s.std for s in inputs], [out_nimg] * len(stds), stds)
        outs: list[dict[str, torch.Tensor]] = [{} for _ in stds]
        for i, snap in enumerate(inputs):
            names = set()
            for name, tensor in snap.tensors():
                names.add(name)
                _accumulate(outs, name, tensor, coefs[i], copy=name in copied or not tensor.is_floating_point(),
                            first=i == 0, source=snap.name)
            if names != set(outs[0]):
                missing = sorted(set(outs[0]) - names)
                raise PhemaError(f"{snap.name}: not the same network as {inputs[0].name} "
                                 f"({len(missing)} tensors missing, e.g. {missing[:2]})")
        yield from zip(stds, outs)


def _accumulate(outs: list[dict[str, torch.Tensor]], name: str, tensor: torch.Tensor, coefs: np.ndarray, *,
                copy: bool, first: bool, source: str) -> None:
    for out, c in zip(outs, coefs.tolist()):
        if first:
            out[name] = tensor.clone() if copy else tensor.to(torch.float32, copy=True).mul_(c)
        elif name not in out or out[name].shape != tensor.shape:
            raise PhemaError(f"{source}: tensor {name} {tuple(tensor.shape)} is not in the first snapshot's network")
        elif copy:
            out[name] = tensor.clone()
        else:
            out[name].add_(tensor, alpha=c)  # float16 inputs promote in place: no float32 copy


# ----------------------------------------------------------------------- vcdm snapshots as inputs

@dataclass
class Input:
    """An input snapshot with its checkpoint config (read from a vcdm checkpoint or an imported EDM2 pickle)."""
    snapshot: Snapshot
    config: CheckpointConfig
    path: Path
    extra: Callable[[], dict[str, dict[str, torch.Tensor]]]  # tensors besides the network's (a fitted embedder)


def checkpoint_input(path: str | Path) -> Input:
    """A power-function EMA snapshot written by training (its config records the profile)."""
    path = Path(path)
    config = read_checkpoint_config(path)
    profile, nimg = config.training.get("ema_profile"), config.training.get("nimg")
    if not isinstance(profile, dict) or not isinstance(profile.get("std"), (int, float)) or not isinstance(nimg, int):
        raise PhemaError(f"{path}: not a power-function EMA snapshot (it records no EMA profile; "
                         "train with --ema-std to write them)")

    def extra() -> dict[str, dict[str, torch.Tensor]]:
        groups: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                prefix, _, name = key.partition(".")
                if prefix != "net":
                    groups.setdefault(prefix, {})[name] = f.get_tensor(key)
        return groups

    return Input(Snapshot(str(path), nimg, float(profile["std"]), lambda: iter_safetensors(path, "net.")), config, path, extra)


DTYPE_OF_CODE = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
MAX_HEADER = 1 << 28


def iter_safetensors(path: Path, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file whose names start with `prefix` (without it), read one at a time
    with plain reads into one reused buffer: no memory map, no allocation per tensor. Each yielded tensor
    is valid until the next is read; keep a copy, not the tensor."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= MAX_HEADER:
            raise PhemaError(f"{path}: not a safetensors file (header of {size} bytes)")
        header = json.loads(f.read(size))
        entries = sorted((v["data_offsets"][0], k, v) for k, v in header.items()
                         if k != "__metadata__" and k.startswith(prefix))
        total = f.seek(0, 2) - 8 - size
        buffer = torch.empty(max((v["data_offsets"][1] - v["data_offsets"][0] for _, _, v in entries), default=0),
                             dtype=torch.uint8)
        for begin, name, v in entries:
            end, dtype, shape = v["data_offsets"][1], DTYPE_OF_CODE.get(v["dtype"]), v["shape"]
            if dtype is None or not 0 <= begin <= end <= total or (end - begin) != math.prod(shape) * dtype.itemsize:
                raise PhemaError(f"{path}: tensor {name} is damaged ({v['dtype']} {shape} in bytes {begin}-{end})")
            f.seek(8 + size + begin)
            view = buffer[:end - begin]
            if f.readinto(view.numpy()) != end - begin:
                raise PhemaError(f"{path}: truncated in tensor {name}")
            yield name[len(prefix):], view.view(dtype).reshape(shape)


def run_snapshots(run_dir: str | Path) -> list[Path]:
    """The power-function EMA snapshots in a run directory: vcdm's network-snapshot-<kimg>-<std>.safetensors,
    or EDM2's raw snapshots <prefix>-<kimg>-<std>.pkl (not its reconstructions, phema-<kimg>-<std>.pkl)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PhemaError(f"--run: {run_dir} is not a directory")

    def edm2(name: str) -> bool:
        m = EDM2_SNAPSHOT_RE.fullmatch(name)
        return m is not None and m.group(1) != "phema"

    return sorted(p for p in run_dir.iterdir() if PROFILE_SNAPSHOT_RE.fullmatch(p.name) or edm2(p.name))


def open_input(path: str | Path) -> Input:
    """A vcdm snapshot, or an EDM2 raw snapshot (.pkl, read through the restricted unpickler, no code runs)."""
    if Path(path).suffix == ".pkl":
        return phema_input(path)
    return checkpoint_input(path)


NETWORK_IDENTITY = ("network", "net_kwargs", "denoiser", "structure", "embedder")


def open_inputs(paths: Sequence[str | Path], stds: Sequence[float] | None = None) -> list[Input]:
    """Open the inputs (only profiles of lengths `stds`, if given) and check that they are one network's."""
    inputs = [open_input(p) for p in paths]
    if stds is not None:
        inputs = [i for i in inputs if any(abs(i.snapshot.std - s) < 5e-4 for s in stds)]
    for other in inputs[1:]:
        for field in NETWORK_IDENTITY:
            if getattr(other.config, field) != getattr(inputs[0].config, field):
                raise PhemaError(f"{other.path}: its {field} differs from {inputs[0].path}'s; "
                                 "give snapshots of one run")
    return inputs


@dataclass
class ReconstructionPlan:
    """A reconstruction's inputs (those up to its time), its time, and the input whose config it keeps."""
    inputs: list[Input]
    nimg: int

    @property
    def snapshots(self) -> list[Snapshot]:
        return [i.snapshot for i in self.inputs]

    @property
    def newest(self) -> Input:
        return self.inputs[-1]


def plan(inputs: Sequence[Input], stds: Sequence[float], kimg: int | None = None) -> ReconstructionPlan:
    """What reconstructing lengths `stds` at the snapshots of `kimg` (default: the newest) reads."""
    for s in stds:
        std_to_gamma(s)
    nimg = None
    if kimg is not None:
        times = sorted({i.snapshot.nimg for i in inputs if i.snapshot.nimg // 1000 == kimg})
        if not times:
            known = sorted({i.snapshot.nimg // 1000 for i in inputs})
            raise PhemaError(f"--kimg {kimg}: no snapshot of that time; there are kimg {', '.join(map(str, known))}")
        nimg = times[-1]
    used, nimg = select([i.snapshot for i in inputs], nimg)
    by_snapshot = {id(i.snapshot): i for i in inputs}
    return ReconstructionPlan([by_snapshot[id(s)] for s in used], nimg)


def write(plan: ReconstructionPlan, stds: Sequence[float], outdir: Path, *, group: int = 8) -> Iterator[Path]:
    """Reconstruct and write each length as a vcdm checkpoint (atomically); yield each path once written."""
    config = plan.newest.config
    buffers = {name for name, _ in config.build_denoiser("meta").net.named_buffers()}
    extra = plan.newest.extra()
    for std, state in reconstruct(plan.snapshots, stds, plan.nimg, copied=buffers, group=group):
        path = outdir / output_name(plan.nimg, std)
        save_checkpoint(path, {"net": state, **extra}, output_config(config, std, plan.nimg, plan.snapshots))
        del state
        yield path


def output_config(config: CheckpointConfig, std: float, nimg: int, inputs: Sequence[Snapshot]) -> CheckpointConfig:
    """The checkpoint config of a reconstruction: the input's, with the reconstructed length and its inputs."""
    training = {k: v for k, v in config.training.items() if k != "ema_profile"}
    training.update(nimg=nimg, posthoc_ema={"std": std, "gamma": std_to_gamma(std),
                                            "inputs": [{"name": Path(s.name).name, "nimg": s.nimg, "std": s.std}
                                                       for s in inputs]})
    return replace(config, training=training)


def output_name(nimg: int, std: float) -> str:
    """EDM2's name for a reconstruction, with vcdm's six-digit kimg: phema-<kimg>-<std>.safetensors."""
    return f"phema-{nimg // 1000:06d}-{std:.3f}.safetensors"
