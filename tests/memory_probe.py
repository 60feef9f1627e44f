"""Run one read of a (hostile) file in a fresh interpreter and measure its peak memory.

The read runs as the only child of a small parent process, so the parent's
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is that read's peak resident memory alone (a test process's own
children would mix in others). The parent caps the child's address space, so a regression fails the test
with a MemoryError instead of taking the machine's memory.

The ceiling is relative: a child that only imports torch and vcdm and builds a tiny network on the meta
device (whose first use imports torch's reference kernels) peaks at ~1.08 GiB on its own (~0.9 GiB for
torch alone, measured at exit), so a hostile read may add at most ``EXTRA_MIB`` to that. Unguarded, the cases tested
take 3.7-4.7 GB or more.
"""
from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

EXTRA_MIB = 256                  # what a hostile read may add to the baseline's peak RSS
ADDRESS_SPACE_CAP = 12 << 30     # virtual memory the child may map (torch alone maps ~3 GiB)
BASELINE = ("import torch, vcdm.checkpoints, vcdm.legacy, vcdm.data.dataset, vcdm.data.dataset_tool\n"
            "from vcdm.nets.songunet import SongUNet\n"
            "with torch.device('meta'):\n    SongUNet(8, 3, 3, model_channels=8, channel_mult=[1])\n")

_PARENT = textwrap.dedent("""
    import resource, subprocess, sys
    resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
    p = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True, timeout=600)
    sys.stdout.write(p.stdout + p.stderr)
    print(f"@probe {{p.returncode}} {{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}}")
""")

def run_read(code: str) -> tuple[int, list[str], float]:
    """Exit status, output lines and peak RSS (MiB) of ``code`` run in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", _PARENT.format(cap=ADDRESS_SPACE_CAP), code],
                         capture_output=True, text=True, timeout=900, check=True).stdout
    lines = out.splitlines()
    _, rc, rss_kib = lines[-1].split()
    return int(rc), lines[:-1], int(rss_kib) / 1024


@functools.lru_cache(maxsize=None)
def baseline_mib() -> float:
    rc, lines, rss = run_read(BASELINE)
    assert rc == 0 and not lines, lines
    return rss


def expect_one_line_error(code: str, match: str) -> float:
    """Run ``code`` (which prints ``Error: ...`` and exits 1 on the expected error) and check it gives
    exactly that one line within the memory ceiling. Returns the peak RSS in MiB."""
    rc, lines, rss = run_read(code)
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (rc, lines[:5])
    assert match in lines[0], lines[0]
    base = baseline_mib()
    assert rss < base + EXTRA_MIB, f"peak RSS {rss:.0f} MiB, baseline {base:.0f} MiB: {lines[0]}"
    print(f"peak RSS {rss:.0f} MiB (baseline {base:.0f}): {lines[0][:150]}")
    return rss


def guarded(imports: str, call: str, error: str) -> str:
    """Child code running the expression ``call`` and printing ``error`` exceptions as one ``Error:`` line."""
    return f"import sys\n{imports}\ntry:\n    {call}\nexcept {error} as e:\n    print('Error:', e)\n" \
           "    sys.exit(1)\nprint('no error')\n"
