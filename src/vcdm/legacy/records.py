"""Inert stand-ins for what a network pickle may construct: :class:`Record` (a class name and its
data, no behaviour), numpy scalars/arrays as plain values, and the errors the readers raise."""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch


class LegacyError(ValueError):
    """A file that cannot be imported as an EDM/VCDM network."""


class UnsafePickleError(LegacyError):
    """The pickle names a global outside the allow-list (unpickling it could run code)."""


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
        if isinstance(raw, str):  # a Python 2 pickle read with encoding='latin1'
            raw = raw.encode("latin1")
        if not isinstance(dtype, _NumpyDType) or not isinstance(raw, (bytes, bytearray)):
            raise LegacyError("numpy array of objects or without raw data is not allowed")
        self.array = np.frombuffer(bytes(raw), dtype=dtype.dtype).reshape(shape, order="F" if fortran else "C").copy()


def as_array(value: Any) -> Any:
    """The numpy array an unpickled array stands for; any other value unchanged."""
    return value.array if isinstance(value, _NDArray) else value


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


def _bytearray(data: Any = b"", encoding: Any = None) -> bytearray:
    """``bytearray`` as pickles use it: a copy of bytes (or of latin-1 text), never ``bytearray(n)``."""
    if isinstance(data, (bytes, bytearray)) and encoding is None:
        return bytearray(data)
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return bytearray(data, "latin-1")
    raise UnsafePickleError("bytearray called with something other than bytes (it would allocate from a number)")
