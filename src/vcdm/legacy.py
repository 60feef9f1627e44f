"""Import EDM's and the original VCDM release's network pickles without running anything from them.

What such a file holds (facts of the format, read off NVlabs/edm and torch's serialization code):

- A network pickle is ``pickle.dump`` of a dict: ``ema`` (the network), ``loss_fn``, ``augment_pipe``,
  ``dataset_kwargs``. The release's training-state files are ``torch.save`` zip archives with ``net``.
- EDM's classes are "persistent": an instance pickles as a call of
  ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` holds the defining
  module's *source code* (which the original loader executes), the class name and the instance state:
  its ``__dict__`` with ``_parameters`` / ``_buffers`` / ``_modules`` and the recorded constructor
  arguments ``_init_args`` / ``_init_kwargs``. Other classes (``torch.nn.ModuleDict``, the release's
  ``Structure`` and prior layers) are pickled by name and rebuilt from their ``__dict__``.
- A tensor pickles as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``. Under
  plain pickle the storage is ``torch.storage._load_from_bytes(blob)``, ``blob`` being torch's legacy
  serialization of that one storage; in a zip archive it is a persistent id naming ``data/<key>``.

Here every global a file names is looked up in an allow-list that maps it to *our* code: tensor
rebuilding from raw bytes, a few builtin containers, and :class:`Record`, an inert stand-in that only
keeps a class name and data. ``module_src`` is never executed (nor kept). Any other global is refused
before anything is called, and only Records accept state from the file (pickle's BUILD).
"""
from __future__ import annotations

import collections
import inspect
import io
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from vcdm.checkpoints import state_dict_mismatch
from vcdm.data.structure import DATA_CLASS_TENSORS, Structure

PathLike = str | os.PathLike


class LegacyError(ValueError):
    """A file that cannot be imported as an EDM/VCDM network."""


class UnsafePickleError(LegacyError):
    """The pickle names a global outside the allow-list (unpickling it could run code)."""


# ------------------------------------------------------------------------------------------------
# Inert stand-ins for what a pickle may construct.

class Record:
    """An object from the pickle, reduced to its class name and data; it has no behaviour.

    Subclasses stand in for classes a pickle names (``torch.nn.modules.container.ModuleDict``, …);
    a persistent EDM object becomes a Record carrying its recorded constructor arguments.
    """
    class_name = "?"

    def __new__(cls, *args, **kwargs):
        if args or kwargs:  # the pickle calls the class: that would run its constructor
            raise UnsafePickleError(f"the file calls '{cls.class_name}' with arguments; only rebuilding "
                                    "objects from their recorded state is allowed")
        self = super().__new__(cls)
        self.state, self.init_args, self.init_kwargs = {}, (), {}
        return self

    def __setstate__(self, state: Any) -> None:  # pickle's BUILD
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise LegacyError(f"state of '{self.class_name}' is a {type(state).__name__}, expected a dict")
        self.state = state

    def __repr__(self) -> str:
        return f"Record({self.class_name})"


_RECORD_CLASSES: dict[str, type[Record]] = {}


def _record_class(qualname: str) -> type[Record]:
    if qualname not in _RECORD_CLASSES:
        _RECORD_CLASSES[qualname] = type(qualname.rsplit(".", 1)[-1], (Record,), {"class_name": qualname})
    return _RECORD_CLASSES[qualname]


def _persistent_record(meta: Any) -> Record:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: keeps class name and state;
    the module source in ``meta`` is dropped unread."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise LegacyError("malformed persistent-object record (expected type 'class' and a class_name)")
    cls = _record_class(meta["class_name"])
    rec = cls.__new__(cls)
    rec.__setstate__(meta.get("state") or {})
    rec.init_args = tuple(rec.state.get("_init_args") or ())
    rec.init_kwargs = dict(rec.state.get("_init_kwargs") or {})
    return rec


