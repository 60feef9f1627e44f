"""Memory and nesting bounds for reading untrusted pickles.

A file of a few bytes can ask for gigabytes: a length field (``BYTEARRAY8``), a storage's element
count, a zip member that inflates a thousandfold, or one container copied by many calls through the
pickle's memo. Every read therefore runs under a :class:`Budget` proportional to the file's size, and
nesting is limited so that neither hashing (recursive in C: a segfault) nor our own recursive walks
can be driven arbitrarily deep.
"""
from __future__ import annotations

import contextvars
import math
import pickle
import struct
from typing import Any, Iterable, Iterator

from vcdm.checkpoints import MAX_LATENT_ELEMENTS
from vcdm.legacy.records import LegacyError, Record

MAX_DEPTH = 100          # container nesting; EDM's and the release's pickles nest about 20 deep
ITEM_BYTES = 64          # memory charged per container item a call builds from the pickle
SLACK_BYTES = 64 << 20   # allocation allowed beyond twice the file size (module sources, small files)
ZIP_MEMBER_FACTOR = 2    # torch stores zip members uncompressed: none may inflate beyond 2x the archive
ZIPINFO_BYTES = 1024     # memory charged per directory entry Python's zipfile parses (a ZipInfo and its name)


def zip_entry_count(f: Any, size: int) -> int:
    """Entries in a zip's central directory, from its end record (zip64 too), read before Python's
    zipfile parses the directory (each entry then costs about ZIPINFO_BYTES)."""
    tail_size = min(size, 22 + 0xFFFF)
    f.seek(size - tail_size)
    tail = f.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise LegacyError("no zip directory (not a zip archive, or a damaged one)")
    count = struct.unpack("<H", tail[at + 10:at + 12])[0]
    if count == 0xFFFF and at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07":
        f.seek(struct.unpack("<Q", tail[at - 12:at - 4])[0])
        record = f.read(56)
        if len(record) != 56:
            raise LegacyError("damaged zip64 directory")
        count = struct.unpack("<Q", record[32:40])[0]
    f.seek(0)
    return count


def check_sample_size(shapes: Iterable[Any], where: str) -> None:
    """Refuse data tensor shapes that are not lists of sizes or that hold more values per sample than a
    checkpoint may (vcdm.checkpoints.MAX_LATENT_ELEMENTS): every import applies this to what a pickle
    records before building anything of that size (EDM's img_resolution 12000 reached 4 GB)."""
    total = 0
    for shape in shapes:
        if not isinstance(shape, (list, tuple)) or not all(type(n) is int and n >= 0 for n in shape):
            raise LegacyError(f"{where}: the recorded tensor shape {str(shape)[:60]} is not a list of sizes")
        total += math.prod(shape)
    if total > MAX_LATENT_ELEMENTS:
        raise LegacyError(f"{where}: the recorded network's samples hold {total:,} values, more than the "
                          f"{MAX_LATENT_ELEMENTS:,} a vcdm checkpoint supports")


class Budget:
    """Bytes a read may still allocate."""

    def __init__(self, limit: int, what: str):
        self.limit, self.left, self.what = limit, limit, what

    def take(self, n: int, what: str) -> None:
        if n > self.left:
            raise LegacyError(f"{what} ({n:,} bytes more) exceeds the memory the {self.what} allows "
                              f"({self.limit:,} bytes in all): the file is damaged or hostile")
        self.left -= n


def file_budget(file_size: int) -> Budget:
    return Budget(2 * file_size + SLACK_BYTES, f"file's size ({file_size:,} bytes)")


_CURRENT: contextvars.ContextVar[Budget] = contextvars.ContextVar("vcdm_legacy_budget")


def current_budget() -> Budget:
    """The budget of the read in progress (reads outside :func:`budgeted` get a fixed small one)."""
    budget = _CURRENT.get(None)
    return budget if budget is not None else Budget(SLACK_BYTES, "default read limit")


class budgeted:
    """Context manager making ``budget`` the one allocations of this read are charged to."""

    def __init__(self, budget: Budget):
        self.budget = budget

    def __enter__(self) -> Budget:
        self._token = _CURRENT.set(self.budget)
        return self.budget

    def __exit__(self, *exc: Any) -> None:
        _CURRENT.reset(self._token)


