"""Hostile files through every reader (issue 19): each is refused with one ``Error:`` line, no traceback,
within a wall-time bound and within ``memory_probe.EXTRA_MIB`` of a torch-only child's peak memory.

Each case runs in a fresh interpreter (see memory_probe.py); the child prints the error, or ``no error``,
and, for reads timed on their own, ``@@ <seconds>`` at the end of its error line.
"""
from __future__ import annotations

import time

import pytest

from memory_probe import EXTRA_MIB, baseline_mib, run_read

pytestmark = pytest.mark.slow


def expect_refusal(code: str, match: str, *, seconds: float = 60.0) -> str:
    """Run ``code`` in a probed child; check one ``Error:`` line containing ``match``, exit status 1,
    peak RSS within EXTRA_MIB of the baseline, and the whole child within ``seconds``. Returns the line."""
    start = time.perf_counter()
    rc, lines, rss = run_read(code)
    elapsed = time.perf_counter() - start
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (rc, lines[-8:])
    assert "Traceback" not in lines[0] and match in lines[0], lines[0]
    base = baseline_mib()
    assert rss < base + EXTRA_MIB, f"peak RSS {rss:.0f} MiB, baseline {base:.0f} MiB: {lines[0]}"
    assert elapsed < seconds, f"{elapsed:.1f} s: {lines[0]}"
    return lines[0]


def timed_call(imports: str, call: str, error: str) -> str:
    """Child code timing the expression ``call`` alone and printing ``error`` exceptions as one line
    ending in ``@@ <seconds>``."""
    return (f"import sys, time\n{imports}\nstart = time.perf_counter()\ntry:\n    {call}\n"
            f"except {error} as e:\n    print('Error:', e, '@@', round(time.perf_counter() - start, 3))\n"
            "    sys.exit(1)\nprint('no error')\n")


def cli_call(*args: str) -> str:
    """Child code running the ``vcdm`` CLI as a user would (click prints ``Error: ...`` and exits 1)."""
    return f"from vcdm.cli.main import cli\ncli({list(args)!r})\n"


def seconds_of(line: str) -> float:
    return float(line.rsplit("@@", 1)[1])


# ------------------------------------------------------------------------------------------------
# Pickles (vcdm.legacy.limits): the budget is charged before the walk, so memo references stay linear.

def memo_references(n: int) -> bytes:
    """A pickle passing a list of ``n`` references to one ``n``-item list to OrderedDict (~1.2 MB for 400k):
    sizing the argument in full before charging it walked n*n items."""
    return (b"\x80\x02ccollections\nOrderedDict\n" + b"]q\x00(" + b"N" * n + b"e" + b"]q\x01("
            + b"h\x00" * n + b"e" + b"\x85R.")


def test_memo_references_to_one_large_list_are_refused_in_linear_time(tmp_path):
    path = tmp_path / "memo.pkl"
    path.write_bytes(memo_references(400_000))
    line = expect_refusal(timed_call("from vcdm.legacy import LegacyError, read_pickle",
                                     f"read_pickle({str(path)!r})", "LegacyError"),
                          "data the pickle builds")
    assert seconds_of(line) < 2.0, line  # 0.46 s here; quadratic, it ran for hours