def _reconstructor(cls: Any, base: Any, state: Any) -> Record:
    """Stand-in for ``copyreg._reconstructor`` (protocol 0/1 pickles of plain classes)."""
    if not (isinstance(cls, type) and issubclass(cls, Record)) or base is not object or state is not None:
        raise UnsafePickleError("copyreg._reconstructor used on something other than an allowed class")
    return cls.__new__(cls)


class _EasyDict(dict):
    """dnnlib.util.EasyDict, as a plain dict."""


# ------------------------------------------------------------------------------------------------
# Storages and tensors, rebuilt from raw bytes.

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in set(_STORAGE_DTYPES.values())}
TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first object of torch's legacy (non-zip) serialization
TORCH_PROTOCOL = 1001


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> torch.dtype:
        return _STORAGE_DTYPES[self.name]


class _Storage:
    """One storage's bytes (filled possibly after tensors viewing it were built) and its saved dtype."""

    def __init__(self, dtype: torch.dtype, numel: int):
        if not isinstance(numel, int) or numel < 0:
            raise LegacyError(f"bad storage size {numel!r}")
        self.dtype = dtype
        self.nbytes = numel * _itemsize(dtype)
        self.data = torch.empty(self.nbytes, dtype=torch.uint8)

    def fill(self, raw: bytes) -> None:
        if len(raw) != self.nbytes:
            raise LegacyError(f"storage data has {len(raw)} bytes, expected {self.nbytes} (file truncated?)")
        self.data.numpy()[:] = np.frombuffer(raw, dtype=np.uint8)

    def tensor(self, offset: int, size: Any, stride: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        size, stride = tuple(size), tuple(stride)
        if not all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride)) or len(size) != len(stride):
            raise LegacyError(f"bad tensor geometry: offset {offset!r}, size {size!r}, stride {stride!r}")
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
        if end * _itemsize(dtype) > self.nbytes:
            raise LegacyError(f"tensor of size {size} reaches past the end of its storage")
        return torch.empty(0, dtype=dtype).set_(self.data.untyped_storage(), offset, size, stride)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise LegacyError(f"tensor rebuilt from a {type(storage).__name__}, expected a storage")
    return storage.tensor(offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if metadata:  # conj/neg bits: never set on network weights
        raise LegacyError(f"tensor carries unsupported metadata {metadata!r}")
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(storage, _Storage) or not isinstance(dtype, torch.dtype) or metadata:
        raise LegacyError("malformed tensor record (_rebuild_tensor_v3)")
    return storage.tensor(offset, size, stride, dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None, state: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise LegacyError(f"parameter rebuilt from a {type(data).__name__}, expected a tensor")
    return data


def _storage_from_bytes(blob: Any) -> _Storage:
    """Stand-in for ``torch.storage._load_from_bytes``: the blob is one storage in torch's format."""
    if not isinstance(blob, (bytes, bytearray)):
        raise LegacyError("storage blob is not bytes")
    f = io.BytesIO(blob)
    obj = _read_torch_stream(f, _unpickle(f))
    if not isinstance(obj, _Storage):
        raise LegacyError(f"embedded storage blob holds a {type(obj).__name__}, expected a storage")
    return obj


# ------------------------------------------------------------------------------------------------
# numpy scalars and arrays (EDM records e.g. ``skip_scale=np.sqrt(0.5)`` among constructor kwargs).

_NUMPY_DTYPE = re.compile(r"[<>=|]?[biufc]\d{1,2}")


class _NDArrayType:
    """Stand-in for the class ``numpy.ndarray`` (only ever passed to ``_reconstruct``)."""


class _NumpyDType(Record):
    """A numeric numpy dtype: its type code, and the byte order its pickled state gives."""
    class_name = "numpy.dtype"

    def __setstate__(self, state: Any) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "="
        self.dtype = self.dtype.newbyteorder(order) if order in ("<", ">") else self.dtype


class _NDArray(Record):
    class_name = "numpy.ndarray"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise LegacyError("malformed numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        if not isinstance(dtype, _NumpyDType) or not isinstance(raw, (bytes, bytearray)):
            raise LegacyError("numpy array of objects or without raw data is not allowed")
        self.array = np.frombuffer(bytes(raw), dtype=dtype.dtype).reshape(shape, order="F" if fortran else "C").copy()


def _np_dtype(code: Any, align: Any = False, copy: Any = False) -> _NumpyDType:
    if not isinstance(code, str) or not _NUMPY_DTYPE.fullmatch(code):
        raise UnsafePickleError(f"numpy dtype {code!r} is not a plain numeric type")
    rec = _NumpyDType.__new__(_NumpyDType)
    rec.dtype = np.dtype(code)
    return rec


def _np_scalar(dtype: Any, raw: Any = None) -> int | float | complex | bool:
    if not isinstance(dtype, _NumpyDType) or not isinstance(raw, (bytes, bytearray)):
        raise UnsafePickleError("numpy scalar of a non-numeric type")
    return np.frombuffer(bytes(raw), dtype=dtype.dtype, count=1)[0].item()


def _np_reconstruct(cls: Any, shape: Any, typecode: Any) -> _NDArray:
    if cls is not _NDArrayType:
        raise UnsafePickleError("numpy _reconstruct of a class other than ndarray")
    return _NDArray.__new__(_NDArray)


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:  # how protocol-2 pickles spell bytes
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode used for something other than bytes")
    return text.encode("latin1")


# ------------------------------------------------------------------------------------------------
# The restricted unpickler.

_ALLOWED: dict[str, Any] = {
    "torch_utils.persistence._reconstruct_persistent_obj": _persistent_record,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.storage._load_from_bytes": _storage_from_bytes,
    "torch.Size": torch.Size,
    "collections.OrderedDict": collections.OrderedDict,
    "copyreg._reconstructor": _reconstructor,
    "builtins.object": object,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.complex": complex,
    "builtins.bytearray": bytearray,
    "_codecs.encode": _latin1,
    "dnnlib.util.EasyDict": _EasyDict,
    "numpy.dtype": _np_dtype,
    "numpy.ndarray": _NDArrayType,
    "numpy.core.multiarray.scalar": _np_scalar,
    "numpy._core.multiarray.scalar": _np_scalar,
    "numpy.core.multiarray._reconstruct": _np_reconstruct,
    "numpy._core.multiarray._reconstruct": _np_reconstruct,
}
# Classes pickled by name whose instances become inert Records: torch's standard layers and
# containers, and the data/layer classes of EDM's and the release's `training` package (incl. the
# prior's einops / rotary-embedding layers). Only their recorded __dict__ is kept.
_RECORD_PREFIXES = ("torch.nn.modules.", "training.", "einops.layers.", "rotary_embedding_torch.")
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _resolve_global(module: str, name: str) -> Any:
    module = _PY2_MODULES.get(module, module)
    qualname = f"{module}.{name}"
    if qualname in _ALLOWED:
        return _ALLOWED[qualname]
    if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
        return _StorageType(name)
    if module == "torch" and name in _TORCH_DTYPES:
        return _TORCH_DTYPES[name]
    if module.startswith(_RECORD_PREFIXES) and name.isidentifier():
        return _record_class(qualname)
    raise UnsafePickleError(f"refused to unpickle: the file references '{qualname}', which is not a tensor "
                            "or data constructor vcdm allows (loading it could run code)")


class _SafeUnpickler(pickle._Unpickler):
    """Python's own unpickler (the pure-Python one, whose opcodes can be overridden) with globals
    resolved through the allow-list and state (BUILD) given only to Records: a tensor or container
    never runs its __setstate__ on data from the file."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, persistent: Callable[[Any], Any] | None = None):
        super().__init__(file)
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        return _resolve_global(module, name)

    def load_build(self) -> None:
        state, inst = self.stack.pop(), self.stack[-1]
        if isinstance(inst, Record):
            inst.__setstate__(state)
        elif state:
            raise UnsafePickleError(f"the file sets the state of a {type(inst).__name__}; only recorded objects "
                                    "take state")
    dispatch[pickle.BUILD[0]] = load_build

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise LegacyError(f"unexpected persistent id {str(pid)[:60]!r} in a plain pickle")
        return self._persistent(pid)


def _unpickle(f: Any, persistent: Callable[[Any], Any] | None = None) -> Any:
    return _SafeUnpickler(f, persistent).load()


def _read_torch_stream(f: Any, magic: Any) -> Any:
    """torch's legacy format after its first object, ``magic``: protocol, sys info, the object (storages
    as persistent ids), the list of storage keys, then per storage an int64 element count and the bytes."""
    if not (type(magic) is int and magic == TORCH_MAGIC):
        raise LegacyError("not torch's serialization format (bad magic number)")
    if _unpickle(f) != TORCH_PROTOCOL:
        raise LegacyError("unsupported torch serialization protocol")
    info = _unpickle(f)
    if not isinstance(info, dict) or not info.get("little_endian", False):
        raise LegacyError("big-endian torch files are not supported")
    storages: dict[str, _Storage] = {}

    def persistent(pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "module":  # a class saved with its source: name only
            return pid[1]
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise LegacyError(f"unexpected persistent id {str(pid)[:60]!r}")
        _, stype, key, _location, numel, view = pid
        if view is not None:
            raise LegacyError("storage views (files of torch before 1.0) are not supported")
        if key not in storages:
            storages[key] = _Storage(stype.dtype, numel)
        return storages[key]

    obj = _unpickle(f, persistent)
    keys = _unpickle(f)
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise LegacyError("storage key list does not match the storages the object uses")
    for key in keys:
        count = f.read(8)
        if len(count) != 8:
            raise LegacyError("file ends before the storage data (truncated?)")
        storage = storages[key]
        if struct.unpack("<q", count)[0] * _itemsize(storage.dtype) != storage.nbytes:
            raise LegacyError(f"storage {key}: recorded size differs from its header")
        storage.fill(f.read(storage.nbytes))
    return obj


def _read_torch_zip(f: Any) -> Any:
    """torch.save's zip format: <root>/data.pkl with storages as persistent ids of <root>/data/<key>."""
    with zipfile.ZipFile(f) as zf:
        pkls = sorted((n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
        if not pkls:
            raise LegacyError("zip archive without data.pkl (not a torch.save file)")
        root = pkls[0][:-len("data.pkl")]
        if f"{root}byteorder" in zf.namelist() and zf.read(f"{root}byteorder") != b"little":
            raise LegacyError("big-endian torch files are not supported")
        storages: dict[str, _Storage] = {}

        def persistent(pid: Any) -> _Storage:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                    and isinstance(pid[1], _StorageType)):
                raise LegacyError(f"unexpected persistent id {str(pid)[:60]!r}")
            _, stype, key, _location, numel = pid
            if key not in storages:
                storage = _Storage(stype.dtype, numel)
                try:
                    storage.fill(zf.read(f"{root}data/{key}"))
                except KeyError:
                    raise LegacyError(f"storage data/{key} missing from the archive") from None
                storages[key] = storage
            return storages[key]

        with zf.open(pkls[0]) as data:
            return _unpickle(data, persistent)


def read_pickle(path: PathLike) -> Any:
    """Unpickle an EDM/VCDM file (plain pickle, torch legacy or torch zip) into plain containers,
    tensors and :class:`Record` stand-ins, executing nothing from it."""
    path = Path(path)
    if not path.is_file():
        raise LegacyError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                f.seek(0)
                return _read_torch_zip(f)
            f.seek(0)
            first = _unpickle(f)
            if type(first) is int and first == TORCH_MAGIC:
                return _read_torch_stream(f, first)
            return first
    except LegacyError as e:
        raise type(e)(f"{path}: {e}") from None
    except Exception as e:  # anything else means damaged input: report it on one line
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LegacyError(f"{path}: not a readable network pickle (truncated or damaged?): {detail}") from None


# ------------------------------------------------------------------------------------------------
# From the object tree to a network description.

PRECOND_KINDS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
# Network classes of EDM and of the release, and the vcdm class with EDM's parameter layout.
NET_CLASSES = {"SongUNet": "SongUNet", "DhariwalUNet": "DhariwalUNet", "OriginalSongUNet": "SongUNet",
               "WrappedOriginalSongUNet": "SongUNet", "WrappedDhariwalUNet": "DhariwalUNet"}
# The release's dataset class names → vcdm's (DATA_CLASS_TENSORS); its labelled-CLIP class is built by a
# factory and pickled under the factory's local name.
_SEED_DATA_CLASSES = {"ImageFolderDataset": "ImageFolderDataset", "LabelledImageDataset": "ImageFolderDataset",
                      "CLIPDataset": "CLIPDataset", "LabelledCLIPDataset": "LabelledCLIPDataset",
                      "NewClass": "LabelledCLIPDataset"}
_IGNORED_KWARGS = {"softmax_onehot": False, "emb_layer_type": None}  # the release's, at their no-op values


@dataclass
class LegacyNetwork:
    """What an EDM/VCDM pickle records about its network: the preconditioner and the inner model."""
    path: str
    release: str                      # 'edm' or 'vcdm' (the original VCDM release)
    precond_class: str                # EDMPrecond | VPPrecond | VEPrecond | …
    precond_kwargs: dict              # recorded constructor kwargs (plain values)
    precond_attrs: dict               # plain attributes (sigma_min, sigma_max, sigma_data, …)
    net_class: str                    # SongUNet | DhariwalUNet | the release's wrappers | DALLE2CLIPModel …
    net_kwargs: dict                  # recorded constructor kwargs of the inner model (plain values)
    state_dict: dict[str, torch.Tensor]
    parameter_names: frozenset = field(default_factory=frozenset)
    dataset_kwargs: dict | None = None
    structure: dict | None = None     # the release's recorded Structure (names, shapes, exist, observed)

    @property
    def kind(self) -> str | None:
        return PRECOND_KINDS.get(self.precond_class)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for k, t in self.state_dict.items() if k in self.parameter_names)


def _plain(value: Any) -> Any:
    """Records and numpy/torch containers → JSON-like Python values."""
    if isinstance(value, _NDArray):
        return value.array.tolist()
    if isinstance(value, Record):
        return {"__class__": value.class_name, **{k: _plain(v) for k, v in value.state.items()}}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 16 else f"<tensor {tuple(value.shape)}>"
    return value


def _module_tensors(rec: Record, prefix: str, out: dict, params: set) -> None:
    """Walk a recorded module tree into state-dict entries (persistent buffers only, as state_dict)."""
    state = rec.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if t is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(t, torch.Tensor):
                raise LegacyError(f"{prefix}{name} of {rec.class_name} is a {type(t).__name__}, expected a tensor")
            out[prefix + name] = t
            if group == "_parameters":
                params.add(prefix + name)
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, Record):
            raise LegacyError(f"submodule {prefix}{name} is a {type(child).__name__}, expected a module record")
        _module_tensors(child, f"{prefix}{name}.", out, params)


def _select_network(obj: Any) -> Record:
    if isinstance(obj, Record):
        return obj
    if isinstance(obj, dict):
        for key in ("ema", "net"):
            if isinstance(obj.get(key), Record):
                return obj[key]
        raise LegacyError(f"no network in the pickle (expected key 'ema' or 'net'; found {sorted(map(str, obj))})")
    raise LegacyError(f"the pickle holds a {type(obj).__name__}, expected EDM's dict with a network under 'ema'")


def load_legacy_pickle(path: PathLike) -> LegacyNetwork:
    """Read an EDM network pickle (``edm-*.pkl``) or a snapshot/training state of the VCDM release."""
    obj = read_pickle(path)
    precond = _select_network(obj)
    modules = precond.state.get("_modules")
    model = modules.get("model") if isinstance(modules, dict) else None
    if not isinstance(model, Record):
        raise LegacyError(f"{path}: {precond.class_name} has no inner network 'model' (not an EDM preconditioner)")
    state: dict[str, torch.Tensor] = {}
    params: set[str] = set()
    _module_tensors(model, "", state, params)
    kwargs = dict(precond.init_kwargs)
    seed_structure = kwargs.get("structure")
    attrs = {k: _plain(v) for k, v in precond.state.items()
             if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, type(None)))}
    dataset_kwargs = obj.get("dataset_kwargs") if isinstance(obj, dict) else None
    return LegacyNetwork(
        path=str(path), release="vcdm" if isinstance(seed_structure, Record) else "edm",
        precond_class=precond.class_name, precond_kwargs={k: _plain(v) for k, v in kwargs.items() if k != "structure"},
        precond_attrs=attrs, net_class=model.class_name,
        net_kwargs={k: _plain(v) for k, v in model.init_kwargs.items() if k != "structure"},
        state_dict=state, parameter_names=frozenset(params),
        dataset_kwargs=_plain(dataset_kwargs) if isinstance(dataset_kwargs, dict) else None,
        structure=_plain(seed_structure.state) if isinstance(seed_structure, Record) else None)