class BoundedReader:
    """A file from which at most ``limit`` bytes may be read: a pickle announcing a longer string or
    bytes object than its file holds is refused before anything is allocated for it."""

    def __init__(self, f: Any, limit: int, where: str = "file"):
        self._f, self.left, self._where = f, limit, where

    def _check(self, n: int) -> None:
        if n > self.left:  # reported as damaged input, with the pickle's own errors
            raise pickle.UnpicklingError(f"the pickle announces {n:,} bytes where the {self._where} holds at "
                                         f"most {self.left:,} more")

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else n
        self._check(n)
        data = self._f.read(n)
        self.left -= len(data)
        return data

    def readline(self, *_ignored: Any) -> bytes:
        data = self._f.readline(self.left)
        self.left -= len(data)
        return data


def charge(budget: Budget, value: Any, depth: int = 3) -> None:
    """Charge what a call building from ``value`` may copy (items of containers to ``depth`` levels,
    bytes of strings). Each container is charged before its items are looked at, so the walk stops at
    the first one past the budget: its work is bounded by the budget, however often the pickle's memo
    makes one large container appear (400k references to one 400k-item list cost one refusal, not 1.6e11
    steps)."""
    todo = [(value, depth)]
    while todo:
        item, levels = todo.pop()
        if isinstance(item, (bytes, bytearray, str)):
            budget.take(len(item), "data the pickle builds")
        elif isinstance(item, (list, tuple, dict, set, frozenset)):
            budget.take(ITEM_BYTES * len(item), "data the pickle builds")
            if levels > 0:
                todo.extend((v, levels - 1) for v in (item.values() if isinstance(item, dict) else item))


def _children(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield v
    elif isinstance(value, (list, tuple, set, frozenset)):
        yield from value
    elif isinstance(value, Record):
        yield value.state


def check_nesting(root: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse an object tree nested deeper than ``limit`` or containing itself, without recursing,
    before anything walks it recursively."""
    height: dict[int, int] = {}            # id -> height of a finished subtree
    on_path: set[int] = set()
    keep: list[Any] = []                   # finished nodes stay referenced: their ids are not reused
    stack: list[tuple[Any, Iterator[Any], int]] = [(root, _children(root), 0)]
    on_path.add(id(root))
    while stack:
        node, children, tallest = stack[-1]
        child = next(children, _END)
        if child is _END:
            stack.pop()
            on_path.discard(id(node))
            height[id(node)] = tallest + 1
            keep.append(node)
            if stack:
                parent, it, t = stack[-1]
                stack[-1] = (parent, it, max(t, tallest + 1))
            continue
        if not isinstance(child, (dict, list, tuple, set, frozenset, Record)):
            continue
        if id(child) in on_path:
            raise LegacyError("the pickle's data contains itself (a reference cycle); refused")
        if id(child) in height:
            stack[-1] = (node, children, max(tallest, height[id(child)]))
            if len(stack) + height[id(child)] > limit:
                raise LegacyError(f"the pickle's data is nested more than {limit} levels deep; refused")
            continue
        if len(stack) >= limit:
            raise LegacyError(f"the pickle's data is nested more than {limit} levels deep; refused")
        on_path.add(id(child))
        stack.append((child, _children(child), 0))


_END = object()


class NestingTracker:
    """Depth of every tuple and frozenset an unpickler builds (hashing them recurses in C, unguarded:
    a tuple nested a million deep used as a dict key crashes the interpreter)."""

    def __init__(self, budget: Budget, limit: int = MAX_DEPTH):
        self.budget, self.limit = budget, limit
        self._depth: dict[int, tuple[int, Any]] = {}   # id -> (depth, the object, kept alive)

    def track(self, value: Any) -> None:
        if not isinstance(value, (tuple, frozenset)):
            return
        self.budget.take(2 * ITEM_BYTES, "tuples the pickle builds")
        depth = 1 + max((self._depth.get(id(v), (0,))[0] for v in value if isinstance(v, (tuple, frozenset))),
                        default=0)
        if depth > self.limit:
            raise LegacyError(f"the pickle's data is nested more than {self.limit} levels deep; refused")
        self._depth[id(value)] = (depth, value)
