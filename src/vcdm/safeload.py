"""Bounded reading of ``torch.save`` archives: training states, ``--load_obs_from`` sample files and the
pretrained weights files (Inception, CLIP, DINOv2; :func:`load_weights`).

``torch.load(weights_only=True)`` runs no code from a file, but it trusts the file's sizes: a 1.9 MB
archive whose deflated storage claims 2 GB, or a 20 KB ``data.pkl`` of 20 M one-byte list opcodes,
makes it allocate gigabytes. :func:`load_torch_zip` first checks the archive in one pass over it,
building nothing, and charges what torch will allocate to the file's budget
(:func:`vcdm.legacy.limits.file_budget`: twice its size plus 64 MiB):

- the zip's directory: its entry count before Python parses it (``ZIPINFO_BYTES`` each), unique names
  under one root folder, no encryption, only stored or deflated members, inflating to at most
  ``ZIP_MEMBER_FACTOR`` times the archive in all (torch stores its members uncompressed);
- ``data.pkl``, read by :mod:`pickletools` (linear in its length): only the opcodes ``torch.save``
  writes, globals from a short list (tensor and parameter rebuilding, storage types, dtypes, OrderedDict,
  torch.Size), ``ITEM_BYTES`` charged per opcode plus the length of each string, and every storage's
  element count times its element size equal to the size of its ``data/<key>`` member.

Only then does ``torch.load`` read the file. :func:`load_json` reads the JSON files beside such
files (state sidecars, ``training_options.json``) within a size, a nesting depth and a type. Errors are
ValueErrors without the path: callers name the file in their own terms.
"""
from __future__ import annotations

import json
import os
import pickletools
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vcdm.legacy.limits import ITEM_BYTES, ZIP_MEMBER_FACTOR, ZIPINFO_BYTES, Budget, file_budget, zip_entry_count
from vcdm.legacy.records import LegacyError
from vcdm.legacy.unpickle import _STORAGE_DTYPES, _TORCH_DTYPES