def _seed_structure(record: LegacyNetwork) -> Structure:
    """The release's Structure (names/shapes/observed of *existing* tensors, exist over all) in vcdm's terms."""
    s = record.structure or {}
    try:
        exist = [int(e) for e in s["exist"]]
        names, shapes, observed = list(s["names"]), [tuple(sh) for sh in s["shapes"]], [int(o) for o in s["observed"]]
    except (KeyError, TypeError, ValueError):
        raise LegacyError(f"{record.path}: the release's recorded structure is incomplete") from None
    data_class = str((record.dataset_kwargs or {}).get("class_name", "")).rsplit(".", 1)[-1]
    all_names = DATA_CLASS_TENSORS.get(_SEED_DATA_CLASSES.get(data_class, ""), ())
    if len(all_names) != len(exist) or [n for n, e in zip(all_names, exist) if e] != names:
        all_names, exist = tuple(names), [1] * len(names)  # unknown data class: keep the existing tensors only
    known = dict(zip(names, zip(shapes, observed)))
    return Structure(tuple(all_names), tuple(known.get(n, ((0,), 0))[0] for n in all_names),
                     tuple(bool(e) for e in exist), tuple(bool(known.get(n, ((0,), 0))[1]) for n in all_names))


def _network_kwargs(record: LegacyNetwork) -> tuple[str, dict]:
    """vcdm network class and constructor kwargs (EDM's names) for the recorded inner model."""
    from vcdm.nets import network_classes

    cls = NET_CLASSES.get(record.net_class)
    if cls is None:
        hint = (" (the release's DALL-E-2 prior has another parameter layout than vcdm's PriorTransformer; "
                "the release published no trained priors — retrain with `vcdm train --arch dalle2`)"
                if record.net_class == "DALLE2CLIPModel" else "")
        raise LegacyError(f"{record.path}: network class '{record.net_class}' has no vcdm equivalent "
                          f"(supported: {', '.join(sorted(NET_CLASSES))}){hint}")
    kwargs = dict(record.net_kwargs)
    for key, default in _IGNORED_KWARGS.items():
        value = kwargs.pop(key, default)
        if value != default:
            raise LegacyError(f"{record.path}: {record.net_class} was built with {key}={value!r}, "
                              "which vcdm does not implement")
    if record.release == "vcdm":  # the release's wrappers derive the image geometry from the structure
        img = tuple((record.structure or {}).get("shapes", [()])[0])
        if len(img) != 3:
            raise LegacyError(f"{record.path}: first tensor of the recorded structure is not an image: {img}")
        label = record.state_dict.get("map_label.weight")
        kwargs.update(img_resolution=img[-1], in_channels=img[0], out_channels=img[0],
                      label_dim=0 if label is None else int(label.shape[1]))
    known = inspect.signature(network_classes()[cls]).parameters
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise LegacyError(f"{record.path}: {record.net_class} records constructor arguments vcdm's {cls} "
                          f"does not take: {', '.join(unknown)}")
    # EDM records only the arguments it was given; write the defaults out so the checkpoint is explicit.
    defaults = {k: _plain(p.default) for k, p in known.items() if p.default is not inspect.Parameter.empty}
    return cls, {**defaults, **kwargs}


