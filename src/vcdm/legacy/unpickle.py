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

This is vcdm's one restricted unpickler: CIFAR-10's batches (vcdm.data.dataset_tool) and OpenAI's
TorchScript CLIP archive (vcdm.embedders.clip) are read through it too, each with its own
:class:`AllowList`, under the same memory and nesting bounds.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from vcdm.legacy.limits import (ITEM_BYTES, ZIP_MEMBER_FACTOR, ZIPINFO_BYTES, BoundedReader, NestingTracker,
                                budgeted, charge, check_nesting, current_budget, file_budget, zip_entry_count)
from vcdm.legacy.records import (LegacyError, Record, UnsafePickleError, _bytearray, _EasyDict, _NDArrayType,
                                 _latin1, _np_dtype, _np_reconstruct, _np_scalar, _persistent_record,
                                 _reconstructor, _record_class)

PathLike = str | os.PathLike


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
        current_budget().take(self.nbytes, f"a storage of {numel:,} elements")
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
    f = BoundedReader(io.BytesIO(blob), len(blob), "storage blob")
    obj = _read_torch_stream(f, _unpickle(f))
    if not isinstance(obj, _Storage):
        raise LegacyError(f"embedded storage blob holds a {type(obj).__name__}, expected a storage")
    return obj


# ------------------------------------------------------------------------------------------------
# The restricted unpickler and the allow-lists it is used with.

TENSOR_GLOBALS: dict[str, Any] = {  # how torch pickles tensors, parameters and their containers
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.Size": torch.Size,
    "collections.OrderedDict": collections.OrderedDict,
}
NUMPY_GLOBALS: dict[str, Any] = {  # numeric numpy arrays, scalars and dtypes; bytes as protocol 2 spells them
    "numpy.dtype": _np_dtype,
    "numpy.ndarray": _NDArrayType,
    "numpy.core.multiarray.scalar": _np_scalar,
    "numpy._core.multiarray.scalar": _np_scalar,
    "numpy.core.multiarray._reconstruct": _np_reconstruct,
    "numpy._core.multiarray._reconstruct": _np_reconstruct,
    "_codecs.encode": _latin1,
}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


@dataclass(frozen=True)
class AllowList:
    """The globals one kind of file may name. ``names`` maps each qualified name to what stands in for it;
    a class of a module under ``record_prefixes`` becomes an inert :class:`Record`; ``tensors`` admits
    torch's storage types and dtypes. ``kind`` names such a file in refusals."""
    kind: str
    names: Mapping[str, Any]
    record_prefixes: tuple[str, ...] = ()
    tensors: bool = False

    def resolve(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        qualname = f"{module}.{name}"
        if qualname in self.names:
            return self.names[qualname]
        if self.tensors and module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if self.tensors and module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        if self.record_prefixes and module.startswith(self.record_prefixes) and name.isidentifier():
            return _record_class(qualname)
        raise UnsafePickleError(f"refused to unpickle: the file references '{qualname}', which {self.kind} does "
                                "not need (loading it could run code)")


# EDM's, EDM2's and the release's network pickles. Classes pickled by name whose instances become inert
# Records: torch's standard layers and containers, and the data/layer classes of EDM's and the release's
# `training` package (incl. the prior's einops / rotary-embedding layers). Only their recorded __dict__ is kept.
NETWORK_PICKLE = AllowList("a network pickle", {
    **TENSOR_GLOBALS, **NUMPY_GLOBALS,
    "torch_utils.persistence._reconstruct_persistent_obj": _persistent_record,
    "torch.storage._load_from_bytes": _storage_from_bytes,
    "copyreg._reconstructor": _reconstructor,
    "builtins.object": object,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.complex": complex,
    "builtins.bytearray": _bytearray,
    "dnnlib.util.EasyDict": _EasyDict,
    "einops.einops.TransformRecipe": _record_class("einops.einops.TransformRecipe"),  # in the prior's Rearranges
}, record_prefixes=("torch.nn.modules.", "training.", "einops.layers.", "rotary_embedding_torch."), tensors=True)


def _script_value(value: Any, *_type_tag: Any) -> Any:
    """Stand-in for ``torch.jit._pickle.build_*list`` and ``restore_type_tag``: the value as pickled."""
    return value


# OpenAI's TorchScript CLIP archive (vcdm.embedders.clip): its modules become Records holding their
# attributes; lists and type tags are kept as pickled.
TORCHSCRIPT_ARCHIVE = AllowList("a TorchScript archive", {
    **TENSOR_GLOBALS,
    **{f"torch.jit._pickle.{name}": _script_value
       for name in ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag")},
}, record_prefixes=("__torch__",), tensors=True)
# CIFAR-10's python batches (vcdm.data.dataset_tool): dicts, lists, strings and numeric numpy arrays.
CIFAR_BATCH = AllowList("a CIFAR-10 batch", NUMPY_GLOBALS)

class _Dispatch(dict):
    """Opcode handlers; a byte that is no opcode is reported as such (not as a KeyError's number)."""

    def __missing__(self, code: int) -> Any:
        raise pickle.UnpicklingError(f"invalid pickle opcode {bytes([code])!r}")


def _charged(handler: Callable[[Any], None]) -> Callable[[Any], None]:
    """An opcode handler that first charges one object to the budget: a file of one-byte opcodes
    (``]`` is an empty list of 56 bytes) cannot build objects of ~60 times its size."""
    def charged(self: Any) -> None:
        self._budget.take(ITEM_BYTES, "objects the pickle builds")
        handler(self)
    return charged


def _tracked(stock: Callable[[Any], None]) -> Callable[[Any], None]:
    """An opcode handler that runs ``stock`` (which builds a tuple or frozenset) and tracks its nesting."""
    def handler(self: Any) -> None:
        stock(self)
        self._nesting.track(self.stack[-1])
    return handler


class _SafeUnpickler(pickle._Unpickler):
    """Python's own unpickler (the pure-Python one, whose opcodes can be overridden) with globals
    resolved through the allow-list and state (BUILD) given only to Records: a tensor or container
    never runs its __setstate__ on data from the file. Whatever a call or BUILD may copy is charged
    to the read's budget, and the nesting of hashable containers is tracked (see vcdm.legacy.limits)."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, allowed: AllowList, persistent: Callable[[Any], Any] | None = None,
                 encoding: str = "ASCII"):
        super().__init__(file, encoding=encoding)
        self._allowed, self._persistent = allowed, persistent
        self._budget = current_budget()
        self._nesting = NestingTracker(self._budget)

    def find_class(self, module: str, name: str) -> Any:
        return self._allowed.resolve(module, name)

    def load_reduce(self) -> None:
        charge(self._budget, self.stack[-1])
        pickle._Unpickler.load_reduce(self)
        self._nesting.track(self.stack[-1])
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self) -> None:
        charge(self._budget, self.stack[-1])
        pickle._Unpickler.load_newobj(self)
        self._nesting.track(self.stack[-1])
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        charge(self._budget, self.stack[-2:])
        pickle._Unpickler.load_newobj_ex(self)
        self._nesting.track(self.stack[-1])
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass: Any, args: Any) -> None:  # OBJ and INST
        charge(self._budget, args)
        super()._instantiate(klass, args)
        self._nesting.track(self.stack[-1])

    for _op in (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.FROZENSET):
        dispatch[_op[0]] = _tracked(pickle._Unpickler.dispatch[_op[0]])
    del _op

    def load_bytearray8(self) -> None:
        size, = struct.unpack("<Q", self.read(8))
        self.append(bytearray(self.read(size)))  # the reader refuses lengths past the end of the data
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def load_build(self) -> None:
        charge(self._budget, self.stack[-1])
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

    dispatch = _Dispatch({code: _charged(handler) for code, handler in dispatch.items()})


def _unpickle(f: Any, persistent: Callable[[Any], Any] | None = None, allowed: AllowList = NETWORK_PICKLE) -> Any:
    return _SafeUnpickler(f, allowed, persistent).load()


def unpickle(f: Any, size: int, allowed: AllowList, *, encoding: str = "ASCII") -> Any:
    """Unpickle one plain pickle of at most ``size`` bytes from ``f``, naming only ``allowed``'s globals,
    under a memory budget of twice ``size`` (see vcdm.legacy.limits). ``encoding`` decodes Python 2
    strings ('latin1' hands their bytes to numpy unchanged)."""
    with budgeted(file_budget(size)):
        obj = _SafeUnpickler(BoundedReader(f, size), allowed, encoding=encoding).load()
    check_nesting(obj)
    return obj


def _read_torch_stream(f: Any, magic: Any, allowed: AllowList = NETWORK_PICKLE) -> Any:
    """torch's legacy format after its first object, ``magic``: protocol, sys info, the object (storages
    as persistent ids), the list of storage keys, then per storage an int64 element count and the bytes."""
    if not (type(magic) is int and magic == TORCH_MAGIC):
        raise LegacyError("not torch's serialization format (bad magic number)")
    if _unpickle(f, None, allowed) != TORCH_PROTOCOL:
        raise LegacyError("unsupported torch serialization protocol")
    info = _unpickle(f, None, allowed)
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

    obj = _unpickle(f, persistent, allowed)
    keys = _unpickle(f, None, allowed)
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


def _zip_member(zf: zipfile.ZipFile, name: str, limit: int) -> zipfile.ZipInfo:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise LegacyError(f"{name} missing from the archive") from None
    if info.file_size > limit:
        raise LegacyError(f"archive member {name} inflates to {info.file_size:,} bytes, more than "
                          f"{limit:,} (a torch.save archive stores its members uncompressed): damaged or hostile")
    return info


def _read_torch_zip(f: Any, archive_size: int, allowed: AllowList) -> Any:
    """torch.save's zip format: <root>/data.pkl with storages as persistent ids of <root>/data/<key>."""
    member_limit = ZIP_MEMBER_FACTOR * archive_size
    current_budget().take(ZIPINFO_BYTES * zip_entry_count(f, archive_size), "the archive's directory")
    with zipfile.ZipFile(f) as zf:
        pkls = sorted((n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
        if not pkls:
            raise LegacyError("zip archive without data.pkl (not a torch.save file)")
        root = pkls[0][:-len("data.pkl")]
        if f"{root}byteorder" in zf.namelist() and zf.open(f"{root}byteorder").read(16) != b"little":
            raise LegacyError("big-endian torch files are not supported")
        storages: dict[str, _Storage] = {}

        def persistent(pid: Any) -> _Storage:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                    and isinstance(pid[1], _StorageType)):
                raise LegacyError(f"unexpected persistent id {str(pid)[:60]!r}")
            _, stype, key, _location, numel = pid
            if key not in storages:
                name = f"{root}data/{key}"
                _zip_member(zf, name, member_limit)
                storage = _Storage(stype.dtype, numel)
                with zf.open(name) as member:
                    storage.fill(member.read(storage.nbytes + 1))
                storages[key] = storage
            return storages[key]

        info = _zip_member(zf, pkls[0], member_limit)
        with zf.open(info) as data:
            return _unpickle(BoundedReader(data, info.file_size, f"archive member {info.filename}"), persistent, allowed)


def _refuse_safetensors(head: bytes, size: int) -> None:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and then '{'."""
    if len(head) > 8 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8:
        raise LegacyError("this is a safetensors file (a vcdm checkpoint?), not a pickle: it needs no import; "
                          "use it directly as a vcdm network")


def read_pickle(path: PathLike, allowed: AllowList = NETWORK_PICKLE) -> Any:
    """Unpickle an EDM/VCDM file (plain pickle, torch legacy or torch zip) into plain containers,
    tensors and :class:`Record` stand-ins, executing nothing from it and naming only ``allowed``'s globals
    (a TorchScript archive, a torch zip too, has its own list)."""
    path = Path(path)
    if not path.is_file():
        raise LegacyError(f"{path}: no such file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f, budgeted(file_budget(size)):
            head = f.read(16)
            _refuse_safetensors(head, size)
            f.seek(0)
            if head.startswith(b"PK\x03\x04"):
                obj = _read_torch_zip(f, size, allowed)
            else:
                reader = BoundedReader(f, size)
                obj = _unpickle(reader, None, allowed)
                if type(obj) is int and obj == TORCH_MAGIC:
                    obj = _read_torch_stream(reader, obj, allowed)
        check_nesting(obj)
        return obj
    except LegacyError as e:
        raise type(e)(f"{path}: {e}") from None
    except Exception as e:  # anything else means damaged input: report it on one line
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LegacyError(f"{path}: not a readable network pickle (truncated or damaged?): {detail}") from None

