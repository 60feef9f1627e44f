"""Helpers shared by the benchmark scripts: timing that survives a busy machine, a description of the
machine, markdown tables, and the ``--quick`` / ``--json`` convention that ``run_all.py`` relies on.

Run the scripts as ``python benchmarks/<name>.py`` (this folder is then on ``sys.path``).

Every script's ``--json`` file is ``{"benchmark": name, "machine": {...}, "rows": [row, ...], ...}``
where a row is ``{"metric", "value", "unit", "reference", "ratio", "note"}``: ``reference`` names
the row of the same run that ``ratio`` (value / reference value) compares against, or is null.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from vcdm.fileio import atomic_write


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes: a fast, rougher run")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON (the format run_all.py reads)")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on, including the load average (other processes share the CPUs)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"device": str(device), "name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def describe(info: Mapping[str, Any]) -> str:
    return (f"{info['device']} ({info['name']}), {info['threads']} threads on {info['cpus']} CPUs, "
            f"OMP_WAIT_POLICY {info['omp_wait_policy']}, torch {info['torch']}, load average {info['load_avg_1m']}")


def interleaved(cases: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 1,
                device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of every case, ``reps`` times each, timed round-robin (case A, B, C, A, B, C, …).

    On a machine shared with other jobs the available CPU drifts over minutes; interleaving makes that
    drift hit every case alike, so ratios between cases stay meaningful even when absolute numbers move.
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, float]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how much the repetitions of one case disagree."""
    return (max(values) - min(values)) / median(values) if len(values) > 1 else 0.0


def row(metric: str, value: float | None, unit: str, *, reference: str | None = None, ratio: float | None = None,
        note: str = "") -> dict[str, Any]:
    return {"metric": metric, "value": value, "unit": unit, "reference": reference, "ratio": ratio, "note": note}


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers with `digits` significant digits (no exponent for ordinary magnitudes); '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
        return f"{value:.{max(digits - 1, 1)}e}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")


def result(benchmark: str, rows: list[dict[str, Any]], info: Mapping[str, Any], wall_s: float,
           **extra: Any) -> dict[str, Any]:
    """The --json document: ``info`` is ``machine()`` from the start; the load average at the end is added."""
    return {"benchmark": benchmark, "machine": dict(info), "load_avg_end": round(os.getloadavg()[0], 2),
            "wall_s": round(wall_s, 1), "rows": rows, **extra}