def _denoiser_config(record: LegacyNetwork) -> dict:
    kind = record.kind
    if kind is None:
        raise LegacyError(f"{record.path}: preconditioner '{record.precond_class}' is not supported "
                          f"(supported: {', '.join(PRECOND_KINDS)})")
    a, kw = record.precond_attrs, record.precond_kwargs
    cfg: dict[str, Any] = {"kind": kind}
    if kind == "edm":
        cfg["sigma_data"] = float(a.get("sigma_data", kw.get("sigma_data", 0.5)))
        lo, hi = float(a.get("sigma_min", 0)), float(a.get("sigma_max", math.inf))
        cfg.update(sigma_min=lo if lo > 0 else None, sigma_max=hi if math.isfinite(hi) else None)
    elif kind == "ve":
        cfg.update(sigma_min=float(a.get("sigma_min", 0.02)), sigma_max=float(a.get("sigma_max", 100.0)))
    else:
        for name, default in (("beta_d", 19.9), ("beta_min", 0.1), ("M", 1000), ("epsilon_t", 1e-5)):
            cfg[name] = type(default)(a.get(name, kw.get(name, default)))
    for name in ("noise_mult", "pred_x0"):  # the release's per-tensor options, indexed by data tensor
        if kw.get(name) is not None:
            cfg[name] = kw[name] if isinstance(kw[name], list) else [kw[name]]
    return cfg


def _default_structure(record: LegacyNetwork, image: tuple[int, ...], label_dim: int) -> Structure:
    if record.release == "vcdm":
        return _seed_structure(record)
    # An EDM network is an image model over ImageFolderDataset's (image, label); it observes the
    # label when it is class-conditional. An unconditional model records label_dim 0: shape (0,).
    shapes = {"image": image, "label": (label_dim,)}
    return Structure.from_flags(shapes, "1,1" if label_dim else "1,0", "0,1" if label_dim else "0,0")


def to_vcdm(record: LegacyNetwork, *, label_dim: int | None = None,
            structure: Structure | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """vcdm checkpoint config and network state dict for a legacy network.

    ``structure`` records what the model generates/observes (default: EDM's image-only structure, or
    the release's recorded one); ``label_dim`` (default: the structure's observed dimension, else the
    recorded one) re-targets an unconditional network to a conditioning vector, adding ``map_label``
    initialised to zero so the imported network computes exactly what it did.
    """
    from vcdm.nets import build_network
    from vcdm.nets.precond import Denoiser

    cls, kwargs = _network_kwargs(record)
    denoiser_cfg = _denoiser_config(record)
    recorded = int(kwargs.get("label_dim", 0))
    if label_dim is None:
        label_dim = structure.observed_dim if structure is not None else recorded
    if label_dim != recorded:
        if recorded:
            raise LegacyError(f"{record.path}: the network is conditioned on {recorded}-d labels; re-targeting it "
                              f"to {label_dim}-d conditioning is not supported")
        kwargs["label_dim"] = label_dim
    image = (kwargs["in_channels"], kwargs["img_resolution"], kwargs["img_resolution"])
    if structure is None:
        structure = _default_structure(record, image, label_dim)
        seed_exist = (record.structure or {}).get("exist") or []
        for name in ("noise_mult", "pred_x0"):  # the release indexes these over all data tensors
            values = denoiser_cfg.get(name)
            if values is not None and len(values) == len(seed_exist) != len(structure.names):
                denoiser_cfg[name] = [v for v, e in zip(values, seed_exist) if e]
    latent = [structure.shape(n) for n in structure.latent_names]
    if latent != [image] or structure.observed_dim != label_dim:
        raise LegacyError(f"{record.path}: the structure (latent {dict(zip(structure.latent_names, latent))}, observed "
                          f"dim {structure.observed_dim}) does not fit an image network of {image} with "
                          f"{label_dim}-d conditioning")
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            net = build_network(cls, kwargs)
        denoiser = Denoiser(net, structure, **denoiser_cfg)
    except (TypeError, ValueError) as e:
        raise LegacyError(f"{record.path}: recorded settings do not build a vcdm network: {e}") from None
    expected = denoiser.net.state_dict()
    state = {k: v.detach() for k, v in record.state_dict.items()}
    for key in expected:
        if key.startswith("map_label.") and key not in state and not recorded:
            state[key] = torch.zeros(expected[key].shape, dtype=torch.float32)
    problem = state_dict_mismatch(expected, state)
    if problem:
        raise LegacyError(f"{record.path}: weights do not match vcdm's {cls}: {problem}")
    data_class = next((k for k, names in DATA_CLASS_TENSORS.items() if names == structure.names), None)
    config = {
        "network": {"class": cls, "kwargs": kwargs},
        "denoiser": denoiser.config(),
        "structure": structure.to_dict(),
        "embedder": None,
        "data": {"data_class": data_class, "path": (record.dataset_kwargs or {}).get("path"),
                 "resolution": kwargs["img_resolution"], "label_dim": label_dim},
        "training": {},
        "imported_from": {"file": Path(record.path).name, "release": record.release, "precond": record.precond_class,
                          "network": record.net_class, "use_fp16": bool(record.precond_kwargs.get("use_fp16", False))},
    }
    return config, state


def import_edm(src: PathLike, dest: PathLike, *, label_dim: int | None = None,
               structure: Structure | None = None) -> tuple[LegacyNetwork, dict]:
    """Convert an EDM/VCDM pickle into a vcdm checkpoint (written atomically). Returns what was read
    and the config written."""
    from vcdm.checkpoints import save_checkpoint

    record = load_legacy_pickle(src)
    config, state = to_vcdm(record, label_dim=label_dim, structure=structure)
    save_checkpoint(dest, {"net": state}, config)
    return record, config


# ------------------------------------------------------------------------------------------------
# Initialising a training network from pretrained weights (--pretrained_weights / --transfer).

@dataclass
class PretrainedReport:
    source: str
    copied: list[str]
    zero_init: list[str]              # tensors the source lacks (map_label): set to zero
    frozen: int = 0                   # number of parameter values with requires_grad False
    trainable: int = 0

    def __str__(self) -> str:
        s = f"loaded {len(self.copied)} tensors from {self.source}"
        if self.zero_init:
            s += f"; zero-initialised new {', '.join(self.zero_init)}"
        if self.frozen:
            s += f"; froze {self.frozen:,} parameters, {self.trainable:,} trainable"
        return s


def _source_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from vcdm.checkpoints import CheckpointError, load_tensors, read_config

        try:
            read_config(path)
            return load_tensors(path).get("net", {})
        except CheckpointError as e:
            raise LegacyError(str(e)) from None
    record = load_legacy_pickle(path)
    _network_kwargs(record)  # refuses networks without a vcdm equivalent, with the reason
    return record.state_dict


def load_pretrained(path: PathLike, target_net: nn.Module, *, freeze: bool = False) -> PretrainedReport:
    """Copy a pretrained network's weights (EDM/VCDM .pkl or vcdm .safetensors) into ``target_net``.

    Tensors must match by name and shape, except ``map_label.*`` which an unconditional source lacks:
    those start at zero, so the network initially ignores its new conditioning input. With
    ``freeze``, only those new parameters stay trainable (the release's --freeze_pretrained).
    """
    from vcdm.nets.precond import Denoiser

    path = Path(path)
    net = target_net.net if isinstance(target_net, Denoiser) else target_net
    source = _source_state(path)
    target = net.state_dict()
    new = sorted(k for k in target if k not in source and k.startswith("map_label."))
    new_state = {**source, **{k: torch.zeros_like(target[k]) for k in new}}
    problem = state_dict_mismatch(target, new_state)
    if problem:
        raise LegacyError(f"{path}: weights do not fit the network: {problem}")
    net.load_state_dict(new_state)
    report = PretrainedReport(str(path), sorted(source), new)
    if freeze:
        for name, p in net.named_parameters():
            p.requires_grad_(name in new)
            if name in new:
                report.trainable += p.numel()
            else:
                report.frozen += p.numel()
    return report