MAX_JSON_DEPTH = 32  # nesting of a JSON file vcdm reads (its own files nest 3 deep)
_ALLOWED_GLOBALS = frozenset({"collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                              "torch._utils._rebuild_parameter", "torch.Size"}
                             | {f"torch.{name}" for name in _STORAGE_DTYPES if name != "UntypedStorage"}
                             | {f"torch.{name}" for name in _TORCH_DTYPES})
_PUSH_ARG = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
                       "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                       "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"})
_PUSH_CONST = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": ()}
_EMPTY = frozenset({"EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET"})


class TorchFileError(ValueError):
    """A file that is not a torch.save archive vcdm reads, or asks for more memory than its size allows."""


class JSONFileError(ValueError):
    """A JSON file that is too large, too deep, not JSON, or not of the expected type."""


@dataclass(frozen=True)
class _Global:
    name: str


_BUILT = object()  # any object the pickle builds (a container, a tensor): only its presence matters


def load_weights(path: str | os.PathLike, mmap: bool = False) -> Any:
    """A pretrained weights file: a torch.save archive through :func:`load_torch_zip`; a file in torch's legacy
    (pre-1.6, not zip) format, which these checks do not cover, by ``torch.load(weights_only=True)`` alone."""
    if zipfile.is_zipfile(path):
        return load_torch_zip(path, mmap=mmap)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_torch_zip(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, after the checks above (raises TorchFileError);
    ``mmap``: tensors backed by the file, no second copy."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as e:
        raise TorchFileError(f"cannot read the file ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise TorchFileError("not a regular file")
    budget = file_budget(info.st_size)
    try:
        with open(path, "rb") as f:
            budget.take(ZIPINFO_BYTES * zip_entry_count(f, info.st_size), "the archive's directory")
            with zipfile.ZipFile(f) as zf:
                _check_archive(zf, info.st_size, budget)
    except (TorchFileError, LegacyError) as e:
        raise TorchFileError(str(e)) from None
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, IndexError, KeyError, struct.error) as e:
        raise TorchFileError(f"not a readable torch.save archive ({first_line(e)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for damaged files
        raise TorchFileError(f"not a readable torch.save archive ({first_line(e)})") from None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _check_archive(zf: zipfile.ZipFile, size: int, budget: Budget) -> None:
    members = zf.infolist()
    names = [m.filename for m in members]
    if len(set(names)) != len(names):
        raise TorchFileError("the archive names one member twice (damaged or hostile)")
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise TorchFileError("not a torch.save archive (expected one <name>/data.pkl)")
    root = pickles[0][:-len("data.pkl")]
    inflated = 0
    for m in members:
        if not m.filename.startswith(root):
            raise TorchFileError(f"archive member {m.filename} lies outside its folder {root}")
        if m.flag_bits & 0x1:
            raise TorchFileError(f"archive member {m.filename} is encrypted")
        if m.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise TorchFileError(f"archive member {m.filename} uses compression method {m.compress_type} "
                                 "(torch.save stores its members uncompressed)")
        inflated += m.file_size
    if inflated > ZIP_MEMBER_FACTOR * size:
        raise TorchFileError(f"the archive's members inflate to {inflated:,} bytes, more than {ZIP_MEMBER_FACTOR}x "
                             f"its {size:,} bytes (torch.save stores them uncompressed): damaged or hostile")
    sizes = {m.filename: m.file_size for m in members}
    budget.take(sizes[pickles[0]], "data.pkl")
    storages = _scan_pickle(zf.read(pickles[0]), budget)
    for key, (type_name, numel) in storages.items():
        name = f"{root}data/{key}"
        nbytes = numel * torch.empty(0, dtype=_STORAGE_DTYPES[type_name]).element_size()
        if name not in sizes:
            raise TorchFileError(f"storage {key!r} has no member {name} in the archive")
        if sizes[name] != nbytes:
            raise TorchFileError(f"storage {key!r} claims {numel:,} elements ({nbytes:,} bytes) but its member "
                                 f"{name} holds {sizes[name]:,} bytes")
        budget.take(nbytes, f"storage {key!r}")


def _scan_pickle(data: bytes, budget: Budget) -> dict[str, tuple[str, int]]:
    """Walk ``data.pkl``'s opcodes with a stack of placeholders (strings, numbers, tuples and globals as
    themselves, everything built as ``_BUILT``), charging each to ``budget``. Returns each storage key's
    type name and element count."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    storages: dict[str, tuple[str, int]] = {}

    def pop_mark() -> list[Any]:
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    for op, arg, pos in pickletools.genops(data):
        name = op.name
        budget.take(ITEM_BYTES + (len(arg) if isinstance(arg, (str, bytes)) else 0), "objects data.pkl builds")
        if name in _PUSH_ARG:
            stack.append(arg)
        elif name in _PUSH_CONST:
            stack.append(_PUSH_CONST[name])
        elif name in _EMPTY:
            stack.append(_BUILT)
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = tuple(stack[-n:])
            if len(items) != n:
                raise TorchFileError(f"data.pkl: {name} at byte {pos} on a short stack")
            del stack[-n:]
            stack.append(items)
        elif name in ("LIST", "DICT", "FROZENSET"):
            pop_mark()
            stack.append(_BUILT)
        elif name in ("APPENDS", "SETITEMS", "ADDITEMS", "POP_MARK"):
            pop_mark()
        elif name == "POP" and marks and marks[-1] == len(stack):
            marks.pop()
        elif name in ("APPEND", "BUILD", "POP"):
            stack.pop()
        elif name == "SETITEM":
            del stack[-2:]
        elif name == "GLOBAL":
            qualname = arg.replace(" ", ".", 1)
            if qualname not in _ALLOWED_GLOBALS:
                raise TorchFileError(f"data.pkl names '{qualname}', which a tensor file does not need; refused")
            stack.append(_Global(qualname))
        elif name == "REDUCE":
            stack.pop()
            if not isinstance(stack[-1], _Global):
                raise TorchFileError(f"data.pkl calls something that is not an allowed global (byte {pos})")
            stack[-1] = _BUILT
        elif name == "BINPERSID":
            stack[-1] = _storage(stack[-1], storages)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise TorchFileError(f"data.pkl refers to memo entry {arg}, which it never stored (byte {pos})")
            stack.append(memo[arg])
        elif name == "DUP":
            stack.append(stack[-1])
        elif name == "STOP":
            break
        elif name not in ("PROTO", "FRAME"):
            raise TorchFileError(f"data.pkl uses the opcode {name} (byte {pos}), which torch.save does not write")
    return storages


def _storage(pid: Any, storages: dict[str, tuple[str, int]]) -> object:
    """Check a persistent id ``('storage', torch.<Type>Storage, key, location, numel)`` and record it."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Global)
            and isinstance(pid[2], str) and isinstance(pid[3], str) and type(pid[4]) is int and pid[4] >= 0):
        raise TorchFileError(f"data.pkl has a persistent id that is not a storage: {str(pid)[:80]}")
    type_name, key, numel = pid[1].name.removeprefix("torch."), pid[2], pid[4]
    if type_name not in _STORAGE_DTYPES or type_name == "UntypedStorage":
        raise TorchFileError(f"data.pkl: storage {key!r} has the unknown type {pid[1].name}")
    if storages.setdefault(key, (type_name, numel)) != (type_name, numel):
        raise TorchFileError(f"data.pkl: storage {key!r} is described twice, differently")
    return _BUILT


def load_json(path: str | os.PathLike, max_bytes: int, kind: type | None = None) -> Any:
    """The JSON value of a regular file of at most ``max_bytes``, nested at most MAX_JSON_DEPTH deep and,
    with ``kind``, of that type (raises JSONFileError)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise JSONFileError(f"cannot read it ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise JSONFileError("not a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise JSONFileError(f"more than the {max_bytes:,} bytes such a file may have (damaged or hostile)")
    try:
        value = json.loads(data)
    except RecursionError:
        raise JSONFileError(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as e:
        raise JSONFileError(f"not valid JSON ({str(e)[:80]})") from None
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise JSONFileError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    if kind is not None and not isinstance(value, kind):
        expected = {dict: "an object", list: "a list"}.get(kind, kind.__name__)
        raise JSONFileError(f"holds {type(value).__name__}, expected {expected}")
    return value


def _json_depth(value: Any) -> int:
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            todo.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest
